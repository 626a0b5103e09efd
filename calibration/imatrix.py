"""`orlik calibrate imatrix`: an importance matrix computed by llama.cpp's own llama-imatrix on the
checkpoint's F16 GGUF over a calibration set, in the GGUF imatrix format llama-quantize reads.

orlik adds to the file which calibration set (sha256, language) and checkpoint produced it, and
writes a card beside it (`<name>.card.json`). A rerun with the same inputs reuses the file.
"""

from __future__ import annotations

import errno
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orlik import corpus, gguf_read, llamacpp, owner, progress
from orlik.checkpoint import Checkpoint
from orlik.errors import InputError, OutputError, ToolError
from orlik.fsutil import check_writable, sha256_file
from orlik.gguf_convert import f16_gguf
from orlik.sysinfo import usable_cores

LANGS = ("pl", "en", "mixed")
CHUNK = 512  # tokens per llama-imatrix chunk (its -c)
CARD_SUFFIX = ".card.json"
_PPL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")
_NCHUNKS = re.compile(r"computing over (\d+) chunks")
_DONE_CHUNK = re.compile(r"\[(\d+)\]([0-9.]+),")


@dataclass
class CalibrationText:
    jsonl: Path
    sha256: str
    lang: str
    texts: list[str]
    tokens: int  # counted by `orlik calibrate build` with the model's tokenizer, no BOS/EOS

    @property
    def label(self) -> str:
        """Short provenance string; llama-quantize copies it into each GGUF it makes (127 chars max)."""
        return f"orlik calibration.jsonl sha256:{self.sha256[:16]} lang:{self.lang} tokens:{self.tokens}"


def default_out(calib_dir: Path, lang: str) -> Path:
    return calib_dir / ("imatrix.gguf" if lang == "mixed" else f"imatrix-{lang}.gguf")


def card_path(imatrix: Path) -> Path:
    return imatrix.with_name(imatrix.name.removesuffix(".gguf") + CARD_SUFFIX)


def resolve_jsonl(calib: Path) -> Path:
    calib = Path(calib)
    path = calib / "calibration.jsonl" if calib.is_dir() else calib
    if not path.is_file():
        raise InputError(f"calibration file {path} does not exist; build one with `orlik calibrate build`")
    return path


def load_text(calib: Path, lang: str) -> CalibrationText:
    """The samples of one language (or all, for `mixed`) from a calibration.jsonl."""
    if lang not in LANGS:
        raise InputError(f"unknown --lang {lang!r}; valid: {', '.join(LANGS)}")
    path = resolve_jsonl(calib)
    texts: list[str] = []
    tokens = 0
    try:
        records = corpus.parse_jsonl(path.read_text(encoding="utf-8"), path)
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8: {e}") from None
    for i, rec in records:
        if not isinstance(rec.get("text"), str):
            raise InputError(f"{path}:{i}: a calibration record needs a 'text' string")
        if lang != "mixed" and rec.get("lang") != lang:
            continue
        texts.append(rec["text"])
        n = rec.get("tokens")
        # Records without a count (hand-written files) are estimated at 4 characters per token.
        tokens += int(n) if isinstance(n, int) and n > 0 else max(1, len(rec["text"]) // 4)
    if not texts:
        what = "no records" if lang == "mixed" else f"no records with lang {lang!r}"
        raise InputError(f"{path} has {what}; nothing to compute an imatrix on")
    return CalibrationText(path, sha256_file(path), lang, texts, tokens)


def compute(
    model: str | Path,
    calib: str | Path,
    *,
    lang: str = "mixed",
    chunk: int = CHUNK,
    max_chunks: int | None = None,
    out: Path | None = None,
    threads: int | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Compute (or reuse) the imatrix of `model` on the `lang` part of `calib`; returns its card."""
    ckpt = Checkpoint.open(model)
    text = _check(calib, lang, chunk, max_chunks)
    out = _out_file(out, text.jsonl.parent, lang)
    wanted = {"calibration_sha256": text.sha256, "lang": lang, "chunk_size": chunk, "max_chunks": max_chunks,
              "base_hash": ckpt.hash}  # fmt: skip
    # A killed run's half-written imatrix and card, and its scratch directory, if any.
    owner.clean_stale_files(out)
    owner.clean_stale_files(out, "work")
    if not force and (card := _reusable(out, wanted)) is not None:
        progress.info(f"imatrix: {out} is up to date (calibration {text.sha256[:12]}, lang {lang})")
        return card
    f16 = f16_gguf(ckpt)
    started = time.time()
    tmp_im = owner.partial_name(out)
    try:
        # The text and llama-imatrix's raw output live beside `out`, not in /tmp: a kill -9 leaves
        # them in a marked directory that the next run removes (above).
        with owner.work_dir(out) as td:
            txt = td / f"calibration-{lang}.txt"
            txt.write_text("\n\n".join(text.texts), encoding="utf-8")
            raw = td / "imatrix-raw.gguf"
            run = _run_imatrix(f16, txt, raw, chunk=chunk, max_chunks=max_chunks, threads=threads)
            _annotate(raw, tmp_im, text, ckpt.hash)
        im = gguf_read.check_imatrix(tmp_im, f16)
        card = {
            "imatrix": out.name,
            "sha256": sha256_file(tmp_im),
            **wanted,
            "chunks": im.chunk_count,
            "tokens_processed": (im.chunk_count or 0) * chunk,
            "entries": len(im.entries),
            **_provenance(text, ckpt, f16, run),
            "seconds": round(time.time() - started, 1),
        }
        _install(tmp_im, out, card)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OutputError(f"disk full while writing {out}; nothing was kept") from None
        raise OutputError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        tmp_im.unlink(missing_ok=True)
        card_path(tmp_im).unlink(missing_ok=True)
    progress.info(f"imatrix: wrote {out} ({card['chunks']} chunks of {chunk} tokens, lang {lang})")
    return {**card, "path": str(out)}


def _check(calib: str | Path, lang: str, chunk: int, max_chunks: int | None) -> CalibrationText:
    """The `lang` part of `calib`, once the chunk settings are valid and it holds two chunks."""
    if chunk < 16:
        raise InputError(f"--chunk {chunk} is too small; use at least 16 tokens (512 is usual)")
    if max_chunks is not None and max_chunks < 1:
        raise InputError("--chunks must be at least 1")
    text = load_text(Path(calib), lang)
    need = 2 * chunk
    if text.tokens < need:
        raise InputError(
            f"{text.jsonl} has {text.tokens} tokens with lang {lang!r}; llama-imatrix needs at least "
            f"2 x --chunk = {need}. Use a smaller --chunk or build a larger set (orlik calibrate build --tokens)"
        )
    return text


def _out_file(out: Path | None, calib_dir: Path, lang: str) -> Path:
    """`out`, or the default beside the calibration set: a file name in a writable folder."""
    out = Path(out) if out is not None else default_out(calib_dir, lang)
    if out.is_dir():
        raise OutputError(
            f"--out {out} is a directory; give the imatrix file name (e.g. {out / 'imatrix.gguf'})"
        )
    check_writable(out.parent)
    return out


def _provenance(text: CalibrationText, ckpt: Checkpoint, f16: Path, run: dict[str, Any]) -> dict[str, Any]:
    """The card's record of where the imatrix came from: calibration set, base model, tool, command."""
    return {
        "calibration": {
            "path": str(text.jsonl),
            "samples": len(text.texts),
            "tokens": text.tokens,
            "card_sha256": _card_hash(text.jsonl.parent),
        },
        "base": {"path": str(ckpt.path), "hash": ckpt.hash, "f16_gguf": str(f16)},
        "perplexity_f16": run["ppl"],
        "llama_cpp": llamacpp.build_info(),
        "command": "llama-imatrix " + " ".join(run["args"]),
    }


def _install(tmp_im: Path, out: Path, card: dict[str, Any]) -> None:
    """Move the finished imatrix, then its card, into place."""
    card_tmp = card_path(tmp_im)
    card_tmp.write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    # The imatrix goes in first: a crash before the card lands leaves a card that does not
    # match, so the next run recomputes instead of trusting it.
    os.replace(tmp_im, out)
    os.replace(card_path(tmp_im), card_path(out))


def _reusable(out: Path, wanted: dict[str, Any]) -> dict[str, Any] | None:
    cp = card_path(out)
    if not (out.is_file() and cp.is_file()):
        return None
    try:
        card = json.loads(cp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if any(card.get(k) != v for k, v in wanted.items()) or card.get("sha256") != sha256_file(out):
        return None
    return {**card, "path": str(out), "reused": True}


def _card_hash(calib_dir: Path) -> str | None:
    try:
        return json.loads((calib_dir / "card.json").read_text(encoding="utf-8")).get("calibration_sha256")
    except (OSError, ValueError, AttributeError):
        return None


def _run_imatrix(
    f16: Path, txt: Path, out: Path, *, chunk: int, max_chunks: int | None, threads: int | None
) -> dict[str, Any]:
    # Several chunks share one batch (n_batch a multiple of the chunk), as llama-imatrix prefers.
    batch = chunk * max(1, 2048 // chunk)
    args = ["-m", str(f16), "-f", str(txt), "-o", str(out), "-c", str(chunk), "-b", str(batch),
            "-t", str(threads or usable_cores()), "--parse-special", "--output-frequency", "1000000"]  # fmt: skip
    if max_chunks:
        args += ["--chunks", str(max_chunks)]
    state: dict[str, Any] = {"buf": "", "done": 0}
    with progress.bar("imatrix", total=None) as bar:

        def on_output(piece: str) -> None:
            buf = state["buf"] = (state["buf"] + piece)[-4096:]
            if m := _NCHUNKS.search(buf):
                bar.update(total=int(m.group(1)))
            marks = [int(x) for x, _ in _DONE_CHUNK.findall(buf)]
            if marks and max(marks) > state["done"]:
                bar.advance(max(marks) - state["done"])
                state["done"] = max(marks)

        rc, text = llamacpp.run_tool("llama-imatrix", args, on_output)
    if rc != 0 or not out.is_file():
        raise ToolError(f"llama-imatrix failed (exit {rc}): {_tail(text)}")
    m = _PPL.search(text)
    # llama.cpp's log thread may exit before printing the final line; the running estimate after
    # the last chunk ("[n]ppl,") is the same figure.
    running = _DONE_CHUNK.findall(text)
    ppl = float(m.group(1)) if m else (float(running[-1][1]) if running else None)
    # The recorded command names the text file, not the temporary paths that no longer exist.
    shown = [a for i, a in enumerate(args) if a != "-o" and (i == 0 or args[i - 1] != "-o")]
    return {
        "args": [txt.name if a == str(txt) else a for a in shown],
        "ppl": ppl,
    }


def _tail(log: str) -> str:
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    errs = [ln for ln in lines if " E " in ln or "error" in ln.lower()]
    return (errs or lines or ["no output"])[-1][:300]


def _annotate(raw: Path, dst: Path, text: CalibrationText, base_hash: str) -> None:
    """Copy llama-imatrix's file, adding orlik's provenance keys and a readable dataset label."""
    import gguf

    r = gguf.GGUFReader(str(raw), "r")
    w = gguf.GGUFWriter(str(dst), arch="")
    # GGUFWriter always adds general.architecture; an imatrix has none, so drop it again.
    w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
    for key, field in r.fields.items():
        if key.startswith("GGUF."):
            continue
        if key == "imatrix.datasets":
            w.add_array(key, [text.label])
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), vtype, sub)
    w.add_string(gguf_read.KEY_CALIB_SHA, text.sha256)
    w.add_string(gguf_read.KEY_CALIB_LANG, text.lang)
    w.add_uint64(gguf_read.KEY_CALIB_TOKENS, text.tokens)
    w.add_string(gguf_read.KEY_BASE_SHA, base_hash)
    for t in r.tensors:
        w.add_tensor(t.name, t.data.copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

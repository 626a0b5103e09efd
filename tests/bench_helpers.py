"""GGUF test inputs for the evaluator, made directly with llama.cpp's converter and llama-quantize
(so the evaluator's tests do not depend on orlik's GGUF backend), and hand-written manifests."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors import safe_open

from orlik import llamacpp
from orlik.checkpoint import Checkpoint
from orlik.manifest import Variant, hash_files


def convert_f16(ckpt: Path, out: Path) -> Path:
    subprocess.run([sys.executable, str(llamacpp.converter()), str(ckpt), "--outtype", "f16", "--outfile", str(out)],
                   check=True, capture_output=True)  # fmt: skip
    return out


def quantize(f16: Path, qtype: str, out: Path) -> Path:
    subprocess.run(
        [str(llamacpp.tool("llama-quantize")), str(f16), str(out), qtype], check=True, capture_output=True
    )
    return out


def make_variant(gguf: Path, name: str, root: Path, ckpt: Path, *, base_hash: str | None = None) -> Path:
    """root/name/ holding model.gguf and a variant.json like the GGUF backend's."""
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(gguf, d / "model.gguf")
    c = Checkpoint.open(ckpt)
    size = (d / "model.gguf").stat().st_size
    with safe_open(c.weight_files[0], "np") as f:
        params = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())  # noqa: SIM118 - safe_open is not a dict
    Variant(name=name, format="gguf", recipe={"name": name, "format": "gguf", "qtype": name.split("-")[0]},
            base_hash=base_hash or c.hash, files=hash_files(d, ["model.gguf"]), bytes=size,
            bpw=round(size * 8 / params, 4), tools={"llama.cpp": llamacpp.build_info()}).save(d)  # fmt: skip
    return d


def retokenized_copy(src: Path, dst: Path) -> Path:
    """The same weights with the SentencePiece scores negated: llama.cpp then merges in the opposite
    order, so the copy has the same vocabulary but tokenizes text differently."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    r = GGUFReader(src)
    w = GGUFWriter(dst, r.fields["general.architecture"].contents())
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        val = f.contents()
        if name == "tokenizer.ggml.scores":
            val = [-v for v in val]
        if f.types[0] == GGUFValueType.ARRAY:
            w.add_key_value(name, val, f.types[0], sub_type=f.types[-1])
        else:
            w.add_key_value(name, val, f.types[0])
    for t in r.tensors:
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


_PPL_FIELDS = {
    "ppl": r"Mean PPL\(Q\)\s*:\s*([\d.]+)",
    "ppl_base": r"Mean PPL\(base\)\s*:\s*([\d.]+)",
    "kld": r"Mean\s+KLD:\s*([\d.eE+-]+)",
    "same_top": r"Same top p:\s*([\d.]+)",
    "dp_rms": r"RMS Δp\s*:\s*([\d.]+)",
}


def llama_perplexity_kld(base_gguf: Path, quant_gguf: Path, text: Path, ctx: int, work: Path,
                         threads: int = 1) -> dict[str, float]:  # fmt: skip
    """llama-perplexity's own figures: its base-logits pass on base_gguf, then --kl-divergence."""
    tool = str(llamacpp.tool("llama-perplexity"))
    t = ["-t", str(threads)]
    logits = work / f"base-{ctx}.kld"
    if not logits.is_file():
        subprocess.run([tool, "-m", str(base_gguf), "-f", str(text), "-c", str(ctx), *t, "--kl-divergence-base",
                        str(logits)], check=True, capture_output=True)  # fmt: skip
    # llama.cpp's logger is a leaked singleton printing from a worker thread (common/log.cpp, issue 22142):
    # on a busy machine its last lines, the final statistics, can be lost at exit; such a run is repeated.
    for _ in range(3):
        r = subprocess.run([tool, "-m", str(quant_gguf), "-c", str(ctx), *t, "--kl-divergence-base", str(logits),
                            "--kl-divergence"], check=True, capture_output=True, text=True)  # fmt: skip
        out = r.stdout + r.stderr
        vals = {k: float(m.group(1)) for k, p in _PPL_FIELDS.items() if (m := re.search(p, out))}
        if len(vals) == len(_PPL_FIELDS):
            break
    else:
        raise AssertionError("llama-perplexity printed no final statistics:\n" + out[-2000:])
    vals["same_top"] /= 100
    vals["dp_rms"] /= 100
    return vals

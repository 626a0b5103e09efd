"""`orlik calibrate`: the Polish-English calibration set and the importance matrix."""

from __future__ import annotations

from pathlib import Path

import click

from orlik import paths
from orlik.cli_common import Constant, emit

_BUILD = "orlik.calibration.build"  # whose constants are defaults


@click.group()
def calibrate() -> None:
    """Polish-English calibration set and importance matrix."""


@calibrate.command("build")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Output dir for calibration.jsonl and card.{json,md}  " + paths.default_help(paths.CALIB),
)
@click.option(
    "--tokens",
    type=int,
    default=Constant(_BUILD, "TOKENS"),
    show_default=True,
    help="Total tokens, counted with MODEL's tokenizer.",
)
@click.option(
    "--pl-ratio",
    type=float,
    default=Constant(_BUILD, "PL_RATIO"),
    show_default=True,
    help="Polish share of the tokens (--lang mixed).",
)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--lang",
    type=click.Choice(["pl", "en", "mixed"]),
    default="mixed",
    show_default=True,
    help="One language only, e.g. for a language-specific imatrix.",
)
@click.option(
    "--file",
    "files",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Your own .txt/.md/.jsonl ('text' field) file or directory; repeatable. Used first.",
)
@click.option("--no-corpus", is_flag=True, help="Leave out the built-in corpus documents.")
@click.option("--no-chat", is_flag=True, help="Leave out chats rendered through MODEL's chat template.")
@click.option("--no-parallel", is_flag=True, help="Leave out the Polish-English parallel pairs.")
@click.option(
    "--max-sample-tokens",
    type=int,
    default=Constant(_BUILD, "MAX_SAMPLE_TOKENS"),
    show_default=True,
    help="Longer texts are cut into chunks.",
)
@click.option(
    "--force", is_flag=True, help="Write into --out even if orlik did not make it (only its 3 files change)."
)
def calibrate_build(model: Path, out: Path | None, tokens: int, pl_ratio: float, seed: int, lang: str,
                    files: tuple[Path, ...], no_corpus: bool, no_chat: bool, no_parallel: bool,
                    max_sample_tokens: int, force: bool) -> None:  # fmt: skip
    """Build a Polish-English calibration set (calibration.jsonl + card) for MODEL's tokenizer."""
    from orlik.calibration import build as calib

    card = calib.build(model, out, tokens=tokens, pl_ratio=pl_ratio, seed=seed, lang=lang,
                       user_files=list(files), include_corpus=not no_corpus, include_chat=not no_chat,
                       include_parallel=not no_parallel, max_sample_tokens=max_sample_tokens,
                       force=force)  # fmt: skip
    res = card["result"]
    emit({"out": card["out"], "samples": res["samples"], "tokens": res["tokens"],
          "tokens_by_lang": res["tokens_by_lang"], "pl_ratio": res["pl_ratio"],
          "tokens_by_source": res["tokens_by_source"], "dropped": card["drops"],
          "sha256": card["calibration_sha256"]})  # fmt: skip


@calibrate.command("imatrix")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--calib",
    type=click.Path(path_type=Path),
    default=None,
    help="calibration.jsonl or its directory  " + paths.default_help(paths.CALIB),
)
@click.option(
    "--lang",
    type=click.Choice(["pl", "en", "mixed"]),
    default="mixed",
    show_default=True,
    help="Use only the samples of this language.",
)
@click.option(
    "--chunk",
    type=int,
    default=Constant("orlik.calibration.imatrix", "CHUNK"),
    show_default=True,
    help="Tokens per llama-imatrix chunk (its -c).",
)
@click.option(
    "--chunks", "max_chunks", default=None, type=int, help="At most this many chunks (default: all)."
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="imatrix file  [default: <calib dir>/imatrix.gguf, imatrix-pl.gguf, imatrix-en.gguf]",
)
@click.option("--force", is_flag=True, help="Recompute even if an up-to-date imatrix exists.")
def calibrate_imatrix(model: Path, calib: Path | None, lang: str, chunk: int, max_chunks: int | None,
                      out: Path | None, force: bool) -> None:  # fmt: skip
    """Compute MODEL's importance matrix with llama-imatrix on its F16 GGUF (llama.cpp format)."""
    from orlik.calibration import imatrix

    calib = calib if calib is not None else paths.calib_dir(model)
    card = imatrix.compute(model, calib, lang=lang, chunk=chunk, max_chunks=max_chunks, out=out, force=force)
    emit({"out": card["path"], "lang": card["lang"], "chunks": card["chunks"], "chunk_size": card["chunk_size"],
          "tokens_processed": card["tokens_processed"], "entries": card["entries"],
          "calibration_sha256": card["calibration_sha256"], "sha256": card["sha256"],
          "perplexity_f16": card["perplexity_f16"], "reused": bool(card.get("reused"))})  # fmt: skip

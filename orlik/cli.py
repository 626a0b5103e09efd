"""The `orlik` command: one thin verb per pipeline stage, each importing its stage lazily."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from orlik import __version__
from orlik.errors import NotBuiltError, OrlikError

_DEBUG = {"on": False}


def _not_built(verb: str, issue: str) -> NoReturn:
    raise NotBuiltError(f"`orlik {verb}` is not built yet in orlik {__version__} ({issue})")


def emit(obj: Any, ctx: click.Context | None = None) -> None:
    """Print a result as JSON under --json, else as readable text."""
    ctx = ctx or click.get_current_context()
    if ctx.find_root().obj.get("json"):
        click.echo(json.dumps(obj, indent=2, ensure_ascii=False, default=str))
    elif isinstance(obj, str):
        click.echo(obj)
    else:
        for k, v in obj.items():
            click.echo(f"{k}: {v}")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="orlik")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or chatter.")
@click.option("--json", "json_mode", is_flag=True, help="Machine-readable output.")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool, json_mode: bool) -> None:
    """orlik: quantize, benchmark and serve Polish-English language models.

    Data flow: train -> calibrate -> quantize -> bench -> serve. Each verb reads the previous
    stage's files, so you can start at any stage with your own checkpoint or variant.
    """
    from orlik import progress

    _DEBUG["on"] = debug
    progress.configure(quiet=quiet, json_mode=json_mode)
    ctx.obj = {"json": json_mode, "quiet": quiet}


# ---------------------------------------------------------------- train
@cli.group()
def train() -> None:
    """Corpus, tokenizer and tiny-model pretraining (ends at an FP16 checkpoint)."""


@train.command("corpus")
@click.option("--root", type=click.Path(path_type=Path), default=None, help="Corpus data dir.")
def train_corpus(root: Path | None) -> None:
    """Sizes of the built-in Polish-English corpus per language and domain."""
    from orlik.training import corpus

    emit(corpus.stats(root or corpus.DATA_DIR))


@train.command("tokenizer")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option("--vocab-size", default=8000, show_default=True)
@click.option("--corpus", "corpus_dir", type=click.Path(path_type=Path), default=None)
@click.option("--seed", default=0, show_default=True)
def train_tokenizer(out: Path, vocab_size: int, corpus_dir: Path | None, seed: int) -> None:
    """Train the SentencePiece tokenizer and write the token-efficiency report."""
    from orlik.training import tokenizer

    report = tokenizer.build(out, vocab_size=vocab_size, corpus_dir=corpus_dir, seed=seed)
    emit(report)


@train.command("pretrain")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="FP16 checkpoint dir.")
@click.option("--arch", default="llama", show_default=True, help="llama | mistral | qwen2")
@click.option("--size", default="tiny", show_default=True, help="tiny | small")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(path_type=Path), default=None,
              help="Tokenizer dir (default: train one into <out>/../tokenizer).")
@click.option("--corpus", "corpus_dir", type=click.Path(path_type=Path), default=None)
@click.option("--steps", default=None, type=int, help="Optimizer steps (default per size).")
@click.option("--batch-size", default=None, type=int)
@click.option("--seq-len", default=None, type=int)
@click.option("--lr", default=None, type=float)
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", default=None, type=int, help="torch threads (default: all cores).")
@click.option("--checkpoint-every", default=200, show_default=True)
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue from <out>.work/state if an earlier run was interrupted.")
def train_pretrain(**kw: Any) -> None:
    """Pretrain a tiny llama/mistral/qwen2 model on CPU and export an FP16 HF checkpoint."""
    from orlik.training import pretrain

    emit(pretrain.run(**kw))


@train.command("eval")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--corpus", "corpus_dir", type=click.Path(path_type=Path), default=None)
def train_eval(checkpoint: Path, corpus_dir: Path | None) -> None:
    """Held-out perplexity of a checkpoint, next to a unigram baseline on the same tokens."""
    from orlik.training import evaluate

    emit(evaluate.heldout_report(checkpoint, corpus_dir=corpus_dir))


for _verb, _issue in [("sft", "SFT with masked user tokens, WICEL, ALR"), ("dpo", "DPO-Positive"),
                      ("merge", "linear merging"), ("upscale", "depth up-scaling")]:  # fmt: skip

    def _make(verb: str = _verb, what: str = _issue) -> click.Command:
        @click.pass_context
        def _cmd(ctx: click.Context) -> None:
            _not_built(f"train {verb}", f"{what}: not yet implemented")

        return click.Command(verb, callback=_cmd, help=f"{what} (not built yet).")

    train.add_command(_make())


# ---------------------------------------------------------------- calibrate / quantize / bench / serve
@cli.group()
def calibrate() -> None:
    """Polish-English calibration set and importance matrix."""


@calibrate.command("build")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output dir for calibration.jsonl and card.{json,md}  [default: MODEL/../calib]")
@click.option("--tokens", default=60_000, show_default=True, help="Total tokens, counted with MODEL's tokenizer.")
@click.option("--pl-ratio", default=0.7, show_default=True, help="Polish share of the tokens (--lang mixed).")
@click.option("--seed", default=0, show_default=True)
@click.option("--lang", type=click.Choice(["pl", "en", "mixed"]), default="mixed", show_default=True,
              help="One language only, e.g. for a language-specific imatrix.")
@click.option("--file", "files", multiple=True, type=click.Path(path_type=Path),
              help="Your own .txt/.md/.jsonl ('text' field) file or directory; repeatable. Used first.")
@click.option("--no-corpus", is_flag=True, help="Leave out the built-in corpus documents.")
@click.option("--no-chat", is_flag=True, help="Leave out chats rendered through MODEL's chat template.")
@click.option("--no-parallel", is_flag=True, help="Leave out the Polish-English parallel pairs.")
@click.option("--max-sample-tokens", default=512, show_default=True, help="Longer texts are cut into chunks.")
def calibrate_build(model: Path, out: Path | None, tokens: int, pl_ratio: float, seed: int, lang: str,
                    files: tuple[Path, ...], no_corpus: bool, no_chat: bool, no_parallel: bool,
                    max_sample_tokens: int) -> None:  # fmt: skip
    """Build a Polish-English calibration set (calibration.jsonl + card) for MODEL's tokenizer."""
    from orlik.calibration import build as calib

    card = calib.build(model, out, tokens=tokens, pl_ratio=pl_ratio, seed=seed, lang=lang,
                       user_files=list(files), include_corpus=not no_corpus, include_chat=not no_chat,
                       include_parallel=not no_parallel, max_sample_tokens=max_sample_tokens)  # fmt: skip
    res = card["result"]
    emit({"out": card["out"], "samples": res["samples"], "tokens": res["tokens"],
          "tokens_by_lang": res["tokens_by_lang"], "pl_ratio": res["pl_ratio"],
          "tokens_by_source": res["tokens_by_source"], "dropped": card["drops"],
          "sha256": card["calibration_sha256"]})  # fmt: skip


@calibrate.command("imatrix", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def calibrate_imatrix(args: tuple[str, ...]) -> None:
    """Compute an importance matrix with llama-imatrix (not built yet)."""
    _not_built("calibrate imatrix", "issue: Calibration and GGUF")


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def quantize(args: tuple[str, ...]) -> None:
    """Produce quantized variants of a checkpoint (not built yet)."""
    _not_built("quantize", "issue: Calibration and GGUF")


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """Table 8 evaluation of variants against FP16 (not built yet)."""
    _not_built("bench", "issue: Benchmarks")


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def serve(args: tuple[str, ...]) -> None:
    """OpenAI-compatible server for variants (not built yet)."""
    _not_built("serve", "issue: Serving")


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--verify/--no-verify", default=True, help="Check file sha256s against the manifest.")
def inspect(path: Path, verify: bool) -> None:
    """Show a variant's manifest or a checkpoint's summary."""
    from orlik.checkpoint import Checkpoint
    from orlik.errors import ManifestError
    from orlik.manifest import MANIFEST, Variant

    if (path / MANIFEST).is_file():
        v = Variant.load(path)
        d = v.to_dict()
        if verify:
            bad = v.verify()
            if bad:
                raise ManifestError(f"{path}: files differ from the manifest: {', '.join(bad)}")
            d["verified"] = True
        emit(d)
    else:
        c = Checkpoint.open(path)
        emit({"path": str(c.path), "arch": c.arch, "weights_bytes": c.weights_bytes, "hash": c.hash,
              "chat_template": bool(c.chat_template)})


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="orlik", standalone_mode=False)
    except OrlikError as e:
        if _DEBUG["on"]:
            raise
        click.echo(f"orlik: error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("orlik: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("orlik: interrupted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)

"""`orlik train`: corpus, tokenizer, tiny-model pretraining and its evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from orlik.cli_common import emit, not_built


@click.group()
def train() -> None:
    """Corpus, tokenizer and tiny-model pretraining (ends at an FP16 checkpoint)."""


@train.command("corpus")
@click.option("--root", type=click.Path(path_type=Path), default=None, help="Corpus data dir.")
def train_corpus(root: Path | None) -> None:
    """Sizes of the built-in Polish-English corpus per language and domain."""
    from orlik import corpus

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
@click.option(
    "--tokenizer",
    "tokenizer_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Tokenizer dir (default: train one into <out>/../tokenizer).",
)
@click.option("--corpus", "corpus_dir", type=click.Path(path_type=Path), default=None)
@click.option("--steps", default=None, type=int, help="Optimizer steps (default per size).")
@click.option("--batch-size", default=None, type=int)
@click.option("--seq-len", default=None, type=int)
@click.option("--lr", default=None, type=float)
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", default=None, type=int, help="torch threads (default: all cores).")
@click.option("--checkpoint-every", default=200, show_default=True)
@click.option(
    "--resume/--no-resume",
    default=True,
    show_default=True,
    help="Continue from <out>.work/state if an earlier run was interrupted.",
)
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
            not_built(f"train {verb}", f"{what}: not yet implemented")

        return click.Command(verb, callback=_cmd, help=f"{what} (not built yet).")

    train.add_command(_make())

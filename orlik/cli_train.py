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


for _verb, _issue in [("sft", "SFT with masked user tokens, WICEL, ALR"), ("dpo", "DPO-Positive")]:

    def _make(verb: str = _verb, what: str = _issue) -> click.Command:
        @click.pass_context
        def _cmd(ctx: click.Context) -> None:
            not_built(f"train {verb}", f"{what}: not yet implemented")

        return click.Command(verb, callback=_cmd, help=f"{what} (not built yet).")

    train.add_command(_make())


@train.command("merge")
@click.argument("models", nargs=-1, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Merged FP16 checkpoint dir.")
@click.option("--config", "config", type=click.Path(path_type=Path), default=None,
              help="A mergekit YAML (merge_method: linear) instead of MODELS and --weights.")  # fmt: skip
@click.option("--weights", default=None, help="Comma-separated, one per model (default: equal).")
@click.option(
    "--normalize/--no-normalize", default=True, show_default=True, help="Divide by the weights' sum."
)
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="Cast inputs to this dtype first (default: keep theirs).")  # fmt: skip
def train_merge(models: tuple[Path, ...], out: Path, config: Path | None, weights: str | None,
                normalize: bool, dtype: str | None) -> None:  # fmt: skip
    """Linear merge of checkpoints of one shape, streamed tensor by tensor (mergekit's arithmetic)."""
    from orlik.errors import InputError
    from orlik.training import merge

    if config is not None:
        if models or weights:
            raise InputError("give either --config or MODELS/--weights, not both")
        plan = merge.plan_from_mergekit_yaml(config)
    else:
        try:
            w = [float(x) for x in weights.split(",")] if weights else None
        except ValueError:
            raise InputError(f"--weights {weights!r} is not a comma-separated list of numbers") from None
        plan = merge.plan_from_args(list(models), w, normalize=normalize, dtype=dtype)
    emit(merge.run(plan, out))


@train.command("upscale")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--layers", required=True, help="Inclusive source layer ranges, e.g. 0-23,8-31 (32 -> 48).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Deeper FP16 checkpoint dir.")
def train_upscale(checkpoint: Path, layers: str, out: Path) -> None:
    """Depth up-scaling: stack layer ranges of CHECKPOINT into a deeper checkpoint (SOLAR style)."""
    from orlik.training import upscale

    summary = upscale.run(checkpoint, layers, out)
    emit({k: v for k, v in summary.items() if k != "layer_map"})

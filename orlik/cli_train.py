"""`orlik train`: corpus, tokenizer, tiny-model pretraining and its evaluation."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import click

from orlik.cli_common import emit
from orlik.training.defaults import (
    DPO_DEFAULTS,
    DPO_TRAIN,
    GRPO_DEFAULTS,
    GRPO_TRAIN,
    SFT_DEFAULTS,
    SFT_TRAIN,
    RunOptions,
    TrainArgs,
)

FORCE_HELP = "Replace --out even if orlik did not make it (pretrain: also the tokenizer dir it trains)."


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
@click.option("--force", is_flag=True, help=FORCE_HELP)
def train_tokenizer(out: Path, vocab_size: int, corpus_dir: Path | None, seed: int, force: bool) -> None:
    """Train the SentencePiece tokenizer and write the token-efficiency report."""
    from orlik.training import tokenizer

    report = tokenizer.build(out, vocab_size=vocab_size, corpus_dir=corpus_dir, seed=seed, force=force)
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
@click.option("--force", is_flag=True, help=FORCE_HELP)
@click.option("--init", type=click.Path(path_type=Path), default=None,
              help="Continue from this checkpoint's weights (e.g. `orlik train upscale` output).")  # fmt: skip
def train_pretrain(**kw: Any) -> None:
    """Pretrain a tiny llama/mistral/qwen2 model on CPU and export an FP16 HF checkpoint."""
    from orlik.training import pretrain

    _emit_main(pretrain.run(**kw))


@train.command("eval")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--corpus", "corpus_dir", type=click.Path(path_type=Path), default=None)
def train_eval(checkpoint: Path, corpus_dir: Path | None) -> None:
    """Held-out perplexity of a checkpoint, next to a unigram baseline on the same tokens."""
    from orlik.training import evaluate

    emit(evaluate.heldout_report(checkpoint, corpus_dir=corpus_dir))


def _post_training_options(f: Any) -> Any:
    """Options every post-training verb shares (defaults live in the verb's module)."""
    opts = [
        click.option("--out", type=click.Path(path_type=Path), required=True, help="FP16 checkpoint dir."),
        click.option("--steps", default=None, type=int, help="Optimizer steps (default: from --epochs)."),
        click.option("--seed", default=0, show_default=True),
        click.option("--threads", default=None, type=int, help="torch threads (default: cores / processes)."),
        click.option(
            "--checkpoint-every", default=100, show_default=True, help="Engine checkpoint interval."
        ),
        click.option(
            "--resume/--no-resume",
            default=True,
            show_default=True,
            help="Continue from the newest engine checkpoint in <out>.work.",
        ),
        click.option("--force", is_flag=True, help="Replace --out even if orlik did not make it."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _shared(kw: dict[str, Any], train: TrainArgs) -> dict[str, Any]:
    """Move the options sft, dpo and grpo share out of `kw` into their TrainArgs (a verb's own defaults
    where an option is unset) and RunOptions."""
    given = {f.name: kw.pop(f.name) for f in fields(TrainArgs) if f.name in kw}
    opts = RunOptions(**{f.name: kw.pop(f.name) for f in fields(RunOptions)})
    return {**kw, "train": replace(train, **{k: v for k, v in given.items() if v is not None}), "opts": opts}


def _emit_main(summary: dict[str, Any]) -> None:
    """Under torchrun every process returns; only the main one prints."""
    if "rank" not in summary:
        emit(summary)


@train.command("sft")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Chat JSONL: messages, optional quality (high|medium|low) or weight (default: built-in chats).")  # fmt: skip
@click.option("--eval-data", type=click.Path(path_type=Path), default=None,
              help="Held-out chat JSONL for the before/after loss (default: built-in held-out chats).")  # fmt: skip
@_post_training_options
@click.option("--epochs", default=SFT_DEFAULTS["epochs"], show_default=True, type=float)
@click.option(
    "--batch-size", default=SFT_DEFAULTS["batch_size"], show_default=True, help="Global batch (chats)."
)
@click.option("--lr", default=SFT_DEFAULTS["lr"], show_default=True, type=float)
@click.option(
    "--max-len", default=SFT_DEFAULTS["max_len"], show_default=True, help="Tokens per chat (truncated)."
)
@click.option("--alr-baseline", default=SFT_DEFAULTS["alr_baseline"], show_default=True,
              help="BS in ALR's lr = LR * sqrt(T / BS), in loss tokens per step.")  # fmt: skip
def train_sft(**kw: Any) -> None:
    """SFT on chats: loss on assistant tokens only, WICEL sample weights, ALR (Bielik 7B v0.1)."""
    from orlik.training import sft

    _emit_main(sft.run(**_shared(kw, SFT_TRAIN)))


@train.command("dpo")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Preference JSONL: prompt, chosen, rejected (default: built-in pairs).")  # fmt: skip
@click.option("--eval-data", type=click.Path(path_type=Path), default=None,
              help="Held-out preference JSONL (default: built-in held-out pairs).")  # fmt: skip
@_post_training_options
@click.option("--beta", default=DPO_DEFAULTS["beta"], show_default=True, type=float)
@click.option("--lambda", "lam", default=DPO_DEFAULTS["lam"], show_default=True, type=float,
              help="DPO-P penalty on the chosen answer's lost log-likelihood (0: plain DPO).")  # fmt: skip
@click.option("--epochs", default=DPO_DEFAULTS["epochs"], show_default=True, type=float)
@click.option(
    "--batch-size", default=DPO_DEFAULTS["batch_size"], show_default=True, help="Global batch (pairs)."
)
@click.option("--lr", default=DPO_DEFAULTS["lr"], show_default=True, type=float)
@click.option("--max-len", default=DPO_DEFAULTS["max_len"], show_default=True)
def train_dpo(**kw: Any) -> None:
    """DPO-Positive (Pal and others, 2024) on preference pairs, inside TRL's DPOTrainer."""
    from orlik.training import dpo

    _emit_main(dpo.run(**_shared(kw, DPO_TRAIN)))


@train.command("grpo")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Task JSONL: question, answers (default: the built-in one-word Polish task).")  # fmt: skip
@_post_training_options
@click.option("--lr", default=GRPO_DEFAULTS["lr"], show_default=True, type=float)
@click.option(
    "--generations", default=GRPO_DEFAULTS["generations"], show_default=True, help="Samples per prompt."
)
@click.option("--prompts-per-step", default=GRPO_DEFAULTS["prompts_per_step"], show_default=True)
@click.option("--max-completion", default=GRPO_DEFAULTS["max_completion"], show_default=True, help="Tokens.")
@click.option("--beta", default=GRPO_DEFAULTS["beta"], show_default=True, type=float, help="KL coefficient.")
def train_grpo(**kw: Any) -> None:
    """GRPO with a verifiable reward (TRL's GRPOTrainer): one-word Polish answers, format + correctness."""
    from orlik.training import grpo

    _emit_main(grpo.run(**_shared(kw, GRPO_TRAIN)))


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
@click.option("--force", is_flag=True, help="Replace --out even if orlik did not make it.")
def train_merge(models: tuple[Path, ...], out: Path, config: Path | None, weights: str | None,
                normalize: bool, dtype: str | None, force: bool) -> None:  # fmt: skip
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
    emit(merge.run(plan, out, force=force))


@train.command("upscale")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--layers", required=True, help="Inclusive source layer ranges, e.g. 0-23,8-31 (32 -> 48).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Deeper FP16 checkpoint dir.")
@click.option("--force", is_flag=True, help="Replace --out even if orlik did not make it.")
def train_upscale(checkpoint: Path, layers: str, out: Path, force: bool) -> None:
    """Depth up-scaling: stack layer ranges of CHECKPOINT into a deeper checkpoint (SOLAR style)."""
    from orlik.training import upscale

    summary = upscale.run(checkpoint, layers, out, force=force)
    emit({k: v for k, v in summary.items() if k != "layer_map"})

"""Defaults of the post-training verbs, in one place for their modules and the CLI (no heavy imports)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class TrainArgs:
    """The optimiser settings sft, dpo and grpo share (as litgpt's TrainArgs); each verb's defaults below."""

    steps: int | None = None  # None: from epochs (sft, dpo)
    epochs: float = 1.0
    batch_size: int = 8  # global, in chats, pairs or completions
    lr: float = 1e-4
    max_len: int = 512
    seed: int = 0

    def positive(self) -> bool:
        """Whether steps (when set), epochs, batch size, max length and learning rate are all positive."""
        steps_ok = self.steps is None or self.steps > 0
        return steps_ok and min(self.batch_size, self.max_len) > 0 and self.lr > 0 and self.epochs > 0


@dataclass(frozen=True)
class RunOptions:
    """How a post-training run executes, the same for sft, dpo and grpo: torch threads (None: cores /
    processes), the engine checkpoint interval, resuming from <out>.work, and replacing `out` even if
    orlik did not make it."""

    threads: int | None = None
    checkpoint_every: int = 100
    resume: bool = True
    force: bool = False


# SFT: Bielik's AdamW (0.9, 0.95), weight decay 0.05, cosine, clipping 1.0 and three epochs; warmup is
# min(50, steps / 10) and the learning rate suits a 9M-parameter model (see training/sft.py).
SFT_TRAIN = TrainArgs(lr=5e-4, epochs=3)
SFT_DEFAULTS: dict[str, Any] = {**asdict(SFT_TRAIN), "warmup": 50, "weight_decay": 0.05, "alr_baseline": 2048}
# DPO-P: beta as in TRL and the DPO paper, lambda as in Pal et al.'s experiments.
DPO_TRAIN = TrainArgs(lr=5e-5, epochs=2)
DPO_DEFAULTS: dict[str, Any] = {**asdict(DPO_TRAIN), "beta": 0.1, "lam": 50.0}
# GRPO: 8 samples for each of 2 prompts per step, short answers, no KL term (TRL's default beta).
GRPO_TRAIN = TrainArgs(steps=40, lr=1e-4)
GRPO_DEFAULTS: dict[str, Any] = {**asdict(GRPO_TRAIN), "generations": 8, "prompts_per_step": 2,
                                 "max_completion": 24, "beta": 0.0}  # fmt: skip

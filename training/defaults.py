"""Defaults of the post-training verbs, in one place for their modules and the CLI (no heavy imports)."""

from __future__ import annotations

from typing import Any

# SFT: Bielik's AdamW (0.9, 0.95), weight decay 0.05, cosine, clipping 1.0 and three epochs; warmup is
# min(50, steps / 10) and the learning rate suits a 9M-parameter model (see training/sft.py).
SFT_DEFAULTS: dict[str, Any] = dict(lr=5e-4, epochs=3, batch_size=8, max_len=512, warmup=50, weight_decay=0.05,
                                    alr_baseline=2048, seed=0)  # fmt: skip
# DPO-P: beta as in TRL and the DPO paper, lambda as in Pal et al.'s experiments.
DPO_DEFAULTS: dict[str, Any] = dict(beta=0.1, lam=50.0, lr=5e-5, epochs=2, batch_size=8, max_len=512, seed=0)
# GRPO: 8 samples for each of 2 prompts per step, short answers, no KL term (TRL's default beta).
GRPO_DEFAULTS: dict[str, Any] = dict(steps=40, lr=1e-4, generations=8, prompts_per_step=2, max_completion=24,
                                     beta=0.0, seed=0)  # fmt: skip

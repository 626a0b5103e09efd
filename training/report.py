"""The table `make demo-train` prints: one row per stage from each checkpoint's training.json.

python -m orlik.training.report runs/tiny/fp16 runs/tiny-train/sft runs/tiny-train/dpo runs/tiny-train/grpo
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _row(path: Path) -> list[str]:
    t: dict[str, Any] = json.loads((path / "training.json").read_text())
    verb = t.get("args", {}).get("verb", "pretrain")
    losses = t.get("losses") or []
    first = f"{losses[0]:.3f}" if losses else "-"
    last = f"{losses[-1]:.3f}" if losses else "-"
    if verb == "sft":
        held = f"assistant-token loss {t['heldout_assistant_loss_before']:.3f} -> {t['heldout_assistant_loss_after']:.3f}"
    elif verb == "dpo":
        held = (f"DPO-P loss {t['heldout_loss']:.3f}, reward accuracy {t['heldout_reward_accuracy']:.2f}, "
                f"chosen log-ratio {t['heldout_chosen_logratio']:+.2f}")  # fmt: skip
    elif verb == "grpo":
        held = f"mean reward {t['mean_reward_before']:.3f} -> {t['mean_reward_after']:.3f} (of 2)"
        rewards = [r["reward"] for r in t.get("log", []) if "reward" in r]
        first, last = (f"r={rewards[0]:.2f}", f"r={rewards[-1]:.2f}") if rewards else ("-", "-")
    else:
        held = f"PPL {t['heldout']['all']['ppl']:.1f} (unigram {t['heldout']['all']['unigram_ppl']:.1f})"
    return [verb, str(t.get("steps", "-")), first, last, held, f"{t.get('train_seconds', 0):.0f}"]


def table(paths: list[Path]) -> str:
    head = ["stage", "steps", "first", "last", "held-out", "train s"]
    rows = [head, ["---"] * len(head)] + [_row(Path(p)) for p in paths]
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


if __name__ == "__main__":
    print(table([Path(p) for p in sys.argv[1:]]))

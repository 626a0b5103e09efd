"""`orlik chat`: the terminal chat streams greedy replies that match transformers' own generate,
through the checkpoint's chat template, and keeps the conversation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TURNS = ["Cześć!", "A jak masz na imię?"]


def _reference(checkpoint: Path, n: int) -> list[str]:
    """What transformers' greedy generate answers, turn by turn, with the same template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    eos = tok.eos_token_id
    msgs: list[dict[str, str]] = []
    out = []
    for turn in TURNS:
        msgs.append({"role": "user", "content": turn})
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tok.encode(text, add_special_tokens=False)
        with torch.inference_mode():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                                 pad_token_id=eos)[0, len(ids):].tolist()  # fmt: skip
        if eos in gen:
            gen = gen[: gen.index(eos)]
        reply = tok.decode(ids[-5:] + gen)[len(tok.decode(ids[-5:])) :]
        out.append(reply)
        msgs.append({"role": "assistant", "content": reply})
    return out


def test_orlik_chat_streams_replies_with_history(tiny_checkpoint: Path) -> None:
    n = 12
    run = subprocess.run(
        [sys.executable, "-m", "orlik", "chat", str(tiny_checkpoint), "--temperature", "0", "--max-tokens", str(n)],
        input="\n".join(TURNS) + "\n/exit\n", capture_output=True, text=True, timeout=600,
        env={k: v for k, v in os.environ.items() if k != "ORLIK_QUIET"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    # Piped (not a terminal): no prompts, just each reply on its own line.
    assert run.stdout == "".join(r + "\n" for r in _reference(tiny_checkpoint, n))
    assert run.stderr.count("tok/s") == len(TURNS)  # a speed line after each reply
    assert "Loading weights" not in run.stderr  # no library progress bars in the chat

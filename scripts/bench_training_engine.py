"""Pretraining speed: transformers' Trainer (what `orlik train pretrain` runs) against the hand-written
loop it replaced, side by side in one process on the same batches, model and thread count.

    .venv/bin/python scripts/bench_training_engine.py --steps 30 --rounds 2 --threads 2

An uncounted 2-step warm-up of each comes first; then rounds alternate (loop, engine, loop, engine,
...) so that load from other processes falls on both, and the medians are compared.
Tokens/s counts trained next-token predictions (steps x batch x seq) over the training loop's wall
time, and over its CPU time (with one thread, the figure that other processes on a shared machine
disturb least); model construction, tokenization and export are outside the clock for both.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def hand_written_loop(
    model: Any, stream: np.ndarray, steps: int, bs: int, seq: int, lr: float, seed: int
) -> float:
    """The loop `orlik train pretrain` ran before it moved to the Trainer (orlik 0.x), minus checkpoints."""
    import torch

    from orlik.training.pretrain import batch_starts

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)  # fmt: skip
    warmup = max(1, steps // 20)
    model.train()
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(steps):
        if step < warmup:
            cur = lr * (step + 1) / warmup
        else:
            cur = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))
        for g in opt.param_groups:
            g["lr"] = cur
        starts = batch_starts(len(stream), seed, step, bs, seq)
        t = torch.from_numpy(np.stack([stream[s : s + seq + 1] for s in starts]))
        x, y = t[:, :-1], t[:, 1:]
        logits = model(x, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        float(loss.detach())
    return time.perf_counter() - t0, time.process_time() - c0


def engine_loop(
    model: Any, stream: np.ndarray, steps: int, bs: int, seq: int, lr: float, seed: int
) -> tuple[float, float]:
    """The same steps through pretrain's Trainer setup (no checkpoint falls inside the run)."""
    from transformers import Trainer, default_data_collator

    from orlik.training import engine
    from orlik.training.pretrain import StepBatches

    with tempfile.TemporaryDirectory() as work:
        targs = engine.training_args(
            Path(work), seed=seed, steps=steps, batch_size=bs, lr=lr, adam_beta1=0.9, adam_beta2=0.95,
            weight_decay=0.1, max_grad_norm=1.0, lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=max(1, steps // 20), save_steps=10**9,
            include_num_input_tokens_seen="all",
        )  # fmt: skip
        trainer = Trainer(model=model, args=targs, train_dataset=StepBatches(stream, seed, steps, bs, seq),
                          data_collator=default_data_collator)  # fmt: skip
        bar = engine.ProgressBar("engine")
        engine.install(trainer, bar)
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train()
        return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--tokenizer", type=Path, default=None, help="default: train one (vocab 8000) in a temp dir"
    )
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orlik import corpus
    from orlik.training import configs, pretrain, tokenizer

    torch.set_num_threads(a.threads)
    tmp = tempfile.TemporaryDirectory()
    tok_dir = a.tokenizer or Path(tmp.name) / "tok"
    if a.tokenizer is None:
        tokenizer.build(tok_dir)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    stream = pretrain.encode_stream(tok, pretrain.training_texts(tok, "llama", corpus.DATA_DIR))
    tokens = a.steps * a.batch_size * a.seq_len
    names = ("hand-written loop", "Trainer")
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    load = [os.getloadavg()[0]]  # the 1-minute load average before and after each counted run
    for r in range(a.rounds + 1):
        for name, fn in zip(names, (hand_written_loop, engine_loop), strict=True):
            torch.manual_seed(0)
            cfg = configs.make_config("llama", "tiny", len(tok), bos=tok.bos_token_id, eos=tok.eos_token_id,
                                      pad=tok.pad_token_id)  # fmt: skip
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
            if r == 0:  # warm-up round, not counted: first-call costs (allocator, kernels, imports)
                fn(model, stream, 2, a.batch_size, a.seq_len, 3e-3, 0)
                continue
            w, c = fn(model, stream, a.steps, a.batch_size, a.seq_len, 3e-3, 0)
            wall[name].append(tokens / w)
            cpu[name].append(tokens / c)
            load.append(os.getloadavg()[0])
            print(f"{name:>18}: {wall[name][-1]:,.0f} tok/s wall, {cpu[name][-1]:,.0f} tok/s of CPU time "
                  f"(load average {load[-1]:.1f})", flush=True)  # fmt: skip
    med = {k: {n: float(np.median(v[n])) for n in names} for k, v in (("wall", wall), ("cpu", cpu))}
    print(json.dumps({"steps": a.steps, "rounds": a.rounds, "batch": a.batch_size, "seq": a.seq_len,
                      "threads": a.threads, "loop_tok_s": round(med["wall"][names[0]]),
                      "engine_tok_s": round(med["wall"][names[1]]),
                      "ratio_wall": round(med["wall"][names[1]] / med["wall"][names[0]], 3),
                      "loop_tok_per_cpu_s": round(med["cpu"][names[0]]),
                      "engine_tok_per_cpu_s": round(med["cpu"][names[1]]),
                      "ratio_cpu": round(med["cpu"][names[1]] / med["cpu"][names[0]], 3),
                      "ratio_wall_per_round": [round(e / lp, 2) for lp, e in zip(*wall.values(), strict=True)],
                      "load_average": [min(load), round(float(np.median(load)), 1), max(load)],
                      "cores": os.cpu_count()}))  # fmt: skip


if __name__ == "__main__":
    main()

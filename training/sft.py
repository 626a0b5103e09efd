"""Supervised fine-tuning on chats (`orlik train sft`), as the Bielik models were tuned: the loss only on
the assistant's tokens, each sample weighted by its quality (WICEL), the learning rate scaled by the
step's loss tokens (ALR). transformers' Trainer runs it (one process, torchrun or accelerate launch).

Paper defaults (Bielik 7B v0.1 / 11B v2): AdamW (0.9, 0.95), weight decay 0.05, cosine decay, warmup
50 steps, gradient clipping 1.0, three epochs. orlik keeps all of them except the step counts, which it
scales to the data: warmup is min(50, steps / 10), so a 60-step tiny run does not spend most of
itself warming up, and the learning rate suits a 9M-parameter model (5e-4) rather than a 7B one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from orlik.errors import InputError
from orlik.training import chats, engine
from orlik.training.defaults import SFT_DEFAULTS, SFT_TRAIN, RunOptions, TrainArgs

DEFAULTS = SFT_DEFAULTS


def wicel_loss(logits: Any, labels: Any, weights: Any, num_items: Any = None) -> Any:
    """Weighted instruction cross-entropy (Bielik 7B v0.1, eq. 3 and 6).

    Each loss token t of sample i costs w_i * (-log p(y_t)); the batch loss is

        L = sum_i w_i * sum_{t in A_i} -log p(y_t | y_<t)  /  N,   N = sum_i |A_i|

    where A_i are sample i's assistant tokens and N counts the loss tokens of the whole step (all
    micro-batches and processes: the engine's `num_items_in_batch`). N is not weighted, so with every
    w_i = 1 this is exactly the masked cross-entropy, and the gradient is linear in each w_i: a sample
    at weight 0.5 pulls half as hard as the same sample at 1.0 (dividing by sum w_i |A_i| instead
    would cancel a lone sample's weight).
    """
    import torch.nn.functional as F

    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                          ignore_index=chats.IGNORE, reduction="none").view(shift_labels.shape)  # fmt: skip
    n = num_items if num_items is not None else (shift_labels != chats.IGNORE).sum()
    return (nll * weights.to(nll.dtype)[:, None]).sum() / n


def alr(lr: float, tokens: float, baseline: float) -> float:
    """Adaptive learning rate (Bielik 7B v0.1, eq. 1): LR * sqrt(T / BS), T the step's loss tokens."""
    return lr * math.sqrt(tokens / baseline)


def _trainer_classes() -> tuple[type, type]:
    from transformers import Trainer, TrainerCallback

    class WicelTrainer(Trainer):
        """The Trainer with WICEL as its loss; it remembers the step's loss-token count for ALR."""

        step_tokens: float = 0.0

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:  # fmt: skip
            weights, labels = inputs.pop("weight"), inputs.pop("labels")
            out = model(**inputs, use_cache=False)
            if num_items_in_batch is None:
                num_items_in_batch = (labels[:, 1:] != chats.IGNORE).sum()
            self.step_tokens = float(num_items_in_batch)
            loss = wicel_loss(out.logits, labels, weights, num_items_in_batch)
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
            return (loss, out) if return_outputs else loss

    class AdaptiveLR(TrainerCallback):
        """Scales the scheduled learning rate by sqrt(T / BS) just before each optimizer step (the
        scheduler sets the plain value again after it) and logs the rate used."""

        def __init__(self, trainer: Any, baseline: float, bar: engine.ProgressBar) -> None:
            self.trainer, self.baseline, self.bar, self.rows = trainer, baseline, bar, []

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None,
                                  **kw: Any) -> None:  # fmt: skip
            tokens = self.trainer.step_tokens
            for g in optimizer.param_groups:
                g["lr"] = alr(g["lr"], tokens, self.baseline)
            used = optimizer.param_groups[0]["lr"]
            self.rows.append({"step": state.global_step + 1, "loss_tokens": int(tokens), "lr": used})
            self.bar.extra["alr"] = f"{used:.2e}"

    return WicelTrainer, AdaptiveLR


class StepChats:
    """Chats in batches that are a function of (seed, step): epoch e reads the chats in the order of
    permutation rng([seed, e]); item i is the (i % bs)-th chat of step i // bs."""

    def __init__(self, examples: list[dict[str, Any]], seed: int, steps: int, bs: int) -> None:
        self.examples, self.seed, self.steps, self.bs = examples, seed, steps, bs

    def __len__(self) -> int:
        return self.steps * self.bs

    def __getitem__(self, i: int) -> dict[str, Any]:
        epoch, k = divmod(i, len(self.examples))
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
        return self.examples[int(order[k])]


def collate(pad_id: int) -> Any:
    def fn(rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), n), chats.IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[i, :k], labels[i, :k], mask[i, :k] = (
                torch.tensor(r["input_ids"]),
                torch.tensor(r["labels"]),
                1,
            )
        weight = torch.tensor([r["weight"] for r in rows], dtype=torch.float32)
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "weight": weight}

    return fn


def encode(tok: Any, items: list[dict[str, Any]], max_len: int) -> list[dict[str, Any]]:
    out = []
    for n, c in enumerate(items):
        e = chats.encode_chat(tok, c["messages"], max_len, where=f"chat {n + 1}")
        if any(lbl != chats.IGNORE for lbl in e["labels"][1:]):  # truncation may cut every answer off
            out.append({**e, "weight": c["weight"]})
    return out


def assistant_loss(model: Any, examples: list[dict[str, Any]]) -> float:
    """Mean next-token loss over the assistant tokens of `examples` (weights ignored)."""
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for e in examples:
            ids, labels = torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]])
            logits = model(input_ids=ids, use_cache=False).logits
            n = int((labels[:, 1:] != chats.IGNORE).sum())
            total += float(wicel_loss(logits, labels, torch.ones(1), n)) * n
            count += n
    return total / max(1, count)


def run(
    checkpoint: Path,
    out: Path,
    data: Path | None = None,
    eval_data: Path | None = None,
    train: TrainArgs = SFT_TRAIN,
    alr_baseline: int = DEFAULTS["alr_baseline"],
    opts: RunOptions = RunOptions(),
) -> dict[str, Any]:
    """SFT of `checkpoint` on chat JSONL `data` (default: the built-in Polish chats) into FP16 `out`.

    Reports the held-out chats' assistant-token loss before and after (`eval_data`, default the
    built-in held-out chats). `train.batch_size` is the global batch in chats."""
    out = Path(out)
    work = engine.claim_out(out, force=opts.force)
    if not train.positive() or alr_baseline <= 0:
        raise InputError(
            "steps, epochs, batch size, max length, ALR baseline and learning rate must be positive"
        )
    ckpt = engine.open_chat_checkpoint(checkpoint)
    train_chats, held_chats = chats.load_chats(data), chats.load_chats(eval_data, split="heldout")
    engine.set_threads(opts.threads)
    tok = ckpt.load_tokenizer()
    train_ex, held_ex = encode(tok, train_chats, train.max_len), encode(tok, held_chats, train.max_len)
    if not train_ex:
        raise InputError(f"no chat keeps an assistant token within --max-len {train.max_len}")
    steps = train.steps or max(1, math.ceil(train.epochs * len(train_ex) / train.batch_size))
    settings = dict(verb="sft", checkpoint=ckpt.hash, data=str(data), steps=steps, batch_size=train.batch_size,
                    lr=train.lr, max_len=train.max_len, alr_baseline=alr_baseline, seed=train.seed,
                    chats=len(train_ex))  # fmt: skip
    targs = _training_args(work, settings, opts)
    model = ckpt.load_model()
    before = assistant_loss(model, held_ex) if engine.is_main() else None
    data_steps = StepChats(train_ex, train.seed, steps, train.batch_size)
    bar, alr_rows = _train(model, tok, targs, data_steps, settings, opts.resume)
    if not engine.is_main():
        return {"rank": engine.world()[0]}
    after = assistant_loss(model, held_ex)
    summary = {
        "base": str(ckpt.path),
        "steps": steps,
        "processes": engine.world()[1],
        "train_chats": len(train_ex),
        "heldout_chats": len(held_ex),
        "heldout_assistant_loss_before": round(before, 4) if before is not None else None,
        "heldout_assistant_loss_after": round(after, 4),
        "final_loss": bar.losses()[-1] if bar.losses() else None,
        "train_seconds": round(bar.seconds, 1),
        "tokens_per_second": round(bar.tokens_per_second, 1) if bar.tokens_per_second else None,
    }
    report = {**summary, "args": settings, "losses": bar.losses(), "alr": alr_rows}
    engine.export_from(ckpt.path, model, out, report, force=opts.force)
    engine.finish(work)
    return summary


def _training_args(work: Path, s: dict[str, Any], opts: RunOptions) -> Any:
    """Bielik's optimiser settings for `s` (the run's settings) on transformers' Trainer."""
    return engine.training_args(
        work, seed=s["seed"], steps=s["steps"], batch_size=s["batch_size"], lr=s["lr"], adam_beta1=0.9,
        adam_beta2=0.95, weight_decay=DEFAULTS["weight_decay"], max_grad_norm=1.0, lr_scheduler_type="cosine",
        warmup_steps=min(DEFAULTS["warmup"], max(1, s["steps"] // 10)), save_steps=opts.checkpoint_every,
        include_num_input_tokens_seen="non_padding",
    )  # fmt: skip


def _train(model: Any, tok: Any, targs: Any, data: StepChats, settings: dict[str, Any],
           resume: bool) -> tuple[engine.ProgressBar, list[dict[str, Any]]]:  # fmt: skip
    wicel_trainer, adaptive_lr = _trainer_classes()
    ckpt = engine.resume_point(Path(targs.output_dir), settings, resume)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    trainer = wicel_trainer(model=model, args=targs, train_dataset=data, data_collator=collate(pad))
    bar = engine.ProgressBar("sft", fields=("alr",))
    engine.install(trainer, bar)
    cb = adaptive_lr(trainer, settings["alr_baseline"], bar)
    trainer.add_callback(cb)
    model.train()
    trainer.train(resume_from_checkpoint=ckpt)
    model.eval()
    return bar, cb.rows

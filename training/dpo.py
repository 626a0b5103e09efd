"""DPO-Positive (`orlik train dpo`): preference tuning with the loss of Pal et al. 2024
(arXiv 2402.13228), as the Bielik 11B v2 report uses it, inside TRL's DPOTrainer.

    L = -log sigma( beta * [ log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l)
                             - lambda * max(0, log pi_ref(y_w)/pi(y_w)) ] )

Plain DPO only widens the margin between the two answers, so it can lower the chosen answer's
likelihood as long as the rejected one falls faster (Pal et al., section 3); the lambda term charges for
every nat the chosen answer loses against the reference. Defaults: beta 0.1 (TRL's and the DPO paper's),
lambda 50 (Pal et al.'s experiments). lambda = 0 is plain DPO.

TRL does the rest: the chat template, prompt/completion masks, the frozen reference (its log-probs are
computed once before training, so no second model is held during it), logging and checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from orlik.checkpoint import Checkpoint
from orlik.errors import InputError
from orlik.training import chats, engine
from orlik.training.defaults import DPO_DEFAULTS, DPO_TRAIN, RunOptions, TrainArgs

DEFAULTS = DPO_DEFAULTS


def dpop_loss(pc: Any, pr: Any, rc: Any, rr: Any, beta: float, lam: float) -> Any:
    """Per-pair DPO-P loss from the summed completion log-probs of the policy (pc, pr: chosen,
    rejected) and of the reference (rc, rr)."""
    import torch
    import torch.nn.functional as F

    margin = (pc - rc) - (pr - rr) - lam * torch.clamp(rc - pc, min=0)
    return -F.logsigmoid(beta * margin)


def _trainer_class() -> type:
    from trl import DPOTrainer

    class DPOPTrainer(DPOTrainer):
        """TRL's DPOTrainer with DPO-P as its loss; reference log-probs come precomputed."""

        dpop_lambda = DEFAULTS["lam"]

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:  # fmt: skip
            mode = "train" if self.model.training else "eval"
            mask = inputs["completion_mask"]
            kw = {k: v for k, v in inputs.items() if k not in ("completion_mask", "ref_chosen_logps",
                                                               "ref_rejected_logps")}  # fmt: skip
            labels = inputs["input_ids"].masked_fill(mask == 0, -100)
            # TRL's fused head: per-token log-probs of the labels without the full logits.
            out = model(**kw, labels=labels, use_cache=False, fused_lm_head=True)
            shift = mask[:, 1:]
            logps = (out.log_probs[:, -shift.size(1) :] * shift).sum(dim=1)
            pc, pr = logps.chunk(2, dim=0)  # TRL's collator stacks [chosen; rejected]
            rc, rr = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            loss = dpop_loss(pc, pr, rc, rr, self.beta, self.dpop_lambda).mean()
            m, gather = self._metrics[mode], self.accelerator.gather
            with_ref = {"chosen": (pc - rc).detach(), "rejected": (pr - rr).detach()}
            m["rewards/chosen"].append(gather(self.beta * with_ref["chosen"]).mean().item())
            m["rewards/rejected"].append(gather(self.beta * with_ref["rejected"]).mean().item())
            m["rewards/accuracies"].append(
                gather((with_ref["chosen"] > with_ref["rejected"]).float()).mean().item()
            )
            m["logps/chosen"].append(gather(pc.detach()).mean().item())
            m["logps/rejected"].append(gather(pr.detach()).mean().item())
            m["dpop/penalty"].append(gather((rc - pc).clamp(min=0).detach()).mean().item())
            return (loss, out) if return_outputs else loss

    return DPOPTrainer


def ordered(rows: list[dict[str, Any]], seed: int, steps: int, bs: int) -> list[dict[str, Any]]:
    """steps x bs rows: the batches as a function of (seed, step), epoch e in the order of
    permutation rng([seed, e]); read in sequence by the engine."""
    out: list[dict[str, Any]] = []
    epoch = 0
    while len(out) < steps * bs:
        out += [rows[int(i)] for i in np.random.default_rng([seed, epoch]).permutation(len(rows))]
        epoch += 1
    return out[: steps * bs]


def run(
    checkpoint: Path,
    out: Path,
    data: Path | None = None,
    eval_data: Path | None = None,
    beta: float = DEFAULTS["beta"],
    lam: float = DEFAULTS["lam"],
    train: TrainArgs = DPO_TRAIN,
    opts: RunOptions = RunOptions(),
) -> dict[str, Any]:
    """DPO-P of `checkpoint` on preference pairs (default: the built-in ones) into FP16 `out`."""
    import math

    out = Path(out)
    work = engine.claim_out(out, force=opts.force)
    if beta <= 0 or lam < 0:
        raise InputError("beta must be positive and lambda non-negative")
    if not train.positive():
        raise InputError("steps, epochs, batch size, max length and learning rate must be positive")
    ckpt = engine.open_chat_checkpoint(checkpoint)
    pairs, held = chats.load_preferences(data), chats.load_preferences(eval_data, split="heldout")
    engine.set_threads(opts.threads)
    steps = train.steps or max(1, math.ceil(train.epochs * len(pairs) / train.batch_size))
    settings = dict(verb="dpo", checkpoint=ckpt.hash, data=str(data), beta=beta, lam=lam, steps=steps,
                    batch_size=train.batch_size, lr=train.lr, max_len=train.max_len, seed=train.seed,
                    pairs=len(pairs))  # fmt: skip
    rows = ordered(pairs, train.seed, steps, train.batch_size)
    trainer, bar = _trainer(ckpt, work, settings, rows, held, opts.checkpoint_every)
    trainer.train(resume_from_checkpoint=engine.resume_point(work, settings, opts.resume))
    metrics = trainer.evaluate()
    if not engine.is_main():
        return {"rank": engine.world()[0]}
    summary = {
        "base": str(ckpt.path),
        "steps": steps,
        "beta": beta,
        "lambda": lam,
        "processes": engine.world()[1],
        "first_loss": bar.losses()[0] if bar.losses() else None,
        "final_loss": bar.losses()[-1] if bar.losses() else None,
        "heldout_pairs": len(held),
        "heldout_loss": round(metrics["eval_loss"], 4),
        "heldout_reward_accuracy": round(metrics["eval_rewards/accuracies"], 3),
        "heldout_chosen_logratio": round(metrics["eval_rewards/chosen"] / beta, 3),
        "train_seconds": round(bar.seconds, 1),
    }
    report = {**summary, "args": settings, "losses": bar.losses(), "log": bar.rows}
    trainer.model.eval()
    engine.export_from(ckpt.path, trainer.model, out, report, force=opts.force)
    engine.finish(work)
    return summary


def _trainer(ckpt: Checkpoint, work: Path, s: dict[str, Any], rows: list[dict[str, Any]],
             held: list[dict[str, Any]], checkpoint_every: int) -> tuple[Any, engine.ProgressBar]:  # fmt: skip
    import torch
    from datasets import Dataset
    from trl import DPOConfig

    targs = engine.training_args(
        work, cls=DPOConfig, seed=s["seed"], steps=s["steps"], batch_size=s["batch_size"], lr=s["lr"],
        beta=s["beta"], loss_type=["sigmoid"], precompute_ref_log_probs=True, max_length=s["max_len"],
        adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.05, max_grad_norm=1.0, lr_scheduler_type="cosine",
        warmup_steps=min(50, max(1, s["steps"] // 10)), save_steps=checkpoint_every,
        bf16=torch.cuda.is_available(), gradient_checkpointing=False, per_device_eval_batch_size=s["batch_size"],
        remove_unused_columns=True, include_num_input_tokens_seen="non_padding",
    )  # fmt: skip
    trainer_cls = _trainer_class()
    trainer = trainer_cls(model=ckpt.load_model(), args=targs, processing_class=ckpt.load_tokenizer(),
                          train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(held))  # fmt: skip
    trainer.dpop_lambda = s["lam"]
    bar = engine.ProgressBar(f"dpo-p (lambda {s['lam']:g})")
    engine.install(trainer, bar)
    return trainer, bar

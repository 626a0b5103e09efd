"""GRPO (`orlik train grpo`): reinforcement learning with a verifiable reward, on TRL's GRPOTrainer, as
Bielik v3 used it after SFT and DPO-P.

The built-in task is small, Polish and checkable by a program: a question that asks for a one-word
answer ("Odpowiedz jednym słowem."). The reward is

    format  1.0 for exactly one word, 0.5 for two or three, 0 otherwise (or for nothing)
  + answer  1.0 when that first word is an accepted answer (case and diacritics as written)

so it lies in [0, 2]. A user's own task is a JSONL of {"question": ..., "answers": [...]}.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from orlik.errors import InputError
from orlik.training import chats, engine
from orlik.training.defaults import GRPO_DEFAULTS, GRPO_TRAIN, RunOptions, TrainArgs

DEFAULTS = GRPO_DEFAULTS
INSTRUCTION = "Odpowiedz jednym słowem."
# (question, accepted answers): general knowledge a Polish chat model should carry.
TASK: list[tuple[str, list[str]]] = [
    ("Jaka jest stolica Polski?", ["Warszawa"]),
    ("Jak nazywa się najdłuższa rzeka w Polsce?", ["Wisła"]),
    ("Jakiego koloru jest trawa latem?", ["zielona", "zielony", "zielonego"]),
    ("Ile nóg ma pies? Podaj liczbę słownie.", ["cztery"]),
    ("Jak nazywa się największe jezioro w Polsce?", ["Śniardwy"]),
    ("W jakim mieście stoi Wawel?", ["Kraków", "Krakowie"]),
    ("Jakie zwierzę szczeka?", ["pies"]),
    ("Jaki miesiąc następuje po styczniu?", ["luty"]),
    ("Jak nazywa się pora roku po zimie?", ["wiosna"]),
    ("Jakiego koloru jest śnieg?", ["biały", "biała", "białego"]),
    ("Ile to dwa plus dwa? Podaj liczbę słownie.", ["cztery"]),
    ("W jakim mieście mieszka najwięcej Polaków?", ["Warszawa", "Warszawie"]),
    ("Jak nazywa się morze nad Polską?", ["Bałtyk", "Bałtyckie"]),
    ("Jaki dzień tygodnia następuje po poniedziałku?", ["wtorek"]),
    ("Jak nazywają się góry na południu Polski?", ["Tatry", "Karpaty", "Sudety"]),
    ("Czym pisze się na tablicy szkolnej?", ["kredą", "kreda"]),
    ("Jakie zwierzę daje mleko na wsi?", ["krowa"]),
    ("Jaki napój pije się rano z kofeiną?", ["kawa", "kawę"]),
    ("Jak nazywa się stolica Niemiec?", ["Berlin"]),
    ("Ile dni ma tydzień? Podaj liczbę słownie.", ["siedem"]),
    ("Jakiego koloru jest niebo w pogodny dzień?", ["niebieskie", "niebieski", "błękitne"]),
    ("Jak nazywa się polska waluta?", ["złoty", "złotówka"]),
    ("Jaki owoc jest żółty i wygięty?", ["banan"]),
    ("Co świeci na niebie w dzień?", ["słońce"]),
]
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)


def _text(completion: Any) -> str:
    """A completion as TRL passes it: a string, or a list of messages (conversational data)."""
    if isinstance(completion, list):
        return " ".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)


def reward(completions: list[Any], answers: list[list[str]], **_: Any) -> list[float]:
    """TRL reward function: format (one word) plus correctness, per completion; see the module doc."""
    out = []
    for c, ok in zip(completions, answers, strict=True):
        words = _WORD.findall(_text(c))
        fmt = 1.0 if len(words) == 1 else 0.5 if 2 <= len(words) <= 3 else 0.0
        right = 1.0 if words and words[0].lower() in {a.lower() for a in ok} else 0.0
        out.append(fmt + right)
    return out


def load_task(path: Path | None) -> list[dict[str, Any]]:
    """Task rows in TRL's conversational prompt format, with their accepted answers."""
    items: list[tuple[str, list[str]]] = []
    if path is None:
        items = TASK
    else:
        for n, rec in chats.read_jsonl(path):
            q, a = rec.get("question"), rec.get("answers")
            if not isinstance(q, str) or not q.strip():
                raise InputError(f"{path}:{n}: missing 'question'")
            if not isinstance(a, list) or not a or not all(isinstance(x, str) and x.strip() for x in a):
                raise InputError(f"{path}:{n}: 'answers' must be a non-empty list of strings")
            items.append((q, a))
    return [{"prompt": [{"role": "user", "content": f"{q} {INSTRUCTION}"}], "answers": a} for q, a in items]


def mean_reward(model: Any, tok: Any, rows: list[dict[str, Any]], k: int, max_new: int, seed: int) -> float:
    """Mean reward of k sampled answers per prompt, sampling seeded by (seed, prompt index): the same
    draws before and after training, so the two means compare the policies, not the luck."""
    import torch

    model.eval()
    total, n = 0.0, 0
    for i, row in enumerate(rows):
        ids = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)  # fmt: skip
        torch.manual_seed(seed * 100_003 + i)
        with torch.inference_mode():
            gen = model.generate(**ids, do_sample=True, temperature=1.0, top_p=1.0, max_new_tokens=max_new,
                                 num_return_sequences=k, pad_token_id=tok.pad_token_id or tok.eos_token_id)  # fmt: skip
        texts = tok.batch_decode(gen[:, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        total += sum(reward(texts, [row["answers"]] * k))
        n += k
    return total / n


def run(
    checkpoint: Path,
    out: Path,
    data: Path | None = None,
    generations: int = DEFAULTS["generations"],
    prompts_per_step: int = DEFAULTS["prompts_per_step"],
    max_completion: int = DEFAULTS["max_completion"],
    beta: float = DEFAULTS["beta"],
    train: TrainArgs = GRPO_TRAIN,
    opts: RunOptions = RunOptions(),
) -> dict[str, Any]:
    """GRPO of `checkpoint` on the one-word Polish task (or `data`) into FP16 `out`; reports the mean
    reward on the task's prompts before and after, over the same seeded samples."""
    out = Path(out)
    work = engine.claim_out(out, force=opts.force)
    steps = DEFAULTS["steps"] if train.steps is None else train.steps
    lr, seed = train.lr, train.seed
    if (
        min(steps, generations, prompts_per_step, max_completion) <= 0
        or lr <= 0
        or beta < 0
        or generations < 2
    ):
        raise InputError("steps, prompts per step, completion length and learning rate must be positive, "
                         "generations at least 2 (GRPO compares them) and beta non-negative")  # fmt: skip
    ckpt = engine.open_chat_checkpoint(checkpoint)
    rows = load_task(data)
    engine.set_threads(opts.threads)
    tok, model = ckpt.load_tokenizer(), ckpt.load_model()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    before = mean_reward(model, tok, rows, 4, max_completion, seed) if engine.is_main() else None
    settings = dict(verb="grpo", checkpoint=ckpt.hash, data=str(data), steps=steps, lr=lr, generations=generations,
                    prompts_per_step=prompts_per_step, max_completion=max_completion, beta=beta, seed=seed)  # fmt: skip
    trainer, bar = _trainer(model, tok, work, settings, rows, opts.checkpoint_every)
    trainer.train(resume_from_checkpoint=engine.resume_point(work, settings, opts.resume))
    if not engine.is_main():
        return {"rank": engine.world()[0]}
    after = mean_reward(model, tok, rows, 4, max_completion, seed)
    rewards = [r["reward"] for r in bar.rows if "reward" in r]
    summary = {
        "base": str(ckpt.path),
        "steps": steps,
        "processes": engine.world()[1],
        "prompts": len(rows),
        "mean_reward_before": round(before, 3) if before is not None else None,
        "mean_reward_after": round(after, 3),
        "first_step_reward": rewards[0] if rewards else None,
        "last_step_reward": rewards[-1] if rewards else None,
        "train_seconds": round(bar.seconds, 1),
    }
    engine.export_from(
        ckpt.path, model, out, {**summary, "args": settings, "log": bar.rows}, force=opts.force
    )
    engine.finish(work)
    return summary


def _trainer(model: Any, tok: Any, work: Path, s: dict[str, Any], rows: list[dict[str, Any]],
             checkpoint_every: int) -> tuple[Any, engine.ProgressBar]:  # fmt: skip
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    batch = s["generations"] * s["prompts_per_step"]  # completions per step, over all processes
    targs = engine.training_args(
        work, cls=GRPOConfig, seed=s["seed"], steps=s["steps"], batch_size=batch, lr=s["lr"],
        num_generations=s["generations"], max_completion_length=s["max_completion"], beta=s["beta"],
        temperature=1.0, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0,
        lr_scheduler_type="constant_with_warmup", warmup_steps=min(5, s["steps"] // 10), save_steps=checkpoint_every,
        bf16=torch.cuda.is_available(), gradient_checkpointing=False, train_sampling_strategy="random",
        remove_unused_columns=False,
    )  # fmt: skip
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=targs, train_dataset=Dataset.from_list(rows),
                          processing_class=tok)  # fmt: skip
    bar = engine.ProgressBar("grpo", fields=("reward",))
    engine.install(trainer, bar)
    return trainer, bar

"""Pretrain a tiny llama/mistral/qwen2 model on the corpus on CPU and export an FP16 checkpoint.

AdamW (0.9/0.95), linear warmup then cosine decay, gradient clipping, periodic resumable
checkpoints. Batches are a pure function of (seed, step), so a resumed run continues the exact
loss curve of an uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from orlik import corpus, owner, progress
from orlik.checkpoint import Checkpoint
from orlik.errors import InputError, UnknownNameError
from orlik.fsutil import atomic_dir, atomic_write_text
from orlik.training import configs, engine, evaluate, tokenizer

TRAINING_JSON = engine.TRAINING_JSON  # written last into every checkpoint orlik trains: its mark too
WORK_MARK = "state/meta.json"  # the resumable state of <out>.work, orlik's since before the .orlik mark
DEFAULTS = {
    "tiny": {"steps": 240, "batch_size": 16, "seq_len": 256, "lr": 3e-3},
    "small": {"steps": 2000, "batch_size": 16, "seq_len": 512, "lr": 6e-4},
    "base": {"steps": 120, "batch_size": 4, "seq_len": 128, "lr": 2e-3},
}


def training_texts(tok: Any, arch: str, root: Path) -> list[str]:
    """Train-split documents and parallel pairs, plus chats rendered through the arch's template."""
    texts = [d.text for d in corpus.documents(split="train", root=root)]
    if (root / "parallel.jsonl").is_file():
        texts += [f"{p['pl']}\n{p['en']}" for p in corpus.parallel(split="train", root=root)]
    if (root / "chat.jsonl").is_file():
        tpl = configs.chat_template(arch)
        for c in corpus.chats(split="train", root=root):
            texts.append(tok.apply_chat_template(c["messages"], chat_template=tpl, tokenize=False))
    return texts


def encode_stream(tok: Any, texts: list[str]) -> np.ndarray:
    ids: list[int] = []
    for t in texts:
        # Rendered chats carry their own <s>; special markers parse as single tokens.
        ids += [*tok.encode(t, add_special_tokens=False), tok.eos_token_id]
    return np.asarray(ids, dtype=np.int64)


def batch_starts(stream_len: int, seed: int, step: int, bs: int, seq: int) -> np.ndarray:
    """Where each of the step's `bs` windows starts: a pure function of (seed, step)."""
    return np.random.default_rng([seed, step]).integers(0, stream_len - seq - 1, size=bs)


class StepBatches:
    """A map-style dataset whose item i is window i % bs of step i // bs's batch.

    Read in order (the engine's sequential sampler), step s's global batch is exactly the windows
    `batch_starts(seed, s)` names, however many processes share it: each launched process takes its
    own slice of the same global batch. Each window is seq + 1 tokens; the model shifts the labels,
    so every window trains `seq` next-token predictions.
    """

    def __init__(self, stream: np.ndarray, seed: int, steps: int, bs: int, seq: int) -> None:
        self.stream, self.seed, self.steps, self.bs, self.seq = stream, seed, steps, bs, seq

    def __len__(self) -> int:
        return self.steps * self.bs

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        step, j = divmod(i, self.bs)
        s = int(batch_starts(len(self.stream), self.seed, step, self.bs, self.seq)[j])
        x = torch.from_numpy(self.stream[s : s + self.seq + 1])
        return {"input_ids": x, "labels": x}


def run(
    out: Path,
    arch: str = "llama",
    size: str = "tiny",
    tokenizer_dir: Path | None = None,
    corpus_dir: Path | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    threads: int | None = None,
    checkpoint_every: int = 200,
    resume: bool = True,
    force: bool = False,
    init: Path | None = None,
) -> dict[str, Any]:
    """Pretrain from scratch on the engine and export the FP16 checkpoint (the main process writes).

    `batch_size` is the global batch, whatever the number of launched processes. With `init`, training
    continues from that checkpoint's weights (e.g. a depth up-scaled one), with its architecture and,
    unless `tokenizer_dir` is given, its tokenizer."""
    if init is not None:
        init_ckpt = Checkpoint.open(init)
        arch, tokenizer_dir = init_ckpt.arch, tokenizer_dir or init_ckpt.path
    out = Path(out)
    root, work = _check(out, arch, size, tokenizer_dir, corpus_dir, force)
    steps, batch_size, seq_len, lr = _hyperparameters(size, steps, batch_size, seq_len, lr)
    engine.set_threads(threads)
    targs = engine.training_args(
        work, seed=seed, steps=steps, batch_size=batch_size, lr=lr, adam_beta1=0.9, adam_beta2=0.95,
        adam_epsilon=1e-8, weight_decay=0.1, max_grad_norm=1.0, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=max(1, steps // 20), save_steps=checkpoint_every,
        include_num_input_tokens_seen="all",
    )  # fmt: skip
    with targs.main_process_first(local=False, desc="tokenizer"):
        tokenizer_dir = _tokenizer(tokenizer_dir, out, root, force)
    tok = _load_tokenizer(tokenizer_dir)
    stream = encode_stream(tok, training_texts(tok, arch, root))
    if len(stream) < 4 * (seq_len + 1):
        raise InputError(f"the corpus gives {len(stream)} tokens, too few for --seq-len {seq_len}")
    args = dict(arch=arch, size=size, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, seed=seed,
                stream_tokens=len(stream), vocab=len(tok))  # fmt: skip
    if init is not None:
        args["init"] = str(init)
    model, bar = _train(
        targs, tok, arch, size, StepBatches(stream, seed, steps, batch_size, seq_len), args, resume
    )
    if not engine.is_main():
        return {"rank": engine.world()[0], "final_loss": bar.losses()[-1] if bar.losses() else None}
    summary = _summary(model, tok, root, bar, args)
    report = {**summary, "args": args, "losses": bar.losses()}
    _export(model, tok, tokenizer_dir, arch, out, summary, report, force)
    engine.finish(work)
    return summary


def _check(out: Path, arch: str, size: str, tokenizer_dir: Path | None, corpus_dir: Path | None,
           force: bool) -> tuple[Path, Path]:  # fmt: skip
    """Refuse bad input before torch and transformers are imported (that takes seconds) and before
    hours of training; claim `out`. Returns the corpus root and the engine's work dir."""
    if arch not in configs.ARCHS:
        raise UnknownNameError("architecture", arch, configs.ARCHS)
    if size not in configs.SIZES:
        raise UnknownNameError("size", size, list(configs.SIZES))
    # What orlik would replace must be orlik's (or --force).
    work = engine.claim_out(out, force=force, work_marks=(WORK_MARK, engine.RUN_JSON))
    if tokenizer_dir is None and not (out.parent / "tokenizer" / "tokenizer.model").is_file():
        owner.check_replaceable(out.parent / "tokenizer", force=force, kind="tokenizer")
    root = Path(corpus_dir or corpus.DATA_DIR)
    if not root.is_dir():
        raise InputError(f"corpus directory {root} does not exist")
    # Fail before training, not after it: the run ends with a held-out evaluation.
    if not corpus.documents(split="heldout", root=root):
        raise InputError(f"the corpus under {root} has no held-out documents to evaluate on")
    if tokenizer_dir is not None and not any((Path(tokenizer_dir) / n).is_file() for n in tokenizer.HF_FILES):
        raise InputError(f"{tokenizer_dir} holds no tokenizer ({' or '.join(tokenizer.HF_FILES)})")
    return root, work


def _hyperparameters(size: str, steps: int | None, batch_size: int | None, seq_len: int | None,
                     lr: float | None) -> tuple[int, int, int, float]:  # fmt: skip
    """The size's defaults where a value is not given; all must be positive."""
    d = DEFAULTS[size]
    # `is None`, not `or`: an explicit 0 is an error to report, not a request for the default.
    steps = d["steps"] if steps is None else steps
    batch_size = d["batch_size"] if batch_size is None else batch_size
    seq_len = d["seq_len"] if seq_len is None else seq_len
    lr = d["lr"] if lr is None else lr
    if min(steps, batch_size, seq_len) <= 0 or lr <= 0:
        raise InputError("steps, batch size, sequence length and learning rate must be positive")
    return steps, batch_size, seq_len, lr


def _summary(
    model: Any, tok: Any, root: Path, bar: engine.ProgressBar, args: dict[str, Any]
) -> dict[str, Any]:
    """The run's figures and the held-out perplexity of the trained model."""
    ppl = evaluate.heldout_report_for_model(
        model, tok, root, ctx=min(args["seq_len"], model.config.max_position_embeddings)
    )
    return {
        "arch": args["arch"],
        "size": args["size"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": args["steps"],
        "processes": engine.world()[1],
        "train_tokens_per_epoch": args["stream_tokens"],
        "tokens_trained": args["steps"] * args["batch_size"] * args["seq_len"],
        "train_seconds": round(bar.seconds, 1),
        "tokens_per_second": round(bar.tokens_per_second, 1) if bar.tokens_per_second else None,
        "final_loss": bar.losses()[-1] if bar.losses() else None,
        "heldout": ppl,
    }


def _tokenizer(tokenizer_dir: Path | None, out: Path, root: Path, force: bool) -> Path:
    if tokenizer_dir is not None:
        return Path(tokenizer_dir)
    tokenizer_dir = out.parent / "tokenizer"
    if engine.is_main() and not (tokenizer_dir / "tokenizer.model").is_file():
        progress.info(f"training the tokenizer into {tokenizer_dir}")
        tokenizer.build(tokenizer_dir, corpus_dir=root, force=force)
    return tokenizer_dir


def _load_tokenizer(tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def _train(targs: Any, tok: Any, arch: str, size: str, data: StepBatches, args: dict[str, Any],
           resume: bool) -> tuple[Any, engine.ProgressBar]:  # fmt: skip
    """transformers' Trainer on a freshly initialised model; resumes from the newest complete engine
    checkpoint made with the same settings."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, default_data_collator

    torch.manual_seed(args["seed"])
    cfg = configs.make_config(arch, size, len(tok), bos=tok.bos_token_id, eos=tok.eos_token_id,
                              pad=tok.pad_token_id)  # fmt: skip
    if args.get("init"):
        model = AutoModelForCausalLM.from_pretrained(args["init"], dtype=torch.float32, use_safetensors=True)
    else:
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    ckpt = engine.resume_point(Path(targs.output_dir), {"verb": "pretrain", **args}, resume)
    trainer = Trainer(model=model, args=targs, train_dataset=data, data_collator=default_data_collator)
    bar = engine.ProgressBar(f"pretrain {arch}-{size}")
    engine.install(trainer, bar)
    trainer.train(resume_from_checkpoint=ckpt)
    model.eval()
    return model, bar


def _export(model: Any, tok: Any, tokenizer_dir: Path, arch: str, out: Path, summary: dict[str, Any],
            report: dict[str, Any], force: bool) -> None:  # fmt: skip
    import torch
    from transformers import GenerationConfig

    with atomic_dir(out, force=force, marks=(TRAINING_JSON,), kind="checkpoint") as tmp:
        model.to(torch.float16).save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.copy_into(tokenizer_dir, tmp)
        tpl = configs.chat_template(arch)
        tok_cfg = json.loads((tmp / "tokenizer_config.json").read_text())
        tok_cfg["chat_template"] = tpl
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False))
        (tmp / "chat_template.jinja").write_text(tpl)
        eos = [tok.eos_token_id]
        if arch == "qwen2":
            eos.append(tok.convert_tokens_to_ids("<|im_end|>"))
        GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                         do_sample=True, temperature=0.7, top_p=0.9).save_pretrained(str(tmp))  # fmt: skip
        (tmp / "eval.md").write_text(evaluate.report_markdown(summary["heldout"]))
        atomic_write_text(tmp / TRAINING_JSON, json.dumps(report, indent=1))

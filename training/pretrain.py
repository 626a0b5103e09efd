"""Pretrain a tiny llama/mistral/qwen2 model on the corpus on CPU and export an FP16 checkpoint.

AdamW (0.9/0.95), linear warmup then cosine decay, gradient clipping, periodic resumable
checkpoints. Batches are a pure function of (seed, step), so a resumed run continues the exact
loss curve of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from orlik import corpus, progress
from orlik.errors import InputError, UnknownNameError
from orlik.fsutil import atomic_dir, atomic_write_text, check_writable
from orlik.training import configs, evaluate, tokenizer

DEFAULTS = {
    "tiny": {"steps": 240, "batch_size": 16, "seq_len": 256, "lr": 3e-3},
    "small": {"steps": 2000, "batch_size": 16, "seq_len": 512, "lr": 6e-4},
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


def batch(stream: np.ndarray, seed: int, step: int, bs: int, seq: int) -> tuple[Any, Any]:
    import torch

    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(stream) - seq - 1, size=bs)
    x = np.stack([stream[s : s + seq + 1] for s in starts])
    t = torch.from_numpy(x)
    return t[:, :-1], t[:, 1:]


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress_ = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_)))


def _save_state(work: Path, model: Any, opt: Any, step: int, meta: dict[str, Any]) -> None:
    import torch
    from safetensors.torch import save_file

    tmp = work / "state.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}))
    final = work / "state"
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def _load_state(work: Path, model: Any, opt: Any, meta: dict[str, Any]) -> tuple[int, list[float]]:
    import torch
    from safetensors.torch import load_file

    state = work / "state"
    if not (state / "meta.json").is_file():
        return 0, []
    saved = json.loads((state / "meta.json").read_text())
    if saved.get("args") != meta["args"]:
        progress.info(f"[yellow]ignoring {state}: it was made with other settings[/]")
        return 0, []
    model.load_state_dict(load_file(str(state / "model.safetensors")))
    # weights_only: the optimizer state holds tensors and numbers only; nothing is unpickled.
    opt.load_state_dict(torch.load(state / "optimizer.pt", weights_only=True))
    progress.info(f"resuming from step {saved['step']}")
    return int(saved["step"]), list(saved.get("losses", []))


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
) -> dict[str, Any]:
    # Bad input is reported before torch and transformers are imported: that takes seconds.
    if arch not in configs.ARCHS:
        raise UnknownNameError("architecture", arch, configs.ARCHS)
    if size not in configs.SIZES:
        raise UnknownNameError("size", size, list(configs.SIZES))
    out = Path(out)
    check_writable(out.parent)
    root = Path(corpus_dir or corpus.DATA_DIR)
    if not root.is_dir():
        raise InputError(f"corpus directory {root} does not exist")
    # Fail before training, not after it: the run ends with a held-out evaluation.
    if not corpus.documents(split="heldout", root=root):
        raise InputError(f"the corpus under {root} has no held-out documents to evaluate on")
    if tokenizer_dir is not None and not any((Path(tokenizer_dir) / n).is_file() for n in tokenizer.HF_FILES):
        raise InputError(f"{tokenizer_dir} holds no tokenizer ({' or '.join(tokenizer.HF_FILES)})")
    d = DEFAULTS[size]
    # `is None`, not `or`: an explicit 0 is an error to report, not a request for the default.
    steps = d["steps"] if steps is None else steps
    batch_size = d["batch_size"] if batch_size is None else batch_size
    seq_len = d["seq_len"] if seq_len is None else seq_len
    lr = d["lr"] if lr is None else lr
    if min(steps, batch_size, seq_len) <= 0 or lr <= 0:
        raise InputError("steps, batch size, sequence length and learning rate must be positive")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    torch.set_num_threads(threads or os.cpu_count() or 1)

    if tokenizer_dir is None:
        tokenizer_dir = out.parent / "tokenizer"
        if not (tokenizer_dir / "tokenizer.model").is_file():
            progress.info(f"training the tokenizer into {tokenizer_dir}")
            tokenizer.build(tokenizer_dir, corpus_dir=root)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    stream = encode_stream(tok, training_texts(tok, arch, root))
    if len(stream) < 4 * (seq_len + 1):
        raise InputError(f"the corpus gives {len(stream)} tokens, too few for --seq-len {seq_len}")

    torch.manual_seed(seed)
    cfg = configs.make_config(arch, size, len(tok), bos=tok.bos_token_id, eos=tok.eos_token_id,
                              pad=tok.pad_token_id)  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), eps=1e-8,
    )  # fmt: skip
    args = dict(arch=arch, size=size, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, seed=seed,
                stream_tokens=len(stream), vocab=len(tok))  # fmt: skip
    meta: dict[str, Any] = {"args": args}
    work = out.with_name(out.name + ".work")
    start, losses = _load_state(work, model, opt, meta) if resume else (0, [])
    warmup = max(1, steps // 20)

    model.train()
    t0, tokens_seen = time.perf_counter(), 0
    with progress.bar(f"pretrain {arch}-{size}", total=steps, loss="-", tok_s="-") as bar:
        bar.update(completed=start)
        for step in range(start, steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, lr, warmup)
            x, y = batch(stream, seed, step, batch_size, seq_len)
            logits = model(x, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(round(float(loss.detach()), 5))
            tokens_seen += x.numel()
            rate = tokens_seen / (time.perf_counter() - t0)
            bar.advance(1, loss=f"{losses[-1]:.3f}", tok_s=f"{rate:,.0f}")
            if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                _save_state(work, model, opt, step + 1, {**meta, "losses": losses})
    elapsed = time.perf_counter() - t0
    model.eval()

    ppl = evaluate.heldout_report_for_model(model, tok, root, ctx=min(seq_len, cfg.max_position_embeddings))
    summary = {
        "arch": arch,
        "size": size,
        "parameters": n_params,
        "steps": steps,
        "train_tokens_per_epoch": len(stream),
        "tokens_trained": steps * batch_size * seq_len,
        "train_seconds": round(elapsed, 1),
        "tokens_per_second": round(tokens_seen / elapsed, 1) if elapsed > 0 else None,
        "final_loss": losses[-1] if losses else None,
        "heldout": ppl,
    }
    with atomic_dir(out) as tmp:
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
        atomic_write_text(
            tmp / "training.json", json.dumps({**summary, "args": args, "losses": losses}, indent=1)
        )
        (tmp / "eval.md").write_text(evaluate.report_markdown(ppl))
    shutil.rmtree(work, ignore_errors=True)
    return summary

"""Held-out perplexity of a checkpoint next to a unigram baseline scored on the same tokens."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from orlik import corpus
from orlik.checkpoint import Checkpoint


def window_nll(model: Any, ids: list[int], ctx: int, bos: int | None) -> tuple[np.ndarray, np.ndarray]:
    """NLL of every predicted token over non-overlapping windows of `ctx` tokens.

    Each window starts with BOS (when the model has one) and scores all its other positions.
    Returns (nll per token, the target token ids).
    """
    import torch

    body = ctx - (1 if bos is not None else 0)
    nlls, targets = [], []
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, body):
            chunk = ids[start : start + body + 1]
            if len(chunk) < 2:
                break
            inp = ([bos] if bos is not None else []) + chunk[:-1]
            tgt = ([chunk[0]] if bos is not None else []) + chunk[1:]
            logits = model(torch.tensor([inp]), use_cache=False).logits[0].float()
            lp = torch.log_softmax(logits, -1)
            t = torch.tensor(tgt)
            nlls.append((-lp[torch.arange(len(tgt)), t]).numpy())
            targets.append(np.asarray(tgt))
    return np.concatenate(nlls), np.concatenate(targets)


def unigram_nll(train_ids: list[int], targets: np.ndarray, vocab: int) -> np.ndarray:
    """Add-one smoothed unigram model of the train stream, scored on the same targets."""
    counts = Counter(train_ids)
    total = len(train_ids) + vocab
    logp = np.full(vocab, math.log(1 / total))
    for tok, c in counts.items():
        logp[tok] = math.log((c + 1) / total)
    return -logp[targets]


def encode_docs(tok: Any, texts: list[str]) -> list[int]:
    """Concatenate texts as the model saw them in pretraining: each followed by EOS."""
    out: list[int] = []
    for t in texts:
        out += [*tok.encode(t, add_special_tokens=False), tok.eos_token_id]
    return out


def heldout_report(checkpoint: str | Path, corpus_dir: Path | None = None, ctx: int = 256) -> dict[str, Any]:
    ckpt = Checkpoint.open(checkpoint)
    return heldout_report_for_model(
        ckpt.load_model(), ckpt.load_tokenizer(), Path(corpus_dir or corpus.DATA_DIR), ctx
    )


def heldout_report_for_model(model: Any, tok: Any, root: Path, ctx: int = 256) -> dict[str, Any]:
    train_ids = encode_docs(tok, [d.text for d in corpus.documents(split="train", root=root)])
    rows: dict[str, Any] = {}
    all_m, all_u = [], []
    for lang in corpus.LANGS:
        texts = [d.text for d in corpus.documents(lang=lang, split="heldout", root=root)]
        if not texts:
            continue
        nll, tgt = window_nll(model, encode_docs(tok, texts), ctx, tok.bos_token_id)
        uni = unigram_nll(train_ids, tgt, len(tok))
        rows[lang] = {
            "tokens": int(nll.size),
            "ppl": float(np.exp(nll.mean())),
            "unigram_ppl": float(np.exp(uni.mean())),
        }
        all_m.append(nll)
        all_u.append(uni)
    m, u = np.concatenate(all_m), np.concatenate(all_u)
    rows["all"] = {
        "tokens": int(m.size),
        "ppl": float(np.exp(m.mean())),
        "unigram_ppl": float(np.exp(u.mean())),
    }
    return rows


def report_markdown(rows: dict[str, Any]) -> str:
    lines = ["| held-out text | tokens | model PPL | unigram PPL |", "|---|---:|---:|---:|"]
    for lang, r in rows.items():
        lines.append(f"| {lang} | {r['tokens']} | {r['ppl']:.2f} | {r['unigram_ppl']:.2f} |")
    return "\n".join(lines) + "\n"

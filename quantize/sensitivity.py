"""How much each weight matrix's error costs in KLD against FP16, measured on the calibration set.

One forward and backward pass over the calibration tokens collects, for every linear layer, the mean
squared input per column (C, the importance matrix) and the diagonal Fisher information of the model's
own output distribution at the layer's output, per row (R: mean squared gradient of log p(y) with y
sampled from the FP16 model). To second order, quantization error dW in that layer raises the mean
per-token KLD by about 1/2 sum_rc R_r C_c dW_rc^2; the embedding is the same with token frequencies
as R and the Fisher at its output as C. A format's quantizer (ggml's for GGUF, MLX's for MLX) fills
dW for each candidate type on a sample of rows.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from orlik import progress
from orlik.checkpoint import Checkpoint
from orlik.errors import InputError

# (row weights R [rows], column weights C [row length]) for one weight matrix, in the checkpoint's
# (Hugging Face) orientation; a tied embedding has two pairs: as embedding and as output head.
Pairs = list[tuple[np.ndarray, np.ndarray]]


@dataclass
class Fisher:
    weights: dict[str, Pairs]  # HF parameter name -> pairs
    tokens: int
    seconds: float
    tied: dict[str, str] = field(default_factory=dict)  # tied output head -> the embedding it reuses
    dtype: str = "float32"  # of the pass's matmuls


def base_settings(options: dict[str, Any]) -> dict[str, Any]:
    """The sensitivity pass's settings from a recipe's options: calibration tokens, window length,
    the fraction of rows whose error is measured, the probes' tokens and window length, the Fisher
    pass's dtype and the seed (each auto backend adds its own). The probes run on whole windows of
    `probe_seq_len` tokens (at most `sens_seq_len`), so `probe_tokens` is 0 (no probes) or at least
    one such window; anything between is refused rather than silently probing nothing."""
    probe_tokens = int(options.get("probe_tokens", 512))
    # With probes, each matrix they quantize whole corrects its sampled estimates (probes.row_corrected),
    # and half the rows do better than all of them uncorrected; without, the sample is twice as large.
    settings = {"tokens": int(options.get("sens_tokens", 1024)), "seq_len": int(options.get("sens_seq_len", 512)),
                "rows": float(options.get("sens_rows", 1 / 32 if probe_tokens > 0 else 1 / 16)),
                "min_rows": 32 if probe_tokens > 0 else 64, "max_rows": int(options.get("sens_max_rows", 1024)),
                "seed": int(options.get("seed", 0)),
                "probe_tokens": probe_tokens,
                "probe_seq_len": int(options.get("probe_seq_len", 512)),
                "dtype": str(options.get("sens_dtype", "auto"))}  # fmt: skip
    if settings["dtype"] not in ("auto", "float32", "bfloat16"):
        raise InputError(f"sens_dtype={settings['dtype']}: use auto, float32 or bfloat16")
    if settings["max_rows"] < settings["min_rows"]:
        raise InputError(
            f"sens_max_rows={settings['max_rows']}: measure at least {settings['min_rows']} rows of a matrix"
        )
    if settings["seq_len"] < 16 or settings["probe_seq_len"] < 16:
        raise InputError("sens_seq_len and probe_seq_len must be at least 16 tokens")
    settings["probe_seq_len"] = window = min(settings["probe_seq_len"], settings["seq_len"])
    if 0 < settings["probe_tokens"] < window or settings["probe_tokens"] < 0:
        raise InputError(f"probe_tokens={settings['probe_tokens']} is not a whole probe window of {window} tokens "
                         f"(probe_seq_len, at most sens_seq_len): use 0 (no KLD probes) or at least {window}")  # fmt: skip
    return settings


def read_cached(path: Path) -> dict[str, Any] | None:
    """A cached sensitivity table, or None when there is none or it cannot be read (then it is
    recomputed and rewritten)."""
    if not path.is_file():
        return None
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None


def _token_windows(ckpt: Checkpoint, texts: list[str], tokens: int, seq_len: int) -> list[list[int]]:
    """Contiguous windows of `seq_len` tokens over the texts in file order (as llama-imatrix chunks)."""
    tok = ckpt.load_tokenizer()
    ids: list[int] = []
    for t in texts:
        ids += tok(t, add_special_tokens=True)["input_ids"]
        if len(ids) >= tokens:
            break
    n = min(len(ids), tokens) // seq_len
    if n < 1:
        raise InputError(f"the calibration set has fewer than {seq_len} tokens; auto needs at least that")
    return [ids[i * seq_len : (i + 1) * seq_len] for i in range(n)]


def split_windows(
    ckpt: Checkpoint,
    texts: list[str],
    *,
    fisher_tokens: int,
    probe_tokens: int,
    seq_len: int,
    probe_seq_len: int | None = None,
) -> tuple[list[list[int]], list[list[int]]]:
    """Windows for the Fisher pass and, disjoint from them, for the direct KLD probes, both spread
    evenly over the whole calibration set (not its first tokens), so the probes judge the estimate on
    text it was not fitted to. A probe window is the first `probe_seq_len` tokens (default: all) of
    its `seq_len` window. Up to 64x the tokens needed are read; with a single window the probes get
    none (the caller then skips them)."""
    plen = min(probe_seq_len or seq_len, seq_len)
    need = fisher_tokens // seq_len + probe_tokens // plen
    every = _token_windows(ckpt, texts, max(64 * need, 1) * seq_len, seq_len)
    n_probe = min(probe_tokens // plen, len(every) // 2)
    n_fisher = min(max(1, fisher_tokens // seq_len), len(every) - n_probe)
    picks = np.linspace(0, len(every) - 1, n_fisher + n_probe).round().astype(int)
    # every k-th pick to the probes, the rest to the Fisher pass: both span the set
    k = (n_fisher + n_probe) / max(n_probe, 1)
    probe_at = {int(i * k + k / 2) for i in range(n_probe)}
    fis = [every[p] for j, p in enumerate(picks) if j not in probe_at]
    pro = [every[p][:plen] for j, p in enumerate(picks) if j in probe_at]
    return fis, pro


@contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block (as it was after). Importing torch and
    transformers and building the model allocate millions of objects that all live on, and the
    collector's passes over them were a fifth of that time (4.1 against 5.2 CPU-s for the tokenizer
    and Llama imports, `python -c` with gc.disable() first)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def load_model(ckpt: Checkpoint, threads: int) -> Any:
    """The checkpoint in float32 with frozen weights, loaded once for the Fisher pass, the candidate
    errors (its weights) and the probes."""
    import torch

    torch.set_num_threads(max(1, threads))
    model = ckpt.load_model(torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def windows_and_model(ckpt: Checkpoint, texts: list[str], settings: dict[str, Any],
                      threads: int) -> tuple[list[list[int]], list[list[int]], Any]:  # fmt: skip
    """The Fisher pass's and the probes' token windows of `texts` (split_windows, by the
    base_settings `settings`) and the loaded model (load_model): what both auto backends start with,
    the imports they need done with the collector paused."""
    with collector_paused():
        fis, pro = split_windows(ckpt, texts, fisher_tokens=settings["tokens"], probe_tokens=settings["probe_tokens"],
                                 seq_len=settings["seq_len"], probe_seq_len=settings["probe_seq_len"])  # fmt: skip
        return fis, pro, load_model(ckpt, threads)


def fisher_dtype(name: str = "auto") -> Any:
    """The Fisher pass's matmul dtype for the sens_dtype option: float32 or bfloat16 as named;
    `auto`: bfloat16 where the CPU computes it natively (oneDNN's check: AVX512-BF16 or AMX), else
    float32. The Fisher pass only ranks and weighs matrices, so bf16's 3 significant digits cost
    it nothing measurable, and it runs 2-3x faster there; the probes, which measure KLDs down to
    1e-6, always run in float32."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return torch.bfloat16 if native else torch.float32


def fisher(model: Any, windows: list[list[int]], *, seed: int, dtype: str = "auto") -> Fisher:
    """R and C of every linear layer and embedding of `model` (sensitivity.load_model) on the token
    windows, the matmuls in fisher_dtype(`dtype`) and every sum in float64."""
    import torch

    t0 = time.time()
    dtype = fisher_dtype(dtype)
    gen = torch.Generator().manual_seed(seed)
    seq_len = len(windows[0])
    sums: dict[str, list[Any]] = {}
    hooks = [m.register_forward_hook(_hook(name, m, sums)) for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear | torch.nn.Embedding)]  # fmt: skip
    vocab = int(model.config.vocab_size)
    per_batch = max(1, min(len(windows), (1 << 25) // (vocab * seq_len)))
    n_tok = 0
    try:
        for b in range(0, len(windows), per_batch):
            x = torch.tensor(windows[b : b + per_batch])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                logits = model(input_ids=x).logits.float()
            with torch.no_grad():
                labels = sample(logits.reshape(-1, vocab), gen)
            torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), labels, reduction="sum").backward()
            n_tok += x.numel()
            progress.info(f"auto: sensitivity pass {n_tok}/{len(windows) * seq_len} tokens")
    finally:
        for h in hooks:
            h.remove()
    tied = {}
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    if out_emb is not None and out_emb.weight is in_emb.weight:
        tied[f"{names[id(out_emb)]}.weight"] = f"{names[id(in_emb)]}.weight"
    weights: dict[str, Pairs] = {}
    for name, (rows, cols) in sums.items():
        weights[f"{name}.weight"] = [(rows.double().numpy() / n_tok, cols.double().numpy() / n_tok)]
    for head, emb in tied.items():
        weights[emb] = weights[emb] + weights.pop(head)
    return Fisher(weights, n_tok, time.time() - t0, tied, str(dtype).removeprefix("torch."))


def sample(logits: Any, gen: Any, chunk: int = 128) -> Any:
    """One token id per row of `logits` [n, vocab], drawn from its softmax by inverse transform
    (a uniform draw located in the row's cumulative distribution), `chunk` rows at a time.
    torch.multinomial took 0.75 s for 1024 positions of a 32k vocabulary, this 0.04 s."""
    import torch

    out = torch.empty(logits.shape[0], dtype=torch.long)
    for i in range(0, logits.shape[0], chunk):
        cdf = torch.softmax(logits[i : i + chunk].float(), -1).cumsum_(-1)
        u = torch.rand(cdf.shape[0], 1, generator=gen) * cdf[:, -1:]
        out[i : i + chunk] = torch.searchsorted(cdf, u)[:, 0].clamp_(max=cdf.shape[1] - 1)
    return out


def _hook(name: str, module: Any, sums: dict[str, list[Any]]) -> Any:
    """Forward hook accumulating the layer's R (at its output, via a gradient hook) and C."""
    import torch

    def forward(mod: Any, args: tuple[Any, ...], out: Any) -> Any:
        x = args[0]
        if isinstance(mod, torch.nn.Embedding):
            col_len, row_len = mod.embedding_dim, mod.num_embeddings
            counts = torch.bincount(x.reshape(-1), minlength=row_len).double()
            acc = sums.setdefault(name, [torch.zeros(row_len, dtype=torch.float64), torch.zeros(col_len, dtype=torch.float64)])  # fmt: skip
            acc[0] += counts
            out = out.detach().requires_grad_(True)  # the pass needs no weight gradients
            target = 1
        else:
            acc = sums.setdefault(name, [torch.zeros(mod.out_features, dtype=torch.float64),
                                         torch.zeros(mod.in_features, dtype=torch.float64)])  # fmt: skip
            acc[1] += x.detach().reshape(-1, mod.in_features).pow(2).sum(0).double()
            target = 0

        def grad(g: Any) -> None:
            acc[target] += g.detach().float().reshape(-1, g.shape[-1]).pow(2).sum(0).double()

        if out.requires_grad:
            out.register_hook(grad)
        return out

    return forward


def sample_rows(pairs: Pairs, n_rows: int, fraction: float, seed: int, most: int = 1024,
                least: int = 64) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Rows to measure and each one's weight in the total: the heaviest rows (by R) all, and a
    uniform sample of the rest scaled up, so the sum stays unbiased and its variance small. A
    `fraction` of the rows, at least `least` (or all) and at most `most`: a vocabulary-sized
    matrix (32k-150k rows) needs no more than a block matrix for the same precision, and at 1/16
    it was over a third of the measured weights on a 32k vocabulary."""
    m = min(max(min(n_rows, least), int(np.ceil(n_rows * fraction))), max(most, least))
    if m >= n_rows:
        return np.arange(n_rows), np.ones(n_rows)
    weight = sum(r / max(r.sum(), 1e-300) for r, _ in pairs)
    top = np.argsort(-weight, kind="stable")[: m // 2]
    rest = np.setdiff1d(np.arange(n_rows), top)
    rng = np.random.default_rng(seed)
    pick = rng.choice(rest, m - len(top), replace=False)
    scale = np.concatenate([np.ones(len(top)), np.full(len(pick), len(rest) / len(pick))])
    return np.concatenate([top, pick]), scale


def weighted_error(pairs: Pairs, rows: np.ndarray, scale: np.ndarray, err2: np.ndarray) -> float:
    """1/2 sum_rc R_r C_c dW_rc^2 over the sampled rows (err2 = dW^2 of those rows). The row sums
    over C are taken in err2's dtype (float32 keeps 6 digits of a sum of positive terms, and spares
    the probes a float64 copy of every whole matrix), the rest in float64."""
    total = 0.0
    for r, c in pairs:
        total += float(np.dot(scale * r[rows], (err2 @ c.astype(err2.dtype, copy=False)).astype(np.float64)))
    return 0.5 * total


_FILE_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def file_weights(ckpt: Checkpoint) -> Any:
    """name -> float32 array of one tensor of the checkpoint's safetensors files (F32, F16 or BF16,
    read at the header's offsets), or None for a name they lack or another dtype. Needs neither torch
    nor the loaded model, so work on the weights can start while those are still importing."""
    from orlik.checkpoint import tensor_spans

    spans = tensor_spans(ckpt.weight_files)

    def read(name: str) -> np.ndarray | None:
        span = spans.get(name)
        if span is None or span.dtype not in _FILE_DTYPES:
            return None
        dt = np.dtype(_FILE_DTYPES[span.dtype])
        raw = np.fromfile(span.path, dtype=dt, count=span.size // dt.itemsize, offset=span.offset)
        if span.dtype == "BF16":  # the upper half of a float32
            return (raw.astype(np.uint32) << 16).view(np.float32).reshape(span.shape)
        return raw.astype(np.float32).reshape(span.shape)

    read.names = list(spans)  # type: ignore[attr-defined]
    read.shapes = {n: tuple(s.shape) for n, s in spans.items()}  # type: ignore[attr-defined]
    return read


def weight_reader(model: Any) -> Any:
    """name -> float32 numpy array of a parameter of the loaded model (sensitivity.load_model), by
    its checkpoint name; a tied output head's name gives the embedding it shares."""
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}

    def read(name: str) -> np.ndarray:
        return np.asarray(model.get_parameter(name).detach().numpy())

    read.names = names  # type: ignore[attr-defined]
    return read

"""Per-chunk Table 8 arithmetic: compress FP16 log-probs to top-K + tail, and score a variant's
logits against that compressed reference (with a rigorous KLD bound) or against full FP16 logits.

The KLD over the full vocabulary splits into the stored top-K part, which is exact, and the tail:
    Σ_tail p_b(v)·(b_v − q_v) = S − Σ_tail p_b(v)·q_v,   S = Σ_tail p_b·b_v (stored), T = Σ_tail p_b (stored)
  lower bound (log-sum inequality):  T·log(T / Q_tail),  Q_tail = Σ_tail exp(q_v)
  upper bound: S − min Σ_tail p_v·q_v over every p with Σp = T and 0 <= p_v <= c, where c, the
               smallest stored top-K probability, caps every tail probability. The minimum puts
               c on the ceil(T/c) tail tokens with the lowest q (a greedy fractional fill).
The top-K log-probs are stored as float32, so each kept term e^b·(b − q) is known only to within
its rounding (|δb| <= 2^-24·|b|); the mean-value theorem bounds that error by
e^(b+δ)·(|b − q| + 1 + δ)·δ per term, and it widens both bounds. The reported KLD is the lower
bound of the tail (exact when the tail is split like the base's) with the stored top-K; the exact
value lies in [kld_lo, kld_hi]. Everything else (NLL, Δp, same top) is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from orlik.benchmarks.stats import Series

FP32_REL = 2.0**-24  # relative rounding of a float32 (half an ulp)
BLOCK_BYTES = 1 << 20  # rows per numpy pass: each float32 temporary stays near 1 MiB, inside L2


def row_block(vocab: int, itemsize: int = 4) -> int:
    return max(1, min(64, BLOCK_BYTES // max(1, vocab * itemsize)))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64, copy=False)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


@dataclass
class TopK:
    """Compressed base distributions for n scored positions (a flat ragged layout)."""

    logp_obs: np.ndarray  # float64 [n]  base log-prob of the observed next token
    argmax: np.ndarray  # int32 [n]
    offsets: np.ndarray  # int64 [n+1]  row i's entries are [offsets[i], offsets[i+1])
    ids: np.ndarray  # uint16/int32 [m]  sorted by descending base probability per row
    logp: np.ndarray  # float32 [m]
    tail_mass: np.ndarray  # float64 [n]  T
    tail_plogp: np.ndarray  # float64 [n]  S

    @classmethod
    def concat(cls, parts: list[TopK]) -> TopK:
        offsets = [np.zeros(1, np.int64)]
        base = 0
        for p in parts:
            offsets.append(p.offsets[1:] + base)
            base += int(p.offsets[-1])
        cat = {
            f: np.concatenate([getattr(p, f) for p in parts])
            for f in cls.__dataclass_fields__
            if f != "offsets"
        }
        return cls(offsets=np.concatenate(offsets), **cat)

    def rows(self, start: int, stop: int) -> TopK:
        o = self.offsets[start : stop + 1]
        a, b = int(o[0]), int(o[-1])
        return TopK(self.logp_obs[start:stop], self.argmax[start:stop], o - a, self.ids[a:b], self.logp[a:b],
                    self.tail_mass[start:stop], self.tail_plogp[start:stop])  # fmt: skip

    @property
    def n(self) -> int:
        return int(self.logp_obs.size)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f).nbytes for f in self.__dataclass_fields__)


def compress(logits: np.ndarray, targets: np.ndarray, kmax: int, tail_mass: float) -> TopK:
    """Keep, per row, the fewest top tokens whose left-out mass is <= tail_mass (at most kmax and
    at most a quarter of the vocabulary). Log-probs and tail sums are computed in float64."""
    parts = []
    rb = row_block(logits.shape[1], 8)
    for s in range(0, logits.shape[0], rb):
        parts.append(_compress_block(logits[s : s + rb], targets[s : s + rb], kmax, tail_mass))
    return TopK.concat(parts)


def _compress_block(logits: np.ndarray, targets: np.ndarray, kmax: int, tail_mass: float) -> TopK:
    n, vocab = logits.shape
    rows = np.arange(n)
    argmax = logits.argmax(axis=1)
    z = logits.astype(np.float64)
    z -= z[rows, argmax][:, None]  # x − max, <= 0
    e = np.exp(z)
    s = e.sum(axis=1)
    log_s = np.log(s)
    # At most a quarter of the vocabulary: 6 bytes per kept entry then stays under 3/4 of llama.cpp's
    # 2 bytes per vocabulary entry even for the flattest distributions (a looser bound, never a bigger file).
    kmax = min(kmax, max(1, vocab // 4))
    if kmax < vocab:  # the top kmax by logit
        cand = np.argpartition(z, vocab - kmax, axis=1)[:, vocab - kmax :]
    else:
        cand = np.broadcast_to(np.arange(vocab), (n, vocab))
    cb = np.take_along_axis(z, cand, 1) - log_s[:, None]  # their log-probs
    order = np.argsort(-cb, axis=1)
    cand, cb = np.take_along_axis(cand, order, 1), np.take_along_axis(cb, order, 1)
    # Mass left out after keeping k tokens, for k = 1..kmax (1 − cumsum, clipped at rounding level).
    left = np.clip(1.0 - np.cumsum(np.exp(cb), axis=1), 0.0, None)
    ok = left <= tail_mass
    k = np.where(ok.any(axis=1), ok.argmax(axis=1) + 1, kmax)
    keep = np.arange(kmax)[None, :] < k[:, None]  # row-major, so each row stays in descending order
    ids, lps = cand[keep], cb[keep]
    # The tail sums come from the tail itself, not from 1 − top, so tiny masses keep full precision:
    # T = Σ_tail e/s and S = Σ_tail p·(z − log s) = Σ_tail e·z/s − T·log s.
    e[np.repeat(rows, k), ids] = 0.0
    tail = e.sum(axis=1) / s
    return TopK(
        logp_obs=z[rows, targets] - log_s,
        argmax=argmax.astype(np.int32),
        offsets=np.concatenate([[0], np.cumsum(k)]).astype(np.int64),
        ids=ids.astype(np.uint16 if vocab <= 1 << 16 else np.int32),
        logp=lps.astype(np.float32),
        tail_mass=tail,
        tail_plogp=np.einsum("ij,ij->i", e, z) / s - tail * log_s,
    )


def _common(
    q: np.ndarray, qlogits: np.ndarray, targets: np.ndarray, logp_obs: np.ndarray, argmax_b: np.ndarray
):
    rows = np.arange(q.shape[0])
    nll_q = -q[rows, targets]
    nll_b = -logp_obs
    dp = np.exp(-nll_q) - np.exp(-nll_b)
    same = qlogits.argmax(axis=1) == argmax_b
    return nll_q, nll_b, dp, same


def score_topk(qlogits: np.ndarray, targets: np.ndarray, ref: TopK) -> Series:
    """Score a variant's logits for ref.n positions against the compressed reference."""
    parts = []
    rb = row_block(qlogits.shape[1], 8)
    for s in range(0, ref.n, rb):
        e = min(s + rb, ref.n)
        parts.append(_score_topk_block(qlogits[s:e], targets[s:e], ref.rows(s, e)))
    return Series.concat(parts)


def _score_topk_block(qlogits: np.ndarray, targets: np.ndarray, ref: TopK) -> Series:
    n = ref.n
    q = log_softmax(qlogits)
    nll_q, nll_b, dp, same = _common(q, qlogits, targets, ref.logp_obs, ref.argmax)
    counts = np.diff(ref.offsets)
    row_of = np.repeat(np.arange(n), counts)
    ids = ref.ids.astype(np.int64)
    bt = ref.logp.astype(np.float64)
    qt = q[row_of, ids]
    top = np.add.reduceat(np.exp(bt) * (bt - qt), ref.offsets[:-1])
    width = np.abs(bt) * FP32_REL  # how far the stored float32 log-prob may be from the true one
    rounding = np.add.reduceat(np.exp(bt + width) * (np.abs(bt - qt) + 1.0 + width) * width, ref.offsets[:-1])
    pq = np.exp(q)
    pq[row_of, ids] = 0.0
    q_tail = pq.sum(axis=1)
    T, S = ref.tail_mass, ref.tail_plogp
    with np.errstate(divide="ignore", invalid="ignore"):
        lower = np.where(T > 0, T * np.log(T / q_tail), 0.0)
    last = ref.offsets[1:] - 1
    cap = np.exp(bt[last] + width[last])  # the smallest kept probability caps every tail probability
    # Greedy fill for the upper bound: cap on each of the m−1 lowest-q tail tokens, the rest of T on
    # the m-th. Kept tokens sort last (+inf), and m never exceeds the tail's size.
    qs = q.copy()
    qs[row_of, ids] = np.inf
    qs.sort(axis=1)
    n_tail = q.shape[1] - counts
    m = np.minimum(n_tail, np.ceil(T / cap)).astype(np.int64)
    m = np.maximum(m, 1)
    csum = np.cumsum(np.where(np.isfinite(qs), qs, 0.0), axis=1)
    rows = np.arange(n)
    before = np.where(m >= 2, csum[rows, np.maximum(m - 2, 0)], 0.0)
    with np.errstate(invalid="ignore"):  # rows without a tail (T = 0) meet inf·0 here; they are masked
        fill = cap * before + (T - (m - 1) * cap) * qs[rows, m - 1]
    upper = np.where(T > 0, S - fill, 0.0)
    kld = top + lower
    return Series(
        nll_q, nll_b, kld, kld - rounding, kld + np.maximum(upper - lower, 0.0) + rounding, dp, same
    )


def score_exact(qlogits: np.ndarray, blogits: np.ndarray, targets: np.ndarray) -> Series:
    """Full-vocabulary scores of one variant's logits against FP16's (see score_exact_many)."""
    return score_exact_many({"": qlogits}, blogits, targets)[""]


def score_exact_many(
    qs: dict[str, np.ndarray], blogits: np.ndarray, targets: np.ndarray
) -> dict[str, Series]:
    """Full-vocabulary scores of each variant's logits against FP16's: the KLD sums over every token.

    With z = x − max, e = exp(z_b), s = Σ e and d = x_b − x_q,
        KLD = Σ p·(log p − log q) = Σ e·d / s − (max_b − max_q) − log s_b + log s_q   (Σ e/s = 1).
    The elementwise work is float32, like the logits themselves, and every sum is float64; d
    subtracts the two models' logits directly, so the rounding scales with how far they differ,
    not with the logits' size. Against a float64 computation the KLD of a row differs by under
    1e-7 (4e-8 measured on the tiny model's chunks) and the mean by ~1e-10. FP16's share of the
    work is done once per block of rows for all the variants.
    """
    n, vocab = blogits.shape
    rb = row_block(vocab)
    buf = np.empty((2, rb, vocab), np.float32)
    parts: dict[str, list[Series]] = {name: [] for name in qs}
    for s in range(0, n, rb):
        e_ = min(s + rb, n)
        rows = np.arange(e_ - s)
        t = targets[s:e_]
        xb = blogits[s:e_]
        ab = xb.argmax(axis=1)
        mb = xb[rows, ab].astype(np.float64)
        eb = np.exp(np.subtract(xb, xb[rows, ab][:, None], out=buf[0, : e_ - s]), out=buf[0, : e_ - s])
        sb = eb.sum(axis=1, dtype=np.float64)
        lse_b = mb + np.log(sb)
        nll_b = lse_b - xb[rows, t]
        for name, ql in qs.items():
            xq = ql[s:e_]
            aq = xq.argmax(axis=1)
            mq = xq[rows, aq].astype(np.float64)
            w = buf[1, : e_ - s]
            sq = np.exp(np.subtract(xq, xq[rows, aq][:, None], out=w), out=w).sum(axis=1, dtype=np.float64)
            lse_q = mq + np.log(sq)
            np.multiply(eb, np.subtract(xb, xq, out=w), out=w)
            kld = w.sum(axis=1, dtype=np.float64) / sb - lse_b + lse_q
            nll_q = lse_q - xq[rows, t]
            dp = np.exp(-nll_q) - np.exp(-nll_b)
            parts[name].append(Series(nll_q, nll_b, kld, kld, kld, dp, aq == ab))
    return {name: Series.concat(ps) for name, ps in parts.items()}

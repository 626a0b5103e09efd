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

ROW_BLOCK = 64  # rows per numpy pass: bounds temporaries to 64 × n_vocab float64
FP32_REL = 2.0**-24  # relative rounding of a float32 (half an ulp)


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
    at most a quarter of the vocabulary)."""
    parts = []
    for s in range(0, logits.shape[0], ROW_BLOCK):
        parts.append(_compress_block(logits[s : s + ROW_BLOCK], targets[s : s + ROW_BLOCK], kmax, tail_mass))
    return TopK.concat(parts)


def _compress_block(logits: np.ndarray, targets: np.ndarray, kmax: int, tail_mass: float) -> TopK:
    n, vocab = logits.shape
    x, lse, p = _softmax_parts(logits)
    b = x
    b -= lse[:, None]  # log-probs, in place of the float64 copy
    # At most a quarter of the vocabulary: 6 bytes per kept entry then stays under 3/4 of llama.cpp's
    # 2 bytes per vocabulary entry even for the flattest distributions (a looser bound, never a bigger file).
    kmax = min(kmax, max(1, vocab // 4))
    if kmax < vocab:
        cand = np.argpartition(-b, kmax - 1, axis=1)[:, :kmax]
    else:
        cand = np.broadcast_to(np.arange(vocab), (n, vocab))
    cb = np.take_along_axis(b, cand, 1)
    order = np.argsort(-cb, axis=1, kind="stable")
    cand, cb = np.take_along_axis(cand, order, 1), np.take_along_axis(cb, order, 1)
    # Mass left out after keeping k tokens, for k = 1..kmax (1 − cumsum, clipped at rounding level).
    left = np.clip(1.0 - np.cumsum(np.exp(cb), axis=1), 0.0, None)
    ok = left <= tail_mass
    k = np.where(ok.any(axis=1), ok.argmax(axis=1) + 1, kmax)
    keep = np.arange(kmax)[None, :] < k[:, None]  # row-major, so each row stays in descending order
    ids, lps = cand[keep], cb[keep]
    # The tail sums come from the tail itself, not from 1 − top, so tiny masses keep full precision.
    p[np.repeat(np.arange(n), k), ids] = 0.0
    return TopK(
        logp_obs=b[np.arange(n), targets],
        argmax=logits.argmax(axis=1).astype(np.int32),
        offsets=np.concatenate([[0], np.cumsum(k)]).astype(np.int64),
        ids=ids.astype(np.uint16 if vocab <= 1 << 16 else np.int32),
        logp=lps.astype(np.float32),
        tail_mass=p.sum(axis=1),
        tail_plogp=(p * b).sum(axis=1),
    )


@dataclass
class ChunkScores:
    nll_q: np.ndarray
    nll_b: np.ndarray
    kld: np.ndarray
    kld_lo: np.ndarray
    kld_hi: np.ndarray
    dp: np.ndarray
    same_top: np.ndarray


def _common(
    q: np.ndarray, qlogits: np.ndarray, targets: np.ndarray, logp_obs: np.ndarray, argmax_b: np.ndarray
):
    rows = np.arange(q.shape[0])
    nll_q = -q[rows, targets]
    nll_b = -logp_obs
    dp = np.exp(-nll_q) - np.exp(-nll_b)
    same = qlogits.argmax(axis=1) == argmax_b
    return nll_q, nll_b, dp, same


def score_topk(qlogits: np.ndarray, targets: np.ndarray, ref: TopK) -> ChunkScores:
    """Score a variant's logits for ref.n positions against the compressed reference."""
    parts = []
    for s in range(0, ref.n, ROW_BLOCK):
        e = min(s + ROW_BLOCK, ref.n)
        parts.append(_score_topk_block(qlogits[s:e], targets[s:e], ref.rows(s, e)))
    return ChunkScores(
        *(np.concatenate([getattr(p, f) for p in parts]) for f in ChunkScores.__dataclass_fields__)
    )


def _score_topk_block(qlogits: np.ndarray, targets: np.ndarray, ref: TopK) -> ChunkScores:
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
    return ChunkScores(
        nll_q, nll_b, kld, kld - rounding, kld + np.maximum(upper - lower, 0.0) + rounding, dp, same
    )


def _exp_parts(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x as float64, row max m, e^(x − m), Σ e^(x − m)) with one exp per element."""
    x = x.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    e = np.exp(x - m)
    return x, m, e, e.sum(axis=1, keepdims=True)


def _softmax_parts(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x as float64, log-sum-exp per row, softmax)."""
    x, m, e, s = _exp_parts(x)
    e /= s
    return x, (m + np.log(s))[:, 0], e


def score_exact(qlogits: np.ndarray, blogits: np.ndarray, targets: np.ndarray) -> ChunkScores:
    """Full-vocabulary scores from both models' logits: the KLD sums over every token.

    With log p = x_b − lse_b and log q = x_q − lse_q, KLD = Σ p·(x_b − x_q) − lse_b + lse_q, as
    Σ p = 1; in float64 that is two exps per element instead of three and no log-prob matrices.
    """
    parts = []
    for s in range(0, qlogits.shape[0], ROW_BLOCK):
        e = s + ROW_BLOCK
        t = targets[s:e]
        xb, lse_b, p = _softmax_parts(blogits[s:e])
        xq, mq, _, sq = _exp_parts(qlogits[s:e])
        lse_q = (mq + np.log(sq))[:, 0]
        rows = np.arange(xb.shape[0])
        nll_q, nll_b = lse_q - xq[rows, t], lse_b - xb[rows, t]
        kld = np.einsum("ij,ij->i", p, xb - xq) - lse_b + lse_q
        dp = np.exp(-nll_q) - np.exp(-nll_b)
        same = qlogits[s:e].argmax(axis=1) == blogits[s:e].argmax(axis=1)
        parts.append(ChunkScores(nll_q, nll_b, kld, kld, kld, dp, same))
    return ChunkScores(
        *(np.concatenate([getattr(p, f) for p in parts]) for f in ChunkScores.__dataclass_fields__)
    )

"""Table 8 statistics from per-token series, with llama-perplexity's definitions and uncertainties.

Each formula mirrors tools/perplexity/perplexity.cpp (kl_divergence): mean_and_uncertainty,
covariance, the propagated errors of the PPL ratio and difference, its percentile interpolation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

KLD_PERCENTILES = (("max", 1.0), ("99.9", 0.999), ("99", 0.99), ("95", 0.95), ("90", 0.90), ("median", 0.5),
                   ("10", 0.10), ("5", 0.05), ("1", 0.01), ("0.1", 0.001), ("min", 0.0))  # fmt: skip
DP_PERCENTILES = (("max", 1.0), ("99.9", 0.999), ("99", 0.99), ("95", 0.95), ("90", 0.90), ("75", 0.75),
                  ("median", 0.5), ("25", 0.25), ("10", 0.10), ("5", 0.05), ("1", 0.01), ("0.1", 0.001),
                  ("min", 0.0))  # fmt: skip


@dataclass
class Series:
    """Per scored token: NLL under the variant and the base, KLD (estimate and its bounds),
    Δp = p_q(t) − p_b(t), and whether the two argmaxes agree."""

    nll_q: np.ndarray
    nll_b: np.ndarray
    kld: np.ndarray
    kld_lo: np.ndarray
    kld_hi: np.ndarray
    dp: np.ndarray
    same_top: np.ndarray

    @classmethod
    def concat(cls, parts: list[Series]) -> Series:
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in cls.__dataclass_fields__))

    def __len__(self) -> int:
        return int(self.nll_q.size)


def mean_and_uncertainty(sum_: float, sum2: float, count: int) -> tuple[float, float]:
    """llama.cpp: mean, and the standard error sqrt((E[x²] − E[x]²)/(N−1)), 0 for N <= 10."""
    if count < 1:
        return 0.0, 0.0
    f = sum_ / count
    df = sum2 / count - f * f
    df = math.sqrt(df / (count - 1)) if df > 0 and count > 10 else 0.0
    return f, df


def covariance(sum_a: float, sum_b: float, sum_ab: float, count: int) -> float:
    """llama.cpp: the covariance of the two means (already divided by N−1), 0 for N < 10."""
    if count < 10:
        return 0.0
    return (sum_ab / count - (sum_a / count) * (sum_b / count)) / (count - 1)


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama.cpp's linear interpolation between the order statistics at fraction·(N−1)."""
    v = sorted_values
    if fraction <= 0:
        return float(v[0])
    if fraction >= 1:
        return float(v[-1])
    p = fraction * (v.size - 1)
    ip = int(p)
    p -= ip
    return float((1 - p) * v[ip] + p * v[min(ip + 1, v.size - 1)])


def median(sorted_values: np.ndarray) -> float:
    v, n = sorted_values, sorted_values.size
    return float(0.5 * (v[n // 2] + v[n // 2 - 1])) if n % 2 == 0 else float(v[n // 2])


def _percentiles(values: np.ndarray, which: tuple[tuple[str, float], ...]) -> dict[str, float]:
    v = np.sort(values)
    return {name: median(v) if name == "median" else percentile(v, f) for name, f in which}


def summarize(s: Series) -> dict[str, Any]:
    """Every figure llama-perplexity --kl-divergence prints, plus the bounds of the mean KLD
    (the exact mean lies in [kld_lo, kld_hi]; both equal kld when it was computed exactly)."""
    n = len(s)
    if n < 2:
        raise ValueError("at least two scored tokens are needed")
    nq, nb = s.nll_q.astype(np.float64), s.nll_b.astype(np.float64)
    lq, elq = mean_and_uncertainty(nq.sum(), (nq * nq).sum(), n)
    lb, elb = mean_and_uncertainty(nb.sum(), (nb * nb).sum(), n)
    cov = covariance(nq.sum(), nb.sum(), (nq * nb).sum(), n)
    ppl_q, ppl_b = math.exp(lq), math.exp(lb)
    ppl_q_err, ppl_b_err = ppl_q * elq, ppl_b * elb
    cor = cov / (elq * elb) if elq > 0 and elb > 0 else float("nan")
    ln_ratio = lq - lb
    ln_ratio_err = math.sqrt(max(0.0, elq * elq + elb * elb - 2.0 * cov))
    ratio = math.exp(ln_ratio)
    dppl_err = math.sqrt(max(0.0, ppl_q_err**2 + ppl_b_err**2 - 2.0 * ppl_q * ppl_b * cov))

    k = s.kld.astype(np.float64)
    kld, kld_err = mean_and_uncertainty(k.sum(), (k * k).sum(), n)
    dp = s.dp.astype(np.float64)
    dp_mean, dp_mean_err = mean_and_uncertainty(dp.sum(), (dp * dp).sum(), n)
    mse, mse_err = mean_and_uncertainty((dp**2).sum(), (dp**4).sum(), n)
    rms = math.sqrt(mse)
    rms_err = 0.5 / rms * mse_err if rms > 0 else 0.0
    same = float(np.mean(s.same_top))
    same_err = math.sqrt(same * (1.0 - same) / (n - 1))
    lo, hi = float(s.kld_lo.astype(np.float64).mean()), float(s.kld_hi.astype(np.float64).mean())
    return {
        "tokens": n,
        "ppl": ppl_q,
        "ppl_err": ppl_q_err,
        "ppl_base": ppl_b,
        "ppl_base_err": ppl_b_err,
        "cor_ln_ppl": cor,
        "ln_ppl_ratio": ln_ratio,
        "ln_ppl_ratio_err": ln_ratio_err,
        "ppl_ratio": ratio,
        "ppl_ratio_err": ratio * ln_ratio_err,
        "dppl": ppl_q - ppl_b,
        "dppl_err": dppl_err,
        "kld": kld,
        "kld_err": kld_err,
        "kld_percentiles": _percentiles(k, KLD_PERCENTILES),
        "kld_lo": lo,
        "kld_hi": hi,
        "kld_error_bound": max(hi - kld, kld - lo),
        "dp_mean": dp_mean,
        "dp_mean_err": dp_mean_err,
        "dp_rms": rms,
        "dp_rms_err": rms_err,
        "dp_percentiles": _percentiles(dp, DP_PERCENTILES),
        "same_top": same,
        "same_top_err": same_err,
    }


def baseline_row(nll_b: np.ndarray) -> dict[str, Any]:
    """The FP16 row of Table 8: its own PPL; every difference to itself is zero by definition."""
    nb = nll_b.astype(np.float64)
    lb, elb = mean_and_uncertainty(nb.sum(), (nb * nb).sum(), nb.size)
    ppl = math.exp(lb)
    return {"tokens": int(nb.size), "ppl": ppl, "ppl_err": ppl * elb, "ppl_base": ppl, "ppl_base_err": ppl * elb,
            "dppl": 0.0, "dppl_err": 0.0, "kld": 0.0, "kld_err": 0.0, "dp_mean": 0.0, "dp_mean_err": 0.0,
            "dp_rms": 0.0, "dp_rms_err": 0.0, "same_top": 1.0, "same_top_err": 0.0, "ppl_ratio": 1.0,
            "ppl_ratio_err": 0.0, "ln_ppl_ratio": 0.0, "ln_ppl_ratio_err": 0.0, "cor_ln_ppl": 1.0}  # fmt: skip

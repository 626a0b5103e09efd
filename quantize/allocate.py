"""Size-budgeted bit allocation, shared by GGUF and MLX: each tensor has candidate encodings with a
size in bytes and an estimated cost (KLD against FP16); pick one per tensor so that the total size
fits the budget and the total cost is least.

The solver keeps each tensor's Pareto front (no candidate both larger and worse than another),
finds the Lagrange multiplier whose per-tensor choices just fit (bisection on the convex hull), and
then spends what is left of the budget greedily on the upgrades with the best cost drop per byte. An
exact multiple-choice knapsack over sizes rounded to 1/20000 of the budget runs beside it; the
cheaper of the two answers wins.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from orlik.errors import InputError

_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?i?B?)\s*", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "M": 1000**2, "MB": 1000**2, "G": 1000**3, "GB": 1000**3,
          "T": 1000**4, "TB": 1000**4, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}  # fmt: skip


def parse_size(text: str | int) -> int:
    """'90MiB', '1.5GB', '123456' (bytes) -> bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.fullmatch(str(text))
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _UNITS:
        raise InputError(f"size {text!r} is not a number with a unit such as 90MiB, 1.5GB or 512KiB")
    return int(float(m.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class Option:
    kind: str  # the encoding, e.g. "Q4_K" or "4g64"
    bytes: int
    cost: float  # estimated KLD added by this tensor in this encoding


@dataclass
class Solution:
    choice: dict[str, Option]  # tensor -> chosen option
    bytes: int  # sum of the chosen options' bytes
    cost: float

    def kinds(self) -> dict[str, str]:
        return {t: o.kind for t, o in self.choice.items()}


def pareto(options: list[Option]) -> list[Option]:
    """The options no other option beats on both size and cost, by increasing size."""
    front: list[Option] = []
    for o in sorted(options, key=lambda o: (o.bytes, o.cost)):
        if not front or o.cost < front[-1].cost:
            front.append(o)
    return front


def _pick(fronts: dict[str, list[Option]], lam: float) -> dict[str, int]:
    return {t: min(range(len(f)), key=lambda i: f[i].cost + lam * f[i].bytes) for t, f in fronts.items()}


def _size(fronts: dict[str, list[Option]], idx: dict[str, int]) -> int:
    return sum(fronts[t][i].bytes for t, i in idx.items())


def solve(tensors: dict[str, list[Option]], budget: int) -> Solution:
    """The least-cost choice whose total bytes are at most `budget`."""
    fronts = {t: pareto(opts) for t, opts in tensors.items()}
    smallest = sum(f[0].bytes for f in fronts.values())
    if smallest > budget:
        raise InputError(f"budget of {budget:,} bytes is below the smallest choice ({smallest:,} bytes)")
    lo, hi = 0.0, 1.0  # lam=hi must fit: grow it until the cheapest-bytes choice is taken
    while _size(fronts, _pick(fronts, hi)) > budget:
        lo, hi = hi, hi * 4
        if hi > 1e300:
            break
    for _ in range(100):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 1024
        if _size(fronts, _pick(fronts, mid)) <= budget:
            hi = mid
        else:
            lo = mid
        if lo > 0 and hi / lo < 1 + 1e-9:
            break
    idx = _pick(fronts, hi)
    _fill(fronts, idx, budget)
    best = idx
    dp = _knapsack(fronts, budget)
    if dp is not None:
        _fill(fronts, dp, budget)
        if _cost(fronts, dp) < _cost(fronts, idx):
            best = dp
    choice = {t: fronts[t][i] for t, i in best.items()}
    return Solution(choice, sum(o.bytes for o in choice.values()), sum(o.cost for o in choice.values()))


def _cost(fronts: dict[str, list[Option]], idx: dict[str, int]) -> float:
    return sum(fronts[t][i].cost for t, i in idx.items())


def _knapsack(fronts: dict[str, list[Option]], budget: int, cells: int = 20_000) -> dict[str, int] | None:
    """Exact multiple-choice knapsack on sizes rounded up to budget/cells (so the choice always fits);
    it finds mixes the convex hull misses when a few large tensors dominate."""
    import numpy as np

    names = list(fronts)
    unit = budget / cells
    size = [np.ceil(np.array([o.bytes for o in fronts[t]]) / unit).astype(np.int64) for t in names]
    if sum(int(c[0]) for c in size) > cells or len(names) * cells > 50_000_000:
        return None
    best = np.zeros(cells + 1)  # best[b]: least cost of the tensors so far within b cells
    picks = np.zeros((len(names), cells + 1), dtype=np.int16)
    for i, t in enumerate(names):
        new = np.full(cells + 1, np.inf)
        for k, o in enumerate(fronts[t]):
            c = int(size[i][k])
            if c > cells:
                continue
            cand = np.full(cells + 1, np.inf)
            cand[c:] = best[: cells + 1 - c] + o.cost
            better = cand < new
            new[better] = cand[better]
            picks[i][better] = k
        best = new
    if not np.isfinite(best[cells]):
        return None
    out, b = {}, cells
    for i in range(len(names) - 1, -1, -1):
        k = int(picks[i][b])
        out[names[i]] = k
        b -= int(size[i][k])
    return out


def _fill(fronts: dict[str, list[Option]], idx: dict[str, int], budget: int) -> None:
    """Spend the slack the hull solution leaves: best cost drop per byte first, while it fits."""
    left = budget - _size(fronts, idx)
    while True:
        best, best_gain = None, 0.0
        for t, i in idx.items():
            f = fronts[t]
            for j in range(i + 1, len(f)):
                extra = f[j].bytes - f[i].bytes
                if extra <= left:
                    gain = (f[i].cost - f[j].cost) / max(extra, 1)
                    if gain > best_gain:
                        best, best_gain = (t, j), gain
        if best is None:
            return
        t, j = best
        left -= fronts[t][j].bytes - fronts[t][idx[t]].bytes
        idx[t] = j


def bounds(tensors: dict[str, list[Option]]) -> tuple[int, int]:
    """Smallest and largest total bytes any choice can reach."""
    return (sum(min(o.bytes for o in opts) for opts in tensors.values()),
            sum(max(o.bytes for o in opts) for opts in tensors.values()))  # fmt: skip


def check_target(target: int, fixed: int, tensors: dict[str, list[Option]], ceiling: int, what: str) -> int:
    """The tensors' byte budget for a file of `target` bytes, or a one-line error when no choice of
    candidates can reach it (below the smallest) or it exceeds the unquantized model (`ceiling`)."""
    low, _ = bounds(tensors)
    if target > ceiling:
        raise InputError(f"target {_mib(target)} is above the {what} itself ({_mib(ceiling)}); "
                         "nothing to quantize")  # fmt: skip
    if target < fixed + low:
        raise InputError(f"target {_mib(target)} is below the smallest possible file ({_mib(fixed + low)}, "
                         "every tensor at its smallest candidate type)")  # fmt: skip
    return target - fixed


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB ({n:,} bytes)"

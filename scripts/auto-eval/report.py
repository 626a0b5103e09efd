"""report.py PAIRED.json STOCK:AUTO ...: each file's mean ± standard error over the chunks of
paired.py, then for each pair the paired change of KLD (mean per-chunk difference over the first
file's mean, with the standard error of the differences)."""

import json
import sys

import numpy as np


def mean_se(x: list[float]) -> tuple[float, float]:
    a = np.asarray(x)
    return float(a.mean()), float(a.std(ddof=1) / np.sqrt(len(a)))


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        r = json.load(f)["results"]
    for name, v in r.items():
        (k, ke), (s, se), (p, pe) = mean_se(v["kld"]), mean_se(v["same_top"]), mean_se(v["dp"])
        print(f"{name:22} KLD {k:.6f} ± {ke:.6f}  same top {100 * s:.2f} ± {100 * se:.2f} %  "
              f"mean Δp {100 * p:+.4f} ± {100 * pe:.4f} %")  # fmt: skip
    for pair in sys.argv[2:]:
        a, b = pair.split(":")
        ka, kb = np.asarray(r[a]["kld"]), np.asarray(r[b]["kld"])
        diff = kb - ka
        rel = diff.mean() / ka.mean()
        se = diff.std(ddof=1) / np.sqrt(len(diff)) / ka.mean()
        print(f"{b} vs {a}: KLD change {100 * rel:+.1f} % ± {100 * se:.1f} % "
              f"({b} lower in {(diff < 0).sum()} of {len(diff)} chunks)")  # fmt: skip


if __name__ == "__main__":
    main()

"""rho.py PAIRED.json TABLE.json NAME=VARIANT_DIR ...: Spearman rank correlation over the files
between the estimated KLD (a cached sensitivity table's, probe-calibrated and the Fisher estimate
alone) of each file's tensor types and its held-out KLD from paired.py; and, over the table's
probes, between the Fisher estimate and the real KLD."""

import json
import sys
from pathlib import Path

from scipy.stats import spearmanr

from orlik.quantize.backends import gguf_auto


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        paired = json.load(f)["results"]
    with open(sys.argv[2], encoding="utf-8") as f:
        table = json.load(f)
    est, fisher, real = [], [], []
    for arg in sys.argv[3:]:
        name, vdir = arg.split("=", 1)
        with open(Path(vdir) / "variant.json", encoding="utf-8") as f:
            types = {n: t.upper() for n, t in json.load(f)["extra"]["tensor_type_by_name"].items()}
        e, fi = gguf_auto.estimate(table, types), gguf_auto.estimate(table, types, False)
        k = sum(paired[name]["kld"]) / len(paired[name]["kld"])
        print(f"{name:22} estimate {e:.5g}  fisher {fi:.5g}  held-out {k:.5g}")
        est.append(e)
        fisher.append(fi)
        real.append(k)
    print(
        f"Spearman, estimate vs held-out: {spearmanr(est, real)[0]:.3f}; Fisher alone: {spearmanr(fisher, real)[0]:.3f}"
    )
    pts = [(p["estimated"], p["real"]) for group in table["probes"]["kinds"].values() for p in group]
    print(f"Spearman over the {len(pts)} probes, Fisher estimate vs real: "
          f"{spearmanr([p[0] for p in pts], [p[1] for p in pts])[0]:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()

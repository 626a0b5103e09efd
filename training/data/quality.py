"""`orlik data quality`: an XGBoost classifier of HIGH / MEDIUM / LOW text on stylometric features.

`train` fits it on the labelled set derived from the corpus (degrade.py) and evaluates it on the
held-out split: accuracy, confusion matrix, the features that matter most (md, json, PNG).
`score` labels a JSONL or text file: HIGH only where p(HIGH) >= the cut-off (0.9, as Bielik 7B
v0.1 keeps documents), otherwise the likelier of MEDIUM and LOW. The label goes into each record's
`quality` field, which `orlik train sft` reads as WICEL's sample weight (high/medium/low).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from orlik import owner, progress
from orlik.errors import InputError, MissingDependencyError
from orlik.fsutil import atomic_dir
from orlik.training.data import degrade, io, stylometry

HIGH_CUTOFF = 0.9
ROUNDS = 300
PARAMS = {"objective": "multi:softprob", "num_class": 3, "max_depth": 4, "eta": 0.1, "subsample": 0.8,
          "colsample_bytree": 0.6, "min_child_weight": 2, "lambda": 1.0}  # fmt: skip


def _matrix(texts: list[str]) -> Any:
    import numpy as np

    return np.array([list(stylometry.features(t).values()) for t in texts], dtype=np.float32)


def _xgb() -> Any:
    try:
        import xgboost
    except ImportError:
        raise MissingDependencyError(
            "the quality classifier needs xgboost: pip install -e '.[train]'"
        ) from None
    return xgboost


def label(p: Any, cutoff: float) -> list[str]:
    """HIGH where p(HIGH) >= cutoff, else the likelier of MEDIUM and LOW (columns: high, medium, low)."""
    return ["high" if row[0] >= cutoff else ("medium" if row[1] >= row[2] else "low") for row in p]


def train(
    out: Path,
    seed: int = 0,
    cutoff: float = HIGH_CUTOFF,
    threads: int = 2,
    rounds: int = ROUNDS,
    force: bool = False,
) -> dict[str, Any]:
    import numpy as np

    xgboost = _xgb()
    if rounds <= 0 or not 0.0 < cutoff <= 1.0:
        raise InputError("--rounds must be positive and --high-cutoff in (0, 1]")
    owner.check_replaceable(
        Path(out), force=force, kind="quality-model"
    )  # before the work, not only when writing
    t0 = time.perf_counter()
    tr, te = degrade.examples("train", seed), degrade.examples("heldout", seed)
    progress.info(f"quality: {len(stylometry.FEATURE_NAMES)} features of {len(tr) + len(te)} documents")
    x_tr, x_te = _matrix([e.text for e in tr]), _matrix([e.text for e in te])
    y_tr = np.array([degrade.LABELS.index(e.label) for e in tr])
    y_te = np.array([degrade.LABELS.index(e.label) for e in te])
    counts = np.bincount(y_tr, minlength=3)
    weight = (len(y_tr) / (3 * counts))[y_tr]  # balanced: one HIGH per three MEDIUM and three LOW
    names = stylometry.FEATURE_NAMES
    dtrain = xgboost.DMatrix(x_tr, label=y_tr, weight=weight, feature_names=names)
    booster = xgboost.train({**PARAMS, "seed": seed, "nthread": threads}, dtrain, num_boost_round=rounds)
    p = booster.predict(xgboost.DMatrix(x_te, feature_names=names))
    pred = p.argmax(1)
    cut = np.array([degrade.LABELS.index(x) for x in label(p, cutoff)])
    report = _evaluate(y_te, pred, cut, te, booster, cutoff)
    report.update({"train_examples": len(tr), "heldout_examples": len(te), "features": len(stylometry.FEATURE_NAMES),
                   "pos_features": stylometry.pos_available(), "params": PARAMS, "rounds": rounds, "seed": seed,
                   "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
    with atomic_dir(Path(out), force=force, kind="quality-model") as tmp:
        booster.save_model(str(tmp / "model.json"))
        (tmp / "features.json").write_text(json.dumps(stylometry.FEATURE_NAMES) + "\n")
        _plot(report, tmp / "quality.png")
        io.write_report(tmp / "quality", report, _markdown(report))
    report["out"] = str(out)
    return report


def _evaluate(
    y: Any, pred: Any, cut: Any, te: list[degrade.Example], booster: Any, cutoff: float
) -> dict[str, Any]:
    import numpy as np

    def confusion(a: Any, b: Any) -> list[list[int]]:
        return [[int(((a == i) & (b == j)).sum()) for j in range(3)] for i in range(3)]

    gain = booster.get_score(importance_type="gain")
    top = sorted(gain.items(), key=lambda kv: -kv[1])
    kinds = sorted({e.kind for e in te})
    by_kind = {k: float(np.mean([pred[i] == y[i] for i, e in enumerate(te) if e.kind == k])) for k in kinds}
    per_class = {}
    for i, name in enumerate(degrade.LABELS):
        tp = int(((pred == i) & (y == i)).sum())
        per_class[name] = {"precision": round(tp / max(int((pred == i).sum()), 1), 4),
                           "recall": round(tp / max(int((y == i).sum()), 1), 4)}  # fmt: skip
    return {"labels": list(degrade.LABELS), "accuracy": round(float((pred == y).mean()), 4),
            "confusion": confusion(y, pred), "per_class": per_class,
            "accuracy_by_kind": {k: round(v, 4) for k, v in by_kind.items()},
            "high_cutoff": cutoff, "accuracy_with_cutoff": round(float((cut == y).mean()), 4),
            "confusion_with_cutoff": confusion(y, cut),
            "high_precision_with_cutoff": round(int(((cut == 0) & (y == 0)).sum()) / max(int((cut == 0).sum()), 1), 4),
            "top_features": [[n, round(v, 3)] for n, v in top[:25]]}  # fmt: skip


def _markdown(r: dict[str, Any]) -> str:
    def table(m: list[list[int]]) -> list[str]:
        return ["| true \\ predicted | HIGH | MEDIUM | LOW |", "|---|---:|---:|---:|",
                *[f"| {lab.upper()} | " + " | ".join(str(x) for x in row) + " |" for lab, row in zip(r["labels"], m, strict=True)]]  # fmt: skip

    return "\n".join([
        "# orlik data quality: stylometric XGBoost classifier", "",
        f"{r['features']} features (part-of-speech rates from morfeusz2: {r['pos_features']}), "
        f"{r['train_examples']} training and {r['heldout_examples']} held-out documents "
        "(degrade.py: HIGH = corpus documents and chat answers; MEDIUM = truncated, flattened, listy; LOW = spam, keyword stuffing, "
        "machine noise; held-out = the corpus's held-out documents and chats).", "",
        f"Held-out accuracy (argmax): **{r['accuracy']:.3f}**; with HIGH only at p >= {r['high_cutoff']}: "
        f"{r['accuracy_with_cutoff']:.3f} (HIGH precision {r['high_precision_with_cutoff']:.3f}).", "",
        "## Confusion (argmax)", "", *table(r["confusion"]), "",
        f"## Confusion (HIGH at p >= {r['high_cutoff']})", "", *table(r["confusion_with_cutoff"]), "",
        "## Accuracy by example kind", "", "| kind | accuracy |", "|---|---:|",
        *[f"| {k} | {v:.3f} |" for k, v in r["accuracy_by_kind"].items()], "",
        "## Top features (gain)", "", "| feature | gain |", "|---|---:|",
        *[f"| {n} | {g} |" for n, g in r["top_features"][:15]], "",
        "![confusion and feature importance](quality.png)", "",
    ])  # fmt: skip


def _plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [1, 1.4]})
    m = r["confusion"]
    a.imshow(m, cmap="Blues")
    for i in range(3):
        for j in range(3):
            dark = m[i][j] > max(map(max, m)) / 2
            a.text(j, i, str(m[i][j]), ha="center", va="center", color="white" if dark else "black")
    names = [x.upper() for x in r["labels"]]
    a.set_xticks(range(3), names)
    a.set_yticks(range(3), names)
    a.set_xlabel("predicted")
    a.set_ylabel("true")
    a.set_title(f"held-out accuracy {r['accuracy']:.3f}")
    top = r["top_features"][:15][::-1]
    b.barh([n for n, _ in top], [g for _, g in top], color="#4a7ab5")
    b.set_title("top features (XGBoost gain)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _doc_text(rec: dict[str, Any], text: str) -> str:
    """A chat record is judged by its assistant turns; anything else by its text."""
    msgs = rec.get("messages")
    if isinstance(msgs, list):
        said = [m.get("content", "") for m in msgs if isinstance(m, dict) and m.get("role") == "assistant"]
        return "\n".join(x for x in said if isinstance(x, str)) or text
    return text


def score(inp: Path, model: Path, out: Path, field: str = "text", cutoff: float = HIGH_CUTOFF,
          only_high: bool = False) -> dict[str, Any]:  # fmt: skip
    xgboost = _xgb()
    model = Path(model)
    if not (model / "model.json").is_file():
        raise InputError(
            f"{model} holds no quality model (model.json); train one with `orlik data quality train`"
        )
    if json.loads((model / "features.json").read_text()) != stylometry.FEATURE_NAMES:
        raise InputError(
            f"{model} was trained on other features (another orlik version or no morfeusz2); retrain it"
        )
    if not 0.0 < cutoff <= 1.0:
        raise InputError(f"--high-cutoff must be in (0, 1], not {cutoff}")
    booster = xgboost.Booster()
    booster.load_model(str(model / "model.json"))
    counts = {lab: 0 for lab in degrade.LABELS}
    with io.AtomicJsonl(out) as w:
        for doc in io.read_documents(Path(inp), field, chats=True):
            if "weight" in doc.record:
                raise InputError(
                    f"{doc.where}: record has a 'weight'; SFT takes 'quality' or 'weight', not both"
                )
            x = _matrix([_doc_text(doc.record, doc.text)])
            p = booster.predict(xgboost.DMatrix(x, feature_names=stylometry.FEATURE_NAMES))
            lab = label(p, cutoff)[0]
            counts[lab] += 1
            if only_high and lab != "high":
                continue
            rec = doc.record if io.is_jsonl(Path(inp)) else {**doc.record, "text": doc.text}
            w.write({**rec, "quality": lab, "quality_p": dict(zip(degrade.LABELS, (round(float(x), 4) for x in p[0]), strict=True))})  # fmt: skip
        if sum(counts.values()) == 0:
            raise InputError(f"{inp} holds no documents")
    return {"input": str(inp), "output": str(out), "labels": counts, "high_cutoff": cutoff,
            "written": sum(counts.values()) if not only_high else counts["high"]}  # fmt: skip

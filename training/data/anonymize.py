"""`orlik data anonymize`: Polish personal data replaced by typed placeholders ([PESEL], [EMAIL], ...),
streamed over JSONL or text, with counts per type; `evaluate()` measures precision and recall on the
project's labelled sentences (pii_eval)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from orlik import progress
from orlik.errors import InputError, UnknownNameError
from orlik.training.data import io, pii, pii_eval


def parse_types(spec: str | None) -> tuple[str, ...]:
    if not spec:
        return pii.TYPES
    types = tuple(t.strip().upper() for t in spec.split(",") if t.strip())
    for t in types:
        if t not in pii.TYPES:
            raise UnknownNameError("PII type", t, pii.TYPES)
    return types


def run(inp: Path, out: Path, field: str = "text", types: tuple[str, ...] = pii.TYPES,
        report: Path | None = None) -> dict[str, Any]:  # fmt: skip
    inp, out = Path(inp), Path(out)
    t0 = time.perf_counter()
    counts = {t: 0 for t in types}
    docs = touched = 0
    with io.AtomicJsonl(out) as w, progress.bar("anonymize", total=inp.stat().st_size) as bar:
        for doc in io.read_documents(inp, field):
            docs += 1
            bar.advance(len(doc.text.encode("utf-8")))
            spans = pii.find(doc.text, types)
            for s in spans:
                counts[s.type] += 1
            touched += bool(spans)
            key = field if io.is_jsonl(inp) else "text"
            w.write({**doc.record, key: pii.replace(doc.text, spans)})
        if docs == 0:
            raise InputError(f"{inp} holds no documents")
    result = {"input": str(inp), "output": str(out), "types": list(types), "documents": docs,
              "documents_changed": touched, "replaced": counts,
              "seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip
    md = "\n".join([f"# orlik data anonymize: {inp.name}", "",
                    f"{docs:,} documents, {touched:,} changed.", "", "| type | replaced |", "|---|---:|",
                    *[f"| {t} | {n:,} |" for t, n in counts.items()], ""])  # fmt: skip
    result["report"] = io.write_report(report or io.default_report_prefix(out), result, md)
    return result


def evaluate(report: Path, n: int = 600, seed: int = 0) -> dict[str, Any]:
    """Precision and recall per type on the templated sentences and the hand-written ones."""
    sets = {"templated": pii_eval.evaluate(pii_eval.examples(n, seed)),
            "handwritten": pii_eval.evaluate(pii_eval.handwritten())}  # fmt: skip
    lines = ["# orlik data anonymize: precision and recall", "",
             "Exact character spans and types. `templated`: project templates filled with generated valid",
             "numbers and look-alikes with wrong check digits; `handwritten`: sentences written by hand,",
             "hard negatives included (training/data/pii_eval.py).", ""]  # fmt: skip
    for name, res in sets.items():
        lines += [f"## {name} ({res['sentences']} sentences)", "",
                  "| type | gold | predicted | TP | precision | recall |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for t, v in res["per_type"].items():
            lines.append(f"| {t} | {v['tp'] + v['fn']} | {v['tp'] + v['fp']} | {v['tp']} | "
                         f"{_fmt(v['precision'])} | {_fmt(v['recall'])} |")  # fmt: skip
        lines.append("")
    result: dict[str, Any] = {"seed": seed, **sets}
    result["report"] = io.write_report(Path(report), result, "\n".join(lines))
    return result


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"

"""`orlik data`: corpus cleaning, Polish PII anonymization and the stylometric quality classifier."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from orlik.cli_common import emit

_IN = click.Path(path_type=Path)


@click.group()
def data() -> None:
    """Prepare training text: clean -> anonymize -> quality (JSONL in, JSONL out, streamed)."""


@data.command("clean")
@click.argument("inp", metavar="INPUT", type=_IN)
@click.option("--out", type=_IN, required=True, help="Cleaned JSONL.")
@click.option("--report", type=_IN, default=None, help="Report prefix (.json/.md)  [default: OUT.report]")
@click.option("--field", default="text", show_default=True, help="JSONL field holding the text.")
@click.option(
    "--threshold", default=0.8, show_default=True, help="Near-duplicate Jaccard threshold (word 5-grams)."
)
@click.option("--num-perm", default=128, show_default=True, help="MinHash permutations.")
@click.option("--min-chars", default=200, show_default=True)
@click.option("--max-chars", default=200_000, show_default=True)
@click.option("--min-words", default=30, show_default=True)
@click.option(
    "--repeat-min", default=10, show_default=True, help="A line in this many documents is boilerplate."
)
@click.option(
    "--max-docs",
    default=2_000_000,
    show_default=True,
    help="Dedup filters are sized for this many documents.",
)
@click.option("--no-dedup", is_flag=True, help="Keep exact and near duplicates.")
def data_clean(inp: Path, out: Path, report: Path | None, no_dedup: bool, **kw: Any) -> None:
    """Repair encoding, strip boilerplate lines, filter and deduplicate INPUT (.jsonl or .txt)."""
    from orlik.training.data import clean

    res = clean.run(inp, out, clean.CleanConfig(dedup=not no_dedup, **kw), report=report)
    emit({k: res[k] for k in ("output", "docs_in", "docs_out", "dropped", "changed_docs", "lines_removed",
                              "seconds", "cpu_seconds", "mb_per_s", "report")})  # fmt: skip


@data.command("anonymize")
@click.argument("inp", metavar="INPUT", type=_IN, required=False)
@click.option("--out", type=_IN, default=None, help="Anonymized JSONL.")
@click.option("--report", type=_IN, default=None, help="Report prefix (.json/.md)  [default: OUT.report]")
@click.option("--field", default="text", show_default=True, help="JSONL field holding the text.")
@click.option(
    "--types", default=None, help="Comma-separated subset of: EMAIL,URL,IBAN,PESEL,NIP,REGON,ADDRESS,PHONE"
)
@click.option(
    "--evaluate", is_flag=True, help="Instead: precision/recall per type on orlik's labelled sentences."
)
def data_anonymize(inp: Path | None, out: Path | None, report: Path | None, field: str, types: str | None,
                   evaluate: bool) -> None:  # fmt: skip
    """Replace PESEL, NIP, REGON, IBAN, phone numbers, e-mails, URLs and street addresses by [TYPE]."""
    from orlik.errors import InputError
    from orlik.training.data import anonymize

    if evaluate:
        res = anonymize.evaluate(report or Path("anonymize-eval"))
        emit({name: {t: (v["precision"], v["recall"]) for t, v in res[name]["per_type"].items()}
              for name in ("templated", "handwritten")} | {"report": res["report"]})  # fmt: skip
        return
    if inp is None or out is None:
        raise InputError("give INPUT and --out (or --evaluate)")
    emit(anonymize.run(inp, out, field=field, types=anonymize.parse_types(types), report=report))


@data.group("quality")
def quality() -> None:
    """Stylometric XGBoost classifier of HIGH / MEDIUM / LOW text (Bielik 7B v0.1's filter)."""


@quality.command("train")
@click.option(
    "--out", type=_IN, required=True, help="Model dir: model.json, features.json, quality.{md,json,png}."
)
@click.option("--rounds", default=300, show_default=True, help="Boosting rounds.")
@click.option("--high-cutoff", default=0.9, show_default=True, help="p(HIGH) needed for HIGH in the report.")
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", default=2, show_default=True)
@click.option("--force", is_flag=True, help="Replace --out even if orlik did not make it.")
def quality_train(out: Path, rounds: int, high_cutoff: float, seed: int, threads: int, force: bool) -> None:
    """Fit on the labelled set derived from the corpus; report held-out accuracy and top features."""
    from orlik.training.data import quality as q

    r = q.train(out, seed=seed, cutoff=high_cutoff, threads=threads, rounds=rounds, force=force)
    emit({k: r[k] for k in ("out", "accuracy", "accuracy_with_cutoff", "confusion", "features", "seconds")}
         | {"top_features": [n for n, _ in r["top_features"][:8]]})  # fmt: skip


@quality.command("score")
@click.argument("inp", metavar="INPUT", type=_IN)
@click.option("--model", type=_IN, required=True, help="A dir written by `orlik data quality train`.")
@click.option("--out", type=_IN, required=True, help="JSONL with a `quality` field (high/medium/low).")
@click.option("--field", default="text", show_default=True, help="JSONL text field (chat records: messages).")
@click.option("--high-cutoff", default=0.9, show_default=True, help="HIGH only where p(HIGH) >= this.")
@click.option("--only-high", is_flag=True, help="Write only the HIGH documents.")
def quality_score(inp: Path, model: Path, out: Path, field: str, high_cutoff: float, only_high: bool) -> None:
    """Label INPUT's documents; the `quality` field feeds `orlik train sft` (WICEL weights)."""
    from orlik.training.data import quality as q

    emit(q.score(inp, model, out, field=field, cutoff=high_cutoff, only_high=only_high))

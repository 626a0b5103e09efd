"""`orlik eval`: Polish task accuracy per variant through the OpenAI-compatible endpoint (lm-eval)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from orlik import paths
from orlik.cli_common import emit


@click.command("eval")
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.argument("variants", nargs=-1)
@click.option("--tasks", default="all", show_default=True, help="'all' or comma-separated task names.")
@click.option("--include", "include", multiple=True, type=click.Path(path_type=Path),
              help="Also a folder of lm-eval task YAMLs (+ JSONL) in orlik's task form; repeatable.")  # fmt: skip
@click.option("--variants-dir", type=click.Path(path_type=Path), default=None,
              help="Where VARIANTS are looked up  " + paths.default_help(paths.VARIANTS))  # fmt: skip
@click.option(
    "--base-url", default=None, help="Evaluate a running OpenAI-compatible server instead of serving MODEL."
)
@click.option(
    "--model-name", default=None, help="With --base-url: which served model (default: the only one)."
)
@click.option("--api-key", default=None, help="With --base-url: its API key [env: ORLIK_API_KEY].")
@click.option("--num-concurrent", default=4, show_default=True, help="Requests lm-eval keeps in flight.")
@click.option("--parallel", default=4, show_default=True, help="Slots of each `orlik serve` this starts.")
@click.option("--threads", default=None, type=int, help="CPU threads per served model (default: all cores).")
@click.option("--limit", default=None, type=int, help="Only the first N items of each task (a quick check).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Report dir (bench's, to add columns to its table)  " + paths.default_help(paths.REPORTS))  # fmt: skip
def eval_(model: Path | None, variants: tuple[str, ...], tasks: str, include: tuple[Path, ...],
          variants_dir: Path | None, base_url: str | None, model_name: str | None, api_key: str | None,
          num_concurrent: int, parallel: int, threads: int | None, limit: int | None, out: Path | None) -> None:  # fmt: skip
    """Accuracy on the Polish tasks for MODEL (FP16) and each VARIANT, each served by `orlik serve`.

    lm-eval's local-completions model scores every choice through /v1/completions (echo + logprobs).
    Writes eval.json, eval.md and kld_accuracy.png to --out and adds the accuracy columns to bench's
    table.md and results.json there.
    """
    from orlik.benchmarks import eval_report
    from orlik.errors import InputError

    if base_url is None and model is None:
        raise InputError("give a MODEL (an FP16 checkpoint) or --base-url of a running server")
    if out is None:
        out = paths.reports_dir(model) if model is not None else Path("eval-reports")
    res, written = run_eval(model, variants, out, tasks=tasks, include=include, variants_dir=variants_dir,
                            base_url=base_url, api_key=api_key or os.environ.get("ORLIK_API_KEY"),
                            model_name=model_name, num_concurrent=num_concurrent, parallel=parallel,
                            threads=threads, limit=limit)  # fmt: skip
    if click.get_current_context().find_root().obj.get("json"):
        emit(res)
        return
    bench = out / "results.json"
    import json

    click.echo(eval_report.table_md(res, json.loads(bench.read_text()) if bench.is_file() else None))
    click.echo(f"report: {out}/ {', '.join(written)}")


def run_eval(model: Path | None, variants: tuple[str, ...] | list[str], out: Path, *, base_url: str | None = None,
             model_name: str | None = None, num_concurrent: int = 4, parallel: int = 4,
             **kw: Any) -> tuple[dict[str, Any], list[str]]:  # fmt: skip
    """Evaluate and write eval.json, eval.md and the bench columns to `out` (`orlik eval` and the
    pipeline's eval step); returns the results and the names written."""
    import time
    from importlib import metadata

    from orlik.benchmarks import eval as ev
    from orlik.benchmarks import eval_report

    t0 = time.monotonic()
    specs, scores = ev.evaluate(model, variants, base_url=base_url, model_name=model_name,
                                num_concurrent=num_concurrent, parallel=parallel, logs=out / "eval-logs", **kw)  # fmt: skip
    settings = {"num_concurrent": num_concurrent, "parallel": parallel, "limit": kw.get("limit"),
                "lm_eval": metadata.version("lm_eval"), "seconds": round(time.monotonic() - t0, 1),
                "base_url": base_url}  # fmt: skip
    name = paths.model_name(model) if model is not None else (model_name or base_url or "")
    res = eval_report.results(name, specs, scores, settings)
    return res, eval_report.write(out, res)

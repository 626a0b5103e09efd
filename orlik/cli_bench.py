"""`orlik bench` and `orlik recommend`: Table 8 against FP16, and the best variant for a memory budget."""

from __future__ import annotations

from pathlib import Path

import click

from orlik import paths
from orlik.cli_common import Constant, emit

_REFERENCE = "orlik.benchmarks.reference"  # whose constants are defaults


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("variants", nargs=-1)
@click.option(
    "--variants-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where VARIANTS are looked up by name; all of them when none are named  "
    + paths.default_help(paths.VARIANTS),
)
@click.option(
    "--ctx",
    "ctx_len",
    type=int,
    default=Constant("orlik.benchmarks.run", "CTX"),
    show_default=True,
    help="Tokens per chunk; the second half of each is scored.",
)
@click.option(
    "--text",
    "text_files",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Evaluate on this UTF-8 file instead of the corpus held-out split; repeatable (one row each).",
)
@click.option(
    "--calib",
    type=click.Path(path_type=Path),
    default=None,
    help="calibration.jsonl (or its dir) the texts must not overlap  "
    + paths.default_help(paths.CALIB).replace("[default:", "[default, when it exists:"),
)
@click.option(
    "--speed", is_flag=True, help="Also measure prompt/decode speed, TTFT and peak RSS (child processes)."
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Report dir  " + paths.default_help(paths.REPORTS),
)
@click.option(
    "--reference",
    "mode",
    type=click.Choice(["auto", "topk", "exact"]),
    default="auto",
    show_default=True,
    help="exact: FP16 runs beside the variants, full-vocabulary KLD; topk: variants against the cached "
    "compact FP16 reference, KLD with an exact error bound; auto: exact when FP16 fits in memory "
    "beside a variant, else topk.",
)
@click.option(
    "--fp16-engine",
    "engine",
    type=click.Choice(["auto", "transformers", "llama.cpp"]),
    default="auto",
    show_default=True,
    help="What computes the FP16 logits. llama.cpp: the checkpoint's lossless 16-bit GGUF, as "
    "llama-perplexity's base pass; transformers: the safetensors checkpoint; auto: llama.cpp when every "
    "variant is GGUF, else transformers.",
)
@click.option(
    "--kmax",
    type=int,
    default=Constant(_REFERENCE, "KMAX"),
    show_default=True,
    help="Most top tokens kept per position in the reference.",
)
@click.option(
    "--tail-mass",
    type=float,
    default=Constant(_REFERENCE, "TAIL_MASS"),
    show_default=True,
    help="FP16 probability mass the reference may leave out.",
)
@click.option("--threads", default=None, type=int, help="CPU threads per runtime (default: all cores).")
@click.option("--no-verify", is_flag=True, help="Skip checking the variants' file sha256s.")
@click.option("--no-cards", is_flag=True, help="Do not write README.md model cards into the variant dirs.")
@click.option(
    "--license",
    "license_",
    default=None,
    help="Model-card license  [default: the base README's, else 'other']",
)
@click.option("--base-model", default=None, help="Model-card base_model  [default: the checkpoint's name]")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Check the inputs, print what would run (engine, KLD mode, threads) and stop.",
)
def bench(model: Path, variants: tuple[str, ...], variants_dir: Path | None, ctx_len: int, text_files: tuple[Path, ...],
          calib: Path | None, speed: bool, out: Path | None, mode: str, engine: str, kmax: int,
          tail_mass: float, threads: int | None, no_verify: bool, no_cards: bool, license_: str | None,
          base_model: str | None, dry_run: bool) -> None:  # fmt: skip
    """Table 8: every VARIANT against the FP16 checkpoint MODEL on the same tokens (llama.cpp's method).

    Writes table.md, table.csv, results.json, pareto.png (and speed.png with --speed) to --out and a
    README.md model card into each variant, and prints the table.
    """
    from orlik.benchmarks import report
    from orlik.benchmarks.plan import Options, make_plan
    from orlik.benchmarks.run import bench as run_bench

    opts = Options(ctx=ctx_len, text_files=text_files, calib=calib, speed=speed, mode=mode, engine=engine,
                   kmax=kmax, tail_mass=tail_mass, threads=threads,
                   verify=not no_verify, cards=not no_cards, license=license_, base_model=base_model)  # fmt: skip
    if dry_run:
        emit(make_plan(model, variants, variants_dir=variants_dir, out=out, opts=opts).describe())
        return
    results = run_bench(model, variants, variants_dir=variants_dir, out=out, opts=opts)
    if click.get_current_context().find_root().obj.get("json"):
        emit({k: results[k] for k in ("out", "model", "settings", "texts", "variants")})
        return
    report.print_table(results)
    click.echo(f"report: {results['out']}/ table.md, table.csv, results.json, {', '.join(results['plots'])}")


@click.command()
@click.option("--memory", required=True, help="Memory budget, e.g. 4GiB, 512MiB, 8GB.")
@click.option("--ctx", default=4096, show_default=True, help="Context length whose KV cache must fit too.")
@click.option(
    "--reports",
    type=click.Path(path_type=Path),
    default=None,
    help="A bench output dir (or its results.json)  [default: the one runs/*/reports]",
)
def recommend(memory: str, ctx: int, reports: Path | None) -> None:
    """The variant with the lowest KLD that fits --memory at --ctx, and why."""
    from orlik.benchmarks import recommend as rec

    res = rec.recommend(rec.load_results(reports or rec.find_reports()), rec.parse_size(memory), ctx)
    if click.get_current_context().find_root().obj.get("json"):
        emit(res)
        return
    click.echo(f"{res['pick']}: {res['why']}")

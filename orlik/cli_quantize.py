"""`orlik quantize` and `orlik inspect`: build variants and show what a variant or checkpoint holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from orlik import paths
from orlik.cli_common import emit, runs_once


def _pairs(example: str, split_last: bool) -> Any:
    """A click callback turning repeated KEY=VALUE options into (key, value) pairs."""

    def parse(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[tuple[str, str]]:
        pairs = []
        for v in values:
            key, sep, value = v.rpartition("=") if split_last else v.partition("=")
            if not sep or not key or not value:
                raise click.BadParameter(f"{v!r} is not {example}")
            pairs.append((key, value))
        return pairs

    return parse


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--recipe",
    "recipes",
    multiple=True,
    required=True,
    help="Recipe or preset, repeatable: Q4_K_M, Q4_K_M-imat, IQ2_XXS-imat, gptq-w4g128, awq-w4g128, "
    "hqq-3bit-g64, mlx-q4, mlx-q4-awq; presets bielik-table8, bielik-other, gguf-all.",
)
@click.option(
    "--calib",
    type=click.Path(path_type=Path),
    default=None,
    help="`orlik calibrate build` output dir; its imatrix.gguf is used (computed if missing)  "
    + paths.default_help(paths.CALIB).replace("[default:", "[default, when it exists:"),
)
@click.option(
    "--imatrix", type=click.Path(path_type=Path), default=None, help="imatrix file (wins over --calib)."
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Variants root  " + paths.default_help(paths.VARIANTS),
)
@click.option(
    "--force",
    is_flag=True,
    help="Rebuild variants even when they verify; replace folders orlik did not make.",
)
@click.option(
    "--type-override",
    "overrides",
    multiple=True,
    callback=_pairs("GLOB=TYPE (e.g. 'blk.*.ffn_down.weight=Q6_K')", split_last=True),
    help="GLOB=TYPE for matching tensors (whole GGUF names, e.g. 'blk.*.ffn_down.weight=Q6_K'); repeatable.",
)
@click.option(
    "--option",
    "options",
    multiple=True,
    callback=_pairs("KEY=VALUE (e.g. calib_samples=64)", split_last=False),
    help="Backend option for the recipes that read it, e.g. calib_samples=64, damp=0.05, act_order=true, "
    "lean_malloc=false, axis=0, embed_bits=8; repeatable. Recorded in variant.json.",
)
@click.option("--output-type", default=None, help="Tensor type of output.weight (e.g. Q8_0).")
@click.option("--embedding-type", default=None, help="Tensor type of token_embd.weight (e.g. Q4_K).")
@click.option(
    "--target-size", default=None, help="Size of the auto/mlx-auto file, e.g. 90MiB (--recipe auto)."
)
@click.option("--target-bpw", default=None, type=float, help="Bits per weight of the auto/mlx-auto file.")
def quantize(model: Path, recipes: tuple[str, ...], calib: Path | None, imatrix: Path | None, out: Path | None,
             force: bool, overrides: list[tuple[str, str]], options: list[tuple[str, str]], output_type: str | None,
             embedding_type: str | None, target_size: str | None, target_bpw: float | None) -> None:  # fmt: skip
    """Produce quantized variants of MODEL, one directory with variant.json per recipe."""
    from orlik.quantize import recipe as rec
    from orlik.quantize import run

    named = rec.with_target(rec.expand(list(recipes)), target_size, target_bpw)
    plan = run.with_options(run.with_overrides(named, overrides, output_type, embedding_type), options)
    if calib is None and (paths.calib_dir(model) / "calibration.jsonl").is_file():
        calib = paths.calib_dir(model)
    needs_imatrix = imatrix is None and calib is not None and any(r.imatrix for r in plan)
    if needs_imatrix and not (calib / "imatrix.gguf").is_file() and (calib / "calibration.jsonl").is_file():
        from orlik.calibration import imatrix as imat

        imat.compute(model, calib, lang="mixed")
    calibration = run.calibration_for(calib, imatrix)
    outcomes = run.quantize_all(model, plan, out or paths.variants_dir(model), calib=calibration,
                                force=force, check_runtime=runs_once)  # fmt: skip
    from orlik.checkpoint import Checkpoint
    from orlik.quantize import gguf_tokens

    built = [o.variant for o in outcomes if o.variant is not None]
    gguf_tokens.warn_if_different(Checkpoint.open(model), built, calibration.jsonl)
    rows = [o.summary() for o in outcomes]
    if click.get_current_context().find_root().obj.get("json"):
        emit({"variants": rows})
    else:
        for r in rows:
            if r["status"] == "failed":
                click.echo(f"{r['name']:<14} failed   {r['reason']}")
                continue
            click.echo(
                f"{r['name']:<14} {r['status']:<8} {r['bytes'] / 2**20:8.2f} MiB {r['bpw']:6.3f} bpw  {r['path']}"
            )
    run.raise_failures(outcomes)  # after the summary: exit 2 (1 if a library broke) when any failed


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--verify/--no-verify", default=True, help="Check file sha256s against the manifest.")
def inspect(path: Path, verify: bool) -> None:
    """Show a variant's manifest or a checkpoint's summary."""
    from orlik.checkpoint import Checkpoint
    from orlik.errors import ManifestError
    from orlik.manifest import MANIFEST, Variant

    if (path / MANIFEST).is_file():
        v = Variant.load(path)
        d = v.to_dict()
        if verify:
            bad = v.verify()
            if bad:
                raise ManifestError(f"{path}: files differ from the manifest: {', '.join(bad)}")
            d["verified"] = True
        auto = v.extra.get("auto")
        if auto and not click.get_current_context().find_root().obj.get("json"):
            from orlik.quantize.backends.gguf_auto import summary_lines

            hidden = ("auto", "tensor_type_by_name", "llama_quantize_args")  # one line per tensor below
            d["extra"] = {k: x for k, x in d["extra"].items() if k not in hidden}
            emit(d)
            click.echo("\n".join(summary_lines(auto)))
            return
        emit(d)
    else:
        c = Checkpoint.open(path)
        emit(
            {
                "path": str(c.path),
                "arch": c.arch,
                "weights_bytes": c.weights_bytes,
                "hash": c.hash,
                "chat_template": bool(c.chat_template),
            }
        )

"""The `orlik` command: one thin verb per pipeline stage, each importing its stage lazily."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from orlik import __version__, paths
from orlik.cli_common import Constant, emit, runs_once
from orlik.cli_common import not_built as _not_built  # noqa: F401  (kept importable from orlik.cli)
from orlik.cli_data import data
from orlik.cli_eval import eval_
from orlik.cli_pipeline import pipeline
from orlik.cli_serve import chat, serve
from orlik.cli_train import train
from orlik.errors import OrlikError

_DEBUG = {"on": False}
_BUILD, _REFERENCE = "orlik.calibration.build", "orlik.benchmarks.reference"  # whose constants are defaults


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="orlik")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or chatter.")
@click.option("--json", "json_mode", is_flag=True, help="Machine-readable output.")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool, json_mode: bool) -> None:
    """orlik: quantize, benchmark and serve Polish-English language models.

    Data flow: train -> calibrate -> quantize -> bench -> serve. Each verb reads the previous
    stage's files, so you can start at any stage with your own checkpoint or variant.
    """
    from orlik import progress

    _DEBUG["on"] = debug
    progress.configure(quiet=quiet, json_mode=json_mode)
    ctx.obj = {"json": json_mode, "quiet": quiet}


for _command in (train, data, serve, chat, pipeline, eval_):  # verbs kept in modules of their own
    cli.add_command(_command)


# ---------------------------------------------------------------- calibrate / quantize / bench / recommend / inspect
@cli.group()
def calibrate() -> None:
    """Polish-English calibration set and importance matrix."""


@calibrate.command("build")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Output dir for calibration.jsonl and card.{json,md}  " + paths.default_help(paths.CALIB),
)
@click.option(
    "--tokens",
    type=int,
    default=Constant(_BUILD, "TOKENS"),
    show_default=True,
    help="Total tokens, counted with MODEL's tokenizer.",
)
@click.option(
    "--pl-ratio",
    type=float,
    default=Constant(_BUILD, "PL_RATIO"),
    show_default=True,
    help="Polish share of the tokens (--lang mixed).",
)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--lang",
    type=click.Choice(["pl", "en", "mixed"]),
    default="mixed",
    show_default=True,
    help="One language only, e.g. for a language-specific imatrix.",
)
@click.option(
    "--file",
    "files",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Your own .txt/.md/.jsonl ('text' field) file or directory; repeatable. Used first.",
)
@click.option("--no-corpus", is_flag=True, help="Leave out the built-in corpus documents.")
@click.option("--no-chat", is_flag=True, help="Leave out chats rendered through MODEL's chat template.")
@click.option("--no-parallel", is_flag=True, help="Leave out the Polish-English parallel pairs.")
@click.option(
    "--max-sample-tokens",
    type=int,
    default=Constant(_BUILD, "MAX_SAMPLE_TOKENS"),
    show_default=True,
    help="Longer texts are cut into chunks.",
)
@click.option(
    "--force", is_flag=True, help="Write into --out even if orlik did not make it (only its 3 files change)."
)
def calibrate_build(model: Path, out: Path | None, tokens: int, pl_ratio: float, seed: int, lang: str,
                    files: tuple[Path, ...], no_corpus: bool, no_chat: bool, no_parallel: bool,
                    max_sample_tokens: int, force: bool) -> None:  # fmt: skip
    """Build a Polish-English calibration set (calibration.jsonl + card) for MODEL's tokenizer."""
    from orlik.calibration import build as calib

    card = calib.build(model, out, tokens=tokens, pl_ratio=pl_ratio, seed=seed, lang=lang,
                       user_files=list(files), include_corpus=not no_corpus, include_chat=not no_chat,
                       include_parallel=not no_parallel, max_sample_tokens=max_sample_tokens,
                       force=force)  # fmt: skip
    res = card["result"]
    emit({"out": card["out"], "samples": res["samples"], "tokens": res["tokens"],
          "tokens_by_lang": res["tokens_by_lang"], "pl_ratio": res["pl_ratio"],
          "tokens_by_source": res["tokens_by_source"], "dropped": card["drops"],
          "sha256": card["calibration_sha256"]})  # fmt: skip


@calibrate.command("imatrix")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--calib",
    type=click.Path(path_type=Path),
    default=None,
    help="calibration.jsonl or its directory  " + paths.default_help(paths.CALIB),
)
@click.option(
    "--lang",
    type=click.Choice(["pl", "en", "mixed"]),
    default="mixed",
    show_default=True,
    help="Use only the samples of this language.",
)
@click.option(
    "--chunk",
    type=int,
    default=Constant("orlik.calibration.imatrix", "CHUNK"),
    show_default=True,
    help="Tokens per llama-imatrix chunk (its -c).",
)
@click.option(
    "--chunks", "max_chunks", default=None, type=int, help="At most this many chunks (default: all)."
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="imatrix file  [default: <calib dir>/imatrix.gguf, imatrix-pl.gguf, imatrix-en.gguf]",
)
@click.option("--force", is_flag=True, help="Recompute even if an up-to-date imatrix exists.")
def calibrate_imatrix(model: Path, calib: Path | None, lang: str, chunk: int, max_chunks: int | None,
                      out: Path | None, force: bool) -> None:  # fmt: skip
    """Compute MODEL's importance matrix with llama-imatrix on its F16 GGUF (llama.cpp format)."""
    from orlik.calibration import imatrix

    calib = calib if calib is not None else paths.calib_dir(model)
    card = imatrix.compute(model, calib, lang=lang, chunk=chunk, max_chunks=max_chunks, out=out, force=force)
    emit({"out": card["path"], "lang": card["lang"], "chunks": card["chunks"], "chunk_size": card["chunk_size"],
          "tokens_processed": card["tokens_processed"], "entries": card["entries"],
          "calibration_sha256": card["calibration_sha256"], "sha256": card["sha256"],
          "perplexity_f16": card["perplexity_f16"], "reused": bool(card.get("reused"))})  # fmt: skip


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


@cli.command()
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


@cli.command()
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


@cli.command()
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


@cli.command()
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


def main(argv: list[str] | None = None) -> None:
    # orlik draws its own progress; transformers' per-load tqdm bars ("Loading weights") are noise here.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        cli.main(args=argv, prog_name="orlik", standalone_mode=False)
    except OrlikError as e:
        if _DEBUG["on"]:
            raise
        click.echo(f"orlik: error: {e}", err=True)
        sys.exit(e.exit_code)
    except OSError as e:
        if _DEBUG["on"] or e.filename is None:
            raise
        # A path the user named that cannot be reached (permissions, a vanished mount): one line.
        click.echo(f"orlik: error: cannot access {e.filename}: {e.strerror or e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("orlik: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("orlik: interrupted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)

"""`orlik pipeline CONFIG.toml`: calibrate -> imatrix -> quantize -> bench (-> eval) for one
checkpoint, from one config file, resumable.

Each step writes atomically, so an interrupted run leaves only finished outputs behind, and a rerun
skips every step whose outputs still verify: the calibration set whose card hash matches and was
built from the same settings, an imatrix whose card matches the set (calibration/imatrix.py reuses
it), variants whose manifests verify (quantize/run.py skips them), and a report built from the same
variants and settings. What it remembers lives in `<work>/pipeline.json`. scripts/pipeline.toml is
an example config with every key.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from orlik import paths, progress
from orlik.cli_common import emit, runs_once
from orlik.errors import InputError
from orlik.fsutil import atomic_write_text, sha256_file

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

STEPS = ("calibrate", "imatrix", "quantize", "bench", "eval")
OPTIONAL = ("eval",)  # off unless the config has its section; the others run with defaults when absent
# Config key -> keyword of the stage function, per step; anything else in a section is refused.
KEYS: dict[str, dict[str, str]] = {
    "calibrate": {"tokens": "tokens", "pl_ratio": "pl_ratio", "seed": "seed", "lang": "lang", "files": "user_files",
                  "corpus": "include_corpus", "chat": "include_chat", "parallel": "include_parallel",
                  "max_sample_tokens": "max_sample_tokens"},
    "imatrix": {"lang": "lang", "chunk": "chunk", "chunks": "max_chunks"},
    "quantize": {"recipes": "recipes", "options": "options", "overrides": "overrides", "output_type": "output_type",
                 "embedding_type": "embedding_type"},
    "bench": {"variants": "variants", "texts": "text_files", "ctx": "ctx", "speed": "speed", "reference": "mode",
              "fp16_engine": "engine", "kmax": "kmax", "tail_mass": "tail_mass", "threads": "threads",
              "license": "license", "base_model": "base_model", "cards": "cards"},
    "eval": {"variants": "variants", "tasks": "tasks", "limit": "limit", "parallel": "parallel",
             "num_concurrent": "num_concurrent", "threads": "threads"},
}  # fmt: skip
STATE = "pipeline.json"


@dataclass
class Config:
    model: Path
    work: Path
    steps: dict[str, dict[str, Any]]  # step -> its section; a step that is absent or `false` is skipped

    @property
    def calib(self) -> Path:
        return self.work / paths.CALIB

    @property
    def variants(self) -> Path:
        return self.work / paths.VARIANTS

    @property
    def reports(self) -> Path:
        return self.work / paths.REPORTS


def load_config(path: Path, overrides: Sequence[tuple[str, str]] = ()) -> Config:
    """Read CONFIG.toml, apply `--set KEY=VALUE` overrides (dotted keys, TOML values) and check it.
    Paths in it are relative to the current directory, as on the command line."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"cannot read the pipeline config {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path} is not valid TOML: {e}") from None
    for key, value in overrides:
        _set(raw, key, value)
    unknown = sorted(set(raw) - {"model", "work", *STEPS})
    if unknown:
        raise InputError(f"{path}: unknown key {unknown[0]!r}; valid: model, work, {', '.join(STEPS)}")
    if not isinstance(raw.get("model"), str):
        raise InputError(f"{path}: `model` (the FP16 checkpoint folder) is required")
    model = Path(raw["model"]).expanduser()
    steps: dict[str, dict[str, Any]] = {}
    for step in STEPS:
        section = raw.get(step, False if step in OPTIONAL else {})
        if section is False:
            continue
        if not isinstance(section, dict):
            raise InputError(f"{path}: [{step}] must be a table (or `{step} = false` to skip the step)")
        bad = sorted(set(section) - set(KEYS[step]))
        if bad:
            raise InputError(f"{path}: [{step}] has unknown key {bad[0]!r}; valid: {', '.join(KEYS[step])}")
        steps[step] = section
    if not steps.get("quantize", {}).get("recipes"):
        raise InputError(f'{path}: [quantize] recipes = [...] is required (e.g. ["Q4_K_M", "gptq-w4g128"])')
    work = Path(raw["work"]).expanduser() if isinstance(raw.get("work"), str) else paths.work_dir(model)
    return Config(model, work, steps)


def _set(raw: dict[str, Any], key: str, value: str) -> None:
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value  # a bare string: --set model=runs/x/fp16
    *parents, last = key.split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise InputError(f"--set {key}: {p} is not a table in the config")
    node[last] = parsed


def _kwargs(step: str, section: dict[str, Any]) -> dict[str, Any]:
    return {KEYS[step][k]: v for k, v in section.items()}


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _calibrate(cfg: Config, state: dict[str, Any]) -> dict[str, Any]:
    from orlik.calibration import build

    section = cfg.steps["calibrate"]
    fp = _fingerprint(section, str(cfg.model.resolve()))
    if state.get("calibrate") == fp and _calibration_verifies(cfg.calib):
        return {"status": "skipped", "why": "calibration.jsonl matches its card and these settings"}
    kw = _kwargs("calibrate", section)
    kw["user_files"] = [Path(f).expanduser() for f in kw.get("user_files", [])]
    card = build.build(cfg.model, cfg.calib, **kw)
    state["calibrate"] = fp
    return {"status": "done", "tokens": card["result"]["tokens"], "samples": card["result"]["samples"]}


def _calibration_verifies(calib: Path) -> bool:
    try:
        card = json.loads((calib / "card.json").read_text(encoding="utf-8"))
        return bool(card["calibration_sha256"] == sha256_file(calib / "calibration.jsonl"))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _imatrix(cfg: Config, state: dict[str, Any]) -> dict[str, Any]:
    from orlik.calibration import imatrix

    card = imatrix.compute(cfg.model, cfg.calib, **_kwargs("imatrix", cfg.steps["imatrix"]))
    return {
        "status": "skipped" if card.get("reused") else "done",
        "out": card["path"],
        "chunks": card["chunks"],
    }


def _quantize(cfg: Config, state: dict[str, Any]) -> dict[str, Any]:
    from orlik.checkpoint import Checkpoint
    from orlik.quantize import gguf_tokens, run
    from orlik.quantize import recipe as rec

    kw = _kwargs("quantize", cfg.steps["quantize"])
    plan = run.with_overrides(rec.expand(list(kw["recipes"])), list((kw.get("overrides") or {}).items()),
                              kw.get("output_type"), kw.get("embedding_type"))  # fmt: skip
    plan = run.with_options(plan, [(k, str(v).lower() if isinstance(v, bool) else str(v))
                                   for k, v in (kw.get("options") or {}).items()])  # fmt: skip
    calib = (
        cfg.calib
        if (cfg.calib / "calibration.jsonl").is_file() or (cfg.calib / "imatrix.gguf").is_file()
        else None
    )
    calibration = run.calibration_for(calib)
    outcomes = run.quantize_all(cfg.model, plan, cfg.variants, calib=calibration,
                                check_runtime=runs_once)  # as `orlik quantize`: kept once it has run  # fmt: skip
    if any(o.status == "failed" for o in outcomes):
        raise run.RecipesFailed(outcomes)
    built = [o.variant for o in outcomes if o.variant is not None]
    gguf_tokens.warn_if_different(Checkpoint.open(cfg.model), built, calibration.jsonl)
    built = [o.name for o in outcomes if o.status != "skipped"]
    return {"status": "done" if built else "skipped", "variants": [o.summary() for o in outcomes]}


def _bench(cfg: Config, state: dict[str, Any]) -> dict[str, Any]:
    from orlik.benchmarks.plan import Options, resolve_variants
    from orlik.benchmarks.run import bench
    from orlik.checkpoint import Checkpoint

    kw = _kwargs("bench", cfg.steps["bench"])
    names = list(kw.pop("variants", []))
    kw["text_files"] = [Path(t).expanduser() for t in kw.get("text_files", [])]
    if (cfg.calib / "calibration.jsonl").is_file():  # the texts must not overlap it (as in `orlik bench`)
        kw["calib"] = cfg.calib / "calibration.jsonl"
    variants = resolve_variants(names, cfg.variants)
    manifests = {v.name: sha256_file(v.path / "variant.json") for v in variants if v.path}
    fp = _fingerprint(cfg.steps["bench"], Checkpoint.open(cfg.model).hash, manifests)
    done = all((cfg.reports / f).is_file() for f in ("results.json", "table.md"))
    if state.get("bench") == fp and done:
        return {
            "status": "skipped",
            "why": "the report is from these variants and settings",
            "out": str(cfg.reports),
        }
    results = bench(cfg.model, names, variants_dir=cfg.variants, out=cfg.reports, opts=Options(**kw))
    # The model cards bench writes into the variants are part of their manifests now.
    state["bench"] = _fingerprint(cfg.steps["bench"], Checkpoint.open(cfg.model).hash,
                                  {v.name: sha256_file(v.path / "variant.json") for v in variants if v.path})  # fmt: skip
    return {"status": "done", "out": results["out"], "results": results}


def _eval(cfg: Config, state: dict[str, Any]) -> dict[str, Any]:
    """Polish task accuracy through `orlik serve` (lm-eval), FP16 and the named variants; its columns
    join bench's table. Redone when the report or this section changed."""
    from orlik.cli_eval import run_eval

    kw = _kwargs("eval", cfg.steps["eval"])
    names = list(kw.pop("variants", []))
    fp = _fingerprint(cfg.steps["eval"], state.get("bench"))
    if state.get("eval") == fp and (cfg.reports / "eval.json").is_file():
        return {"status": "skipped", "why": "eval.json is from this report and these settings"}
    _, written = run_eval(cfg.model, names, cfg.reports, variants_dir=cfg.variants, **kw)
    state["eval"] = fp
    return {"status": "done", "written": written}


RUNNERS = {
    "calibrate": _calibrate,
    "imatrix": _imatrix,
    "quantize": _quantize,
    "bench": _bench,
    "eval": _eval,
}


def run_pipeline(cfg: Config) -> dict[str, dict[str, Any]]:
    """Run the configured steps in order; the state is saved after each, so an interruption loses
    at most the step in flight."""
    from orlik.checkpoint import Checkpoint

    Checkpoint.open(cfg.model)  # a bad checkpoint fails before anything is written
    state_file = cfg.work / STATE
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        state = {}
    report: dict[str, dict[str, Any]] = {}
    for step in STEPS:
        if step not in cfg.steps:
            report[step] = {"status": "off"}
            continue
        progress.info(f"[bold]pipeline: {step}[/]")
        report[step] = RUNNERS[step](cfg, state)
        cfg.work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(state_file, json.dumps(state, indent=2) + "\n")
        progress.info(f"pipeline: {step} {report[step]['status']}")
    return report


@click.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config value, e.g. --set model=runs/x/fp16 --set bench.speed=false; repeatable.",
)
def pipeline(config: Path, overrides: tuple[str, ...]) -> None:
    """calibrate -> imatrix -> quantize -> bench for the checkpoint CONFIG names, skipping what still verifies.

    CONFIG is a TOML file (example: scripts/pipeline.toml). Rerun it after an interruption or a
    change: finished steps whose outputs verify are skipped.
    """
    from orlik.benchmarks import report as rep

    pairs = []
    for o in overrides:
        key, sep, value = o.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{o!r} is not KEY=VALUE", param_hint="--set")
        pairs.append((key, value))
    cfg = load_config(config, pairs)
    steps = run_pipeline(cfg)
    results = steps.get("bench", {}).pop("results", None)
    if results is None and steps.get("bench", {}).get("status") == "skipped":
        results = json.loads((cfg.reports / "results.json").read_text(encoding="utf-8"))  # the table it kept
    if click.get_current_context().find_root().obj.get("json"):
        emit({"work": str(cfg.work), "steps": steps})
        return
    for step, r in steps.items():
        click.echo(f"{step:<10} {r['status']}")
    if results is not None:
        rep.print_table(results)
    click.echo(f"outputs in {cfg.work}/ (calib, variants, reports)")

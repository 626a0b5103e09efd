"""The quantize driver: recipes -> `variants/<name>/` directories, each written atomically.

A variant is rebuilt only when its manifest does not verify (files changed, recipe, base checkpoint
or imatrix differ); an interrupted run leaves at most a `<name>.partial` directory, never a variant.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orlik import owner, progress
from orlik.checkpoint import Checkpoint
from orlik.errors import InputError, ManifestError, OrlikError, ToolError
from orlik.fsutil import atomic_dir, check_writable, sha256_file
from orlik.manifest import MANIFEST, Variant
from orlik.quantize.backends import Backend, Calibration, backend_class, backend_for
from orlik.quantize.recipe import Recipe, expand

# Loads a finished variant directory in its runtime and runs one forward pass; raises if it cannot.
# The CLI passes serving's (quantize never imports serving); a variant is kept only if it passes.
RuntimeCheck = Callable[[Path], dict[str, Any]]


@dataclass
class Outcome:
    name: str
    variant: Variant | None  # None when the recipe failed
    status: str  # "built", "rebuilt" (an old one did not verify), "skipped" (verified, reused), "failed"
    seconds: float
    reason: str | None = None  # why an existing variant was rebuilt, or why the recipe failed
    error: Exception | None = None

    def summary(self) -> dict[str, Any]:
        v = self.variant
        if v is None:
            return {"name": self.name, "status": self.status, "seconds": round(self.seconds, 1),
                    "reason": self.reason}  # fmt: skip
        return {"name": v.name, "status": self.status, "path": str(v.path), "bytes": v.bytes, "bpw": v.bpw,
                "tensor_types": v.extra.get("tensor_types"), "seconds": round(self.seconds, 1),
                **({"reason": self.reason} if self.reason else {})}  # fmt: skip


class RecipesFailed(OrlikError):
    """Some recipes of a multi-recipe run failed; the variants of the others were kept."""

    def __init__(self, outcomes: list[Outcome]) -> None:
        self.outcomes = outcomes
        failed = [o for o in outcomes if o.status == "failed"]
        kept = len(outcomes) - len(failed)
        # exit 2 when every failure was the user's to fix, 1 when a library broke
        self.exit_code = 2 if all(isinstance(o.error, OrlikError) for o in failed) else 1
        super().__init__(
            "; ".join(f"{o.name}: {o.reason}" for o in failed) + f" ({len(failed)} failed, {kept} kept)"
        )


def raise_failures(outcomes: list[Outcome]) -> None:
    """A lone recipe's own error, or RecipesFailed naming each failed one; nothing if none failed."""
    failed = [o for o in outcomes if o.status == "failed"]
    if len(outcomes) == 1 and failed and failed[0].error is not None:
        raise failed[0].error
    if failed:
        raise RecipesFailed(outcomes)


def calibration_for(calib_dir: Path | None = None, imatrix: Path | None = None) -> Calibration:
    """What the calibration stage left: calibration.jsonl and imatrix.gguf in `calib_dir`, or the
    imatrix file named explicitly (which wins)."""
    jsonl = None
    if calib_dir is not None:
        calib_dir = Path(calib_dir)
        if not calib_dir.is_dir():
            raise InputError(
                f"--calib {calib_dir} is not a directory (expected `orlik calibrate build` output)"
            )
        jsonl = calib_dir / "calibration.jsonl"
        jsonl = jsonl if jsonl.is_file() else None
        if imatrix is None and (calib_dir / "imatrix.gguf").is_file():
            imatrix = calib_dir / "imatrix.gguf"
    if imatrix is not None and not Path(imatrix).is_file():
        raise InputError(f"imatrix {imatrix} does not exist")
    return Calibration(
        jsonl=jsonl,
        imatrix=Path(imatrix) if imatrix else None,
        hash=sha256_file(jsonl) if jsonl else None,
        imatrix_hash=sha256_file(imatrix) if imatrix else None,
    )


def with_overrides(
    recipes: Sequence[Recipe],
    overrides: Sequence[tuple[str, str]] = (),
    output_type: str | None = None,
    embedding_type: str | None = None,
) -> list[Recipe]:
    """The recipes with per-tensor overrides added (GGUF only; they come before the recipe's own)."""
    if not (overrides or output_type or embedding_type):
        return list(recipes)
    out = []
    for r in recipes:
        if r.format != "gguf":
            raise InputError(f"per-tensor type overrides apply to GGUF recipes only, not {r.name}")
        out.append(dataclasses.replace(r, overrides=tuple(overrides) + r.overrides,
                                       output_type=output_type or r.output_type,
                                       embedding_type=embedding_type or r.embedding_type))  # fmt: skip
    return out


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _option_value(key: str, raw: str, kind: type) -> Any:
    if kind is bool:
        if raw.lower() in _TRUE + _FALSE:
            return raw.lower() in _TRUE
        raise InputError(f"option {key} takes true or false, not {raw!r}")
    try:
        return kind(raw)
    except ValueError:
        raise InputError(
            f"option {key} takes {'an integer' if kind is int else 'a number'}, not {raw!r}"
        ) from None


def with_options(recipes: Sequence[Recipe], options: Sequence[tuple[str, str]] = ()) -> list[Recipe]:
    """The recipes with `--option KEY=VALUE` settings added to their options, each checked against
    the options its backend reads (a key no recipe in the plan reads is refused, as a typo would be)."""
    if not options:
        return list(recipes)
    tables = [backend_class(r.format).options_for(r) for r in recipes]
    for key, _ in options:
        if not any(key in t for t in tables):
            known = sorted({k for t in tables for k in t})
            formats = "/".join(dict.fromkeys(r.format for r in recipes))
            raise InputError(f"no recipe here reads option {key!r}; the {formats} backend(s) read: "
                             f"{', '.join(known) or 'none'}")  # fmt: skip
    out = []
    for r, table in zip(recipes, tables, strict=True):
        mine = {k: _option_value(k, v, table[k]) for k, v in options if k in table}
        out.append(dataclasses.replace(r, options={**r.options, **mine}) if mine else r)
    return out


def quantize(
    checkpoint: str | Path,
    recipes: Sequence[Recipe | str],
    out_root: str | Path,
    calib: Calibration | None = None,
    force: bool = False,
) -> list[Variant]:
    """Build (or reuse) one variant per recipe under `out_root`; returns their manifests.

    A failed recipe raises its own error (or RecipesFailed when several ran), after the others ran."""
    outcomes = quantize_all(checkpoint, recipes, out_root, calib=calib, force=force)
    raise_failures(outcomes)
    return [o.variant for o in outcomes if o.variant is not None]


def quantize_all(
    checkpoint: str | Path,
    recipes: Sequence[Recipe | str],
    out_root: str | Path,
    calib: Calibration | None = None,
    force: bool = False,
    check_runtime: RuntimeCheck | None = None,
) -> list[Outcome]:
    """One Outcome per recipe. Bad input is refused for all of them before any work; after that, a
    recipe that fails is reported in its Outcome and the others still run, so the variants built
    before it are kept. With `check_runtime`, a variant is kept only once it has loaded and run."""
    ckpt = Checkpoint.open(checkpoint)
    calib = calib or Calibration()
    plan = _resolve(recipes)
    backends: dict[str, Backend] = {}
    for r in plan:  # every refusal happens before the first variant is built
        if r.format not in backends:
            backends[r.format] = backend_for(r.format)
        backends[r.format].check(r, calib)
    out_root = Path(out_root)
    check_writable(out_root)
    for r in plan:  # a folder of the user's in the way is refused before any work, too
        owner.check_replaceable(out_root / r.name, force=force, marks=(MANIFEST,), kind="variant")
    try:
        for r in plan:  # checks against the checkpoint's shapes (group sizes, imatrix fit)
            backends[r.format].prepare(ckpt, r, calib)
        return _build_all(plan, backends, ckpt, calib, out_root, force, check_runtime)
    finally:
        for b in backends.values():
            b.close()


def _build_all(plan: list[Recipe], backends: dict[str, Backend], ckpt: Checkpoint, calib: Calibration,
               out_root: Path, force: bool, check_runtime: RuntimeCheck | None) -> list[Outcome]:  # fmt: skip
    outcomes: list[Outcome] = []
    with progress.bar("quantize", total=len(plan), variant="", tensors="") as bar:
        for r in plan:
            bar.update(variant=r.name, tensors="")
            t0 = time.time()
            try:
                outcomes.append(_build(r, backends[r.format], ckpt, calib, out_root / r.name, force,
                                       check_runtime, bar))  # fmt: skip
            except Exception as e:  # reported in its outcome; the next recipe still runs
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                if not isinstance(e, OrlikError):
                    why = f"{type(e).__name__}: {why}"
                outcomes.append(Outcome(r.name, None, "failed", time.time() - t0, why, e))
                progress.info(f"[red]quantize: {r.name} failed: {why}[/]")
            bar.advance()
    return outcomes


def _build(
    r: Recipe,
    backend: Backend,
    ckpt: Checkpoint,
    calib: Calibration,
    target: Path,
    force: bool,
    check_runtime: RuntimeCheck | None,
    bar: Any,
) -> Outcome:
    t0 = time.time()
    existed = target.exists()
    reason = "--force" if force else _stale(target, r, ckpt, calib, backend)
    if reason is None:
        owner.clear_leftovers(target, claim=False)  # a killed earlier run's, if any
        progress.info(f"quantize: {r.name} verified, skipped")
        return Outcome(r.name, Variant.load(target), "skipped", time.time() - t0)
    if existed:
        progress.info(f"quantize: rebuilding {r.name}: {reason}")
    if hasattr(backend, "on_progress"):
        backend.on_progress = lambda done, total: bar.update(tensors=f"{done}/{total}")
    with atomic_dir(target, force=force, marks=(MANIFEST,), kind="variant") as tmp:
        v = backend.quantize(ckpt, r, calib, tmp)
        v.save(tmp)
        if check_runtime is not None:
            try:
                v.extra["runtime_check"] = check_runtime(tmp)
            except Exception as e:  # a library's own error too: the variant is not kept either way
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise ToolError(f"built, but it does not load and run in its runtime: {why}") from e
            v.save(tmp)
    v.path = target
    progress.info(f"quantize: {r.name}: {v.bytes / 2**20:.2f} MiB, {v.bpw:.2f} bpw")
    return Outcome(
        r.name, v, "rebuilt" if existed else "built", time.time() - t0, reason if existed else None
    )


def _resolve(recipes: Sequence[Recipe | str]) -> list[Recipe]:
    names = [r for r in recipes if isinstance(r, str)]
    objs = [r for r in recipes if isinstance(r, Recipe)]
    plan = objs + (expand(names) if names else [])
    if not plan:
        raise InputError("no recipes given; name one with --recipe (e.g. Q4_K_M or bielik-table8)")
    seen: dict[str, Recipe] = {}
    for r in plan:
        if r.name in seen and seen[r.name] != r:
            raise InputError(f"two different recipes are both named {r.name}")
        seen[r.name] = r
    return list(seen.values())


def _stale(
    target: Path, recipe: Recipe, ckpt: Checkpoint, calib: Calibration, backend: Backend
) -> str | None:
    """Why the variant at `target` cannot be reused ("absent" if there is none); None if it can."""
    if not target.exists():
        return "absent"
    try:
        v = Variant.load(target)
    except ManifestError as e:
        return f"manifest unreadable ({e})"
    bad = v.verify()
    if bad:
        return f"{', '.join(bad)} differ(s) from the manifest"
    if v.recipe != recipe.to_dict():
        return "the recipe changed"
    if v.base_hash != ckpt.hash:
        return "the base checkpoint changed"
    if recipe.imatrix and v.imatrix_hash != (
        calib.imatrix_hash or (calib.imatrix and sha256_file(calib.imatrix))
    ):
        return "the imatrix changed"
    if v.calibration_hash and not v.imatrix_hash:
        # GPTQ, AWQ and the like read calibration.jsonl itself: a different set means a different variant.
        now = calib.hash or (calib.jsonl and calib.jsonl.is_file() and sha256_file(calib.jsonl)) or None
        if now is None:
            return "it was calibrated, and no calibration set was given now"
        if now != v.calibration_hash:
            return "the calibration set changed"
    return backend.stale(v, recipe)

"""`--recipe auto`: per-tensor GGUF types chosen by measured sensitivity under a size budget.

For each weight matrix llama-quantize would quantize, every candidate type's error is measured with
ggml's own quantizer (same importance matrix) on a sample of rows, weighted by the calibration-set
Fisher sensitivity (quantize/sensitivity.py) into an estimated KLD; quantize/allocate.py picks the
types; llama-quantize writes them through per-tensor overrides. Direct KLD probes per tensor kind
(quantize/probes.py) calibrate the estimate first. The table of estimates and probes is cached under
the checkpoint, calibration and imatrix hashes.
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from orlik import gguf_read, llamacpp, progress
from orlik.checkpoint import Checkpoint
from orlik.errors import InputError, ToolError
from orlik.fsutil import atomic_write_text, cache_root, sha256_bytes
from orlik.quantize import allocate, ggml_quants, prequantize, probes, sensitivity
from orlik.quantize.backends import Calibration, common
from orlik.quantize.recipe import Recipe

METHOD = "fisher-diag+kind-probes-v6"  # bump when the estimate changes, so cached tables are recomputed
# Candidates for rows that are multiples of 256, and the 32-block types for other widths (llama-quantize
# would silently turn a K-quant there into one of these, so the allocator chooses among them itself).
TYPES_256 = ("IQ2_XXS", "IQ2_S", "Q2_K", "IQ3_XXS", "IQ3_S", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
TYPES_32 = ("Q4_0", "IQ4_NL", "Q5_0", "Q5_1", "Q8_0")
# The default candidates: the types ggml quantizes at >= 2.5M weights/s on one core. IQ2_XXS, IQ2_S,
# IQ3_XXS and IQ3_S run at 0.2-1M/s, and mixes full of them made an auto file take 3.6-4.8x a stock
# llama-quantize run; they join only when the target is below what these reach, or through `types=`.
FAST_256 = ("Q2_K", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
# The llama-quantize file type named as the base of the command (every matrix is overridden; the base
# only sets general.file_type): the one whose main type most of the weights got.
_FILE_TYPE = {"Q2_K": "Q2_K", "Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q6_K": "Q6_K",
              "Q8_0": "Q8_0", "IQ2_XXS": "IQ2_XXS", "IQ2_S": "IQ2_S", "IQ3_XXS": "IQ3_XXS", "IQ3_S": "IQ3_S",
              "IQ4_XS": "IQ4_XS", "IQ4_NL": "IQ4_NL", "Q4_0": "Q4_0", "Q5_0": "Q5_0", "Q5_1": "Q5_K_M"}  # fmt: skip
_DRY_LINE = re.compile(r"\]\s+(\S+)\s+-.*?size =\s*[0-9.]+ MiB ->\s*[0-9.]+ MiB \((\w+)\)")


@dataclass
class Plan:
    target_bytes: int
    fixed_bytes: int  # metadata, norms and anything not allocated
    solution: allocate.Solution
    table: dict[str, Any]  # the cached sensitivity table
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def types(self) -> dict[str, str]:
        return self.solution.kinds()

    def record(self) -> dict[str, Any]:
        """What variant.json keeps: target, estimate (probe-calibrated, and the Fisher estimate alone),
        the probes, and each tensor's type and estimated KLD."""
        return {"method": METHOD, "target_bytes": self.target_bytes, "planned_bytes": self.fixed_bytes + self.solution.bytes,
                "estimated_kld": self.solution.cost, "estimated_kld_fisher": estimate(self.table, self.types, False),
                "probes": self.table.get("probes"), "sensitivity_cached": self.table.get("cached", False),
                "sensitivity_tokens": self.table["tokens"], "seconds": self.seconds,
                "tensors": {n: {"type": o.kind, "estimated_kld": o.cost} for n, o in self.solution.choice.items()}}  # fmt: skip


def candidates(
    row_length: int, has_imatrix: bool, types: tuple[str, ...] | None = None, full: bool = False
) -> list[str]:
    """Types llama-quantize accepts for rows of this length, as it is told (no fallback); `full`
    adds the slow IQ2/IQ3 types to the default candidates."""
    pool = types or ((TYPES_256 if full else FAST_256) + tuple(t for t in TYPES_32 if t not in TYPES_256))
    ok = [t for t in pool if ggml_quants.info(t).fits(row_length)]
    if not has_imatrix:
        ok = [t for t in ok if t not in ggml_quants.NEEDS_IMATRIX]
    if not types:
        # Where the K-quants fit, the 32-wide types are only candidates at no size the K-quants lack
        # (Q4_0/IQ4_NL are 4.5 bpw like Q4_K, Q5_0 5.5 like Q5_K, and no auto mix ever chose them):
        # measuring them would cost a third of the candidate errors. Elsewhere they are all there is.
        k_quants = any(t in TYPES_256 and t not in TYPES_32 for t in ok)
        ok = [t for t in ok if (t in TYPES_256) == k_quants or t == "Q8_0"]
    return ok or ["F16"]


def imatrix_values(path: Path) -> dict[str, np.ndarray]:
    """Mean squared activation per column, as llama-quantize hands it to ggml (in_sum2 / counts)."""
    import gguf

    r = gguf.GGUFReader(str(path), "r")
    sums = {
        t.name.removesuffix(".in_sum2"): np.asarray(t.data) for t in r.tensors if t.name.endswith(".in_sum2")
    }
    counts = {
        t.name.removesuffix(".counts"): np.asarray(t.data) for t in r.tensors if t.name.endswith(".counts")
    }
    if not sums:
        raise InputError(f"{path}: auto needs a GGUF imatrix (llama-imatrix's current format)")
    out = {}
    for name, s in sums.items():
        n = float(counts[name].reshape(-1)[0]) or 1.0
        out[name] = (s.reshape(-1)[: s.size // counts[name].size] / n).astype(np.float32)
    return out


def _gguf_names(source: gguf_read.GGUFSummary, fisher_names: list[str]) -> dict[str, str]:
    """GGUF tensor name -> checkpoint tensor name, through gguf-py's own name map (the architecture
    from the summary's metadata, the block count from the tensor names)."""
    key = "general.architecture"
    arch_name = source.metadata.get(key) or gguf_read.summarize(source.path, keys=(key,)).metadata.get(key)
    return _name_map(arch_name, [t.name for t in source.tensors], fisher_names)


def _name_map(arch_name: str | None, gguf_names: list[str], fisher_names: list[str]) -> dict[str, str]:
    import gguf

    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(arch_name)
    if arch is None:
        raise InputError(f"auto does not know GGUF architecture {arch_name!r}")
    blocks = [int(m.group(1)) for n in gguf_names if (m := re.match(r"blk\.(\d+)\.", n))]
    tmap = gguf.get_tensor_name_map(arch, max(blocks, default=-1) + 1)
    out = {}
    for hf in fisher_names:
        g = tmap.get_name(hf, try_suffixes=(".weight",))
        if g:
            out[g] = hf
    return out


def allocatable(source: gguf_read.GGUFSummary) -> list[gguf_read.TensorInfo]:
    """The weight matrices llama-quantize quantizes (2-D `.weight` tensors that are not norms)."""
    return [
        t for t in source.tensors if len(t.ne) >= 2 and t.name.endswith(".weight") and "_norm" not in t.name
    ]


def stock_types(f16: Path, qtype: str, imatrix: Path | None) -> dict[str, str]:
    """The per-tensor types of a stock llama-quantize file type, from its own --dry-run."""
    args = ["--dry-run", *(["--imatrix", str(imatrix)] if imatrix else []), str(f16), qtype]
    rc, log = llamacpp.run_tool("llama-quantize", args)
    types = {m.group(1): m.group(2).upper() for m in _DRY_LINE.finditer(log)}
    if rc != 0 or not types:
        raise ToolError(f"llama-quantize --dry-run {qtype} failed: {log.strip().splitlines()[-1:]}")
    return types


def file_bytes(source: gguf_read.GGUFSummary, types: dict[str, str]) -> int:
    """Size of the F16 file with the named tensors re-typed (header and padding as in the F16 file)."""
    f16 = source.path.stat().st_size
    for t in source.tensors:
        if t.name in types:
            f16 += (
                t.ne[1] * int(np.prod(t.ne[2:])) * ggml_quants.info(types[t.name]).row_bytes(t.ne[0])
                - t.n_bytes
            )
    return int(f16)


def target_bytes(recipe: Recipe, source: gguf_read.GGUFSummary, imatrix: Path | None) -> int:
    o = recipe.options
    if o.get("like"):
        return file_bytes(source, stock_types(source.path, str(o["like"]), imatrix))
    if o.get("target_bpw") is not None:
        fixed_tensors = source.path.stat().st_size - source.tensor_bytes
        return int(float(o["target_bpw"]) * source.n_params / 8) + fixed_tensors
    if o.get("target_size") is not None:
        return allocate.parse_size(o["target_size"])
    raise InputError(
        f"recipe {recipe.name} needs a target: --target-size SIZE, --target-bpw BPW or auto-like-<TYPE>"
    )


def _cache_key(ckpt: Checkpoint, calib: Calibration, imatrix: Path | None, settings: dict[str, Any]) -> str:
    from orlik.fsutil import sha256_file

    parts = {"method": METHOD, "checkpoint": ckpt.hash, "calibration": calib.hash,
             "imatrix": (calib.imatrix_hash or sha256_file(imatrix)) if imatrix else None,
             "llama.cpp": llamacpp.build_info(), **settings}  # fmt: skip
    return sha256_bytes(json.dumps(parts, sort_keys=True).encode())


def _settings(recipe: Recipe, full: bool) -> dict[str, Any]:
    return {**sensitivity.base_settings(recipe.options), "types": list(_types_option(recipe) or ()), "full": full,
            "probe_types": list(probes.PROBE_TYPES)}  # fmt: skip


def _table_path(ckpt: Checkpoint, calib: Calibration, imatrix: Path | None, settings: dict[str, Any]) -> Path:
    return cache_root() / "sensitivity" / f"{_cache_key(ckpt, calib, imatrix, settings)}.json"


def prequantize_early(ckpt: Checkpoint, recipe: Recipe, calib: Calibration, f16: Path,
                      imatrix: Path | None) -> prequantize.Prequantized | None:  # fmt: skip
    """The probes' block matrices quantized ahead (prequantize.Prequantized) from the moment the recipe is
    prepared, on the core that the F16 GGUF's header reads (about a second each, twice before the
    plan) leave idle: their names and row lengths come from the imatrix, which llama-imatrix writes
    for every block matrix, and the architecture from the F16 GGUF's first metadata pair. None when
    the sensitivity table is cached, there are no probes, or either shortcut does not hold; the pass
    then starts its own."""
    settings = _settings(recipe, False)
    if (
        imatrix is None
        or settings["probe_tokens"] <= 0
        or _table_path(ckpt, calib, imatrix, settings).is_file()
    ):
        return None
    arch = gguf_read.architecture(f16)
    entries = gguf_read.read_imatrix(imatrix).entries
    blocks = {n: ne0 for n, (ne0, nmat) in entries.items() if n.startswith("blk.") and nmat == 1}
    if arch is None or not blocks:
        return None
    read = sensitivity.file_weights(ckpt)
    try:
        names = _name_map(arch, list(blocks), read.names)
    except InputError:
        return None
    cands = {n: candidates(ne0, True, _types_option(recipe)) for n, ne0 in blocks.items()}
    head = _untied_head(ckpt, names)
    if head is not None and len(shape := read.shapes[names[head]]) == 2:
        cands[head] = candidates(shape[-1], False, _types_option(recipe))
    return prequantize.Prequantized(probes.plan(cands), names, read, imatrix_values(imatrix), head=head)


def _untied_head(ckpt: Checkpoint, names: dict[str, str]) -> str | None:
    """`output.weight` when the checkpoint keeps an output head of its own (not tied to the
    embedding), whose probes take rows (probes.measure)."""
    return (
        "output.weight"
        if "output.weight" in names and ckpt.config.get("tie_word_embeddings") is not True
        else None
    )


def sensitivity_table(ckpt: Checkpoint, recipe: Recipe, calib: Calibration, source: gguf_read.GGUFSummary,
                      imatrix: Path | None, threads: int, full: bool = False,
                      pre: prequantize.Prequantized | None = None) -> dict[str, Any]:  # fmt: skip
    """{"tensors": {gguf name: {"ne": [...], "types": {type: estimated KLD}}}, "probes", "tokens",
    "seconds"}, computed once per checkpoint, calibration set, imatrix and settings, then cached.
    `pre`: the probes' matrices already being quantized (prequantize_early); stopped here."""
    settings = _settings(recipe, full)
    path = _table_path(ckpt, calib, imatrix, settings)
    if (table := sensitivity.read_cached(path)) is not None:
        if pre is not None:
            pre.stop()
        return {**table, "cached": True, "cache": str(path)}
    t0 = time.time()
    imat = imatrix_values(imatrix) if imatrix else {}
    mats = allocatable(source)
    # The probes' matrices are quantized ahead on a spare core while torch and transformers import
    # and the calibration text is tokenized (prequantize.Prequantized).
    if pre is None and settings["probe_tokens"] > 0:
        read = sensitivity.file_weights(ckpt)
        cands = {t.name: candidates(t.ne[0], t.name in imat, _types_option(recipe), full) for t in mats}
        names = _gguf_names(source, read.names)
        pre = prequantize.Prequantized(probes.plan(cands), names, read, imat, head=_untied_head(ckpt, names))
    try:
        texts = common.calibration_texts(calib, recipe, None)
        fis_windows, probe_windows, model = sensitivity.windows_and_model(ckpt, texts, settings, threads)
        if pre is not None:
            pre.pause()  # the Fisher pass's matmuls want both cores
        fis = sensitivity.fisher(model, fis_windows, seed=settings["seed"], dtype=settings["dtype"])
        if pre is not None:
            pre.resume()
        names = _gguf_names(source, list(fis.weights))
        read_model = sensitivity.weight_reader(model)
        jobs = []
        for t in mats:
            hf = names.get(t.name)
            if hf is None:
                raise InputError(f"auto cannot map GGUF tensor {t.name} to a layer of {ckpt.path}")
            jobs.append((t, hf))

        def measure(job: tuple[gguf_read.TensorInfo, str]) -> tuple[str, dict[str, Any]]:
            t, hf = job
            w = read_model(hf if hf in read_model.names else fis.tied.get(hf, hf))
            return t.name, _tensor_costs(
                t, w, fis.weights[hf], imat.get(t.name), settings, _types_option(recipe)
            )

        with ThreadPoolExecutor(max(1, threads)) as pool:
            rows = dict(pool.map(measure, jobs))
        table = {"method": METHOD, "tensors": rows, "tokens": fis.tokens, "fisher_dtype": fis.dtype,
                 "seconds": {"fisher": round(fis.seconds, 2), "errors": round(time.time() - t0 - fis.seconds, 2)}}  # fmt: skip
        if probe_windows:
            table["probes"] = probes.measure(model, probe_windows, {t.name: hf for t, hf in jobs},
                                             {n: r["types"] for n, r in rows.items()},
                                             {n: int(np.prod(r["ne"])) for n, r in rows.items()}, imat, threads=threads,
                                             pairs={t.name: fis.weights[hf] for t, hf in jobs}, pre=pre)  # fmt: skip
            table["seconds"]["probes"] = table["probes"]["seconds"]
    finally:
        if pre is not None:
            pre.stop()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(table) + "\n")
    return {**table, "cached": False, "cache": str(path)}


def _types_option(recipe: Recipe) -> tuple[str, ...] | None:
    raw = recipe.options.get("types")
    if not raw:
        return None
    types = tuple(t.strip().upper() for t in str(raw).split(",") if t.strip())
    bad = [t for t in types if t not in ggml_quants.TYPE_IDS]
    if bad:
        raise InputError(f"auto types: unknown tensor type(s) {', '.join(bad)}")
    return types


def _tensor_costs(t: gguf_read.TensorInfo, w: np.ndarray, pairs: sensitivity.Pairs, imat: np.ndarray | None,
                  settings: dict[str, Any], types: tuple[str, ...] | None) -> dict[str, Any]:  # fmt: skip
    w = w.reshape(-1, t.ne[0])
    if w.shape[0] != int(np.prod(t.ne[1:])):
        raise InputError(f"auto: {t.name} has shape {w.shape} in the checkpoint, {t.ne} in the GGUF")
    rows, scale = sensitivity.sample_rows(
        pairs, w.shape[0], settings["rows"], settings["seed"], settings["max_rows"], settings["min_rows"]
    )
    sub = w[rows]
    costs = {}
    for ty in candidates(t.ne[0], imat is not None, types, settings["full"]):
        err2 = (ggml_quants.roundtrip(ty, sub, imat) - sub).astype(np.float64) ** 2
        costs[ty] = sensitivity.weighted_error(pairs, rows, scale, err2)
    return {"ne": list(t.ne), "types": costs}


def plan(ckpt: Checkpoint, recipe: Recipe, calib: Calibration, source: gguf_read.GGUFSummary,
         imatrix: Path | None, threads: int, pre: prequantize.Prequantized | None = None) -> Plan:  # fmt: skip
    """The per-tensor types for `recipe`'s target, or a one-line error when it cannot be met (`pre`:
    see sensitivity_table)."""
    if calib.jsonl is None:
        raise InputError(
            f"recipe {recipe.name} measures sensitivity on the calibration set; pass --calib DIR"
        )
    t0 = time.time()
    target = target_bytes(recipe, source, imatrix)
    mats = {t.name: t for t in allocatable(source)}

    def smallest(full: bool) -> dict[str, list[allocate.Option]]:
        return {n: _options(t, {c: 0.0 for c in candidates(t.ne[0], imatrix is not None, _types_option(recipe), full)})
                for n, t in mats.items()}  # fmt: skip

    fixed = source.path.stat().st_size - sum(t.n_bytes for t in mats.values())
    # the slow IQ2/IQ3 types only when the fast ones cannot get this small
    full = _types_option(recipe) is None and target < fixed + allocate.bounds(smallest(False))[0]
    budget = allocate.check_target(target, fixed, smallest(full), source.path.stat().st_size, "F16 GGUF")
    t1 = time.time()
    table = sensitivity_table(ckpt, recipe, calib, source, imatrix, threads, full, pre)
    t2 = time.time()
    costs = probes.calibrated(table)
    sol = allocate.solve({n: _options(mats[n], costs[n]) for n in mats}, budget)
    progress.info(
        f"auto: {len(mats)} tensors, estimated KLD {sol.cost:.4g}, {(fixed + sol.bytes) / 2**20:.2f} MiB"
    )
    secs = {
        "target": round(t1 - t0, 2),
        "sensitivity": round(t2 - t1, 2),
        "solve": round(time.time() - t2, 2),
    }
    return Plan(target, fixed, sol, table, secs)


def _options(t: gguf_read.TensorInfo, costs: dict[str, float]) -> list[allocate.Option]:
    n_rows = int(np.prod(t.ne[1:]))
    return [allocate.Option(ty, n_rows * ggml_quants.info(ty).row_bytes(t.ne[0]), float(cost))
            for ty, cost in costs.items()]  # fmt: skip


def estimate(table: dict[str, Any], types: dict[str, str], calibrate: bool = True) -> float | None:
    """The estimated KLD of any typing of the tensors (e.g. a stock file type), scaled by the probes
    unless `calibrate` is False; None if a type was not measured."""
    total = 0.0
    raw = {n: r["types"] for n, r in table["tensors"].items()}
    costs = probes.calibrated(table) if calibrate else probes.row_corrected(raw, table.get("probes"))
    for name, row in costs.items():
        cost = row.get(types.get(name, ""))
        if cost is None:
            return None
        total += cost
    return total


def base_file_type(types: dict[str, str], source: gguf_read.GGUFSummary) -> str:
    weight: dict[str, int] = {}
    sizes = {t.name: t.n_elements for t in source.tensors}
    for n, ty in types.items():
        weight[ty] = weight.get(ty, 0) + sizes[n]
    main = max(weight, key=lambda k: weight[k]) if weight else "Q8_0"
    return _FILE_TYPE.get(main, "Q8_0")


def summary_lines(record: dict[str, Any]) -> list[str]:
    """`orlik inspect`'s view of an auto variant: target, estimate against measurement, each tensor."""
    m = record.get("measured") or {}
    m = m if m.get("kld") is not None else {}
    size = record.get("bytes", record.get("tensor_bytes", 0))
    got = f"{m['kld']:.4g} ± {m['kld_err']:.2g} on {m['tokens']} calibration tokens" if m else "not measured"
    lines = [f"auto: target {record['target_bytes']:,} bytes, got {size:,} ({100 * record.get('size_error', 0):+.3f}%)",
             f"auto: KLD estimated {record['estimated_kld']:.4g}, measured {got}"]  # fmt: skip
    for k, pts in ((record.get("probes") or {}).get("kinds") or {}).items():
        ratios = ", ".join(
            f"{p['type']} {p['ratio']:.3g}" if p.get("ratio") else f"{p['type']} -" for p in pts
        )
        lines.append(f"auto: probe real/estimated KLD, {k}: {ratios}")
    tensors = record.get("tensors") or record.get("layers") or {}
    for name, t in tensors.items():
        lines.append(f"  {name:<40} {t['type']:<8} est. KLD {t['estimated_kld']:.3g}")
    return lines

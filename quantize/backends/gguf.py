"""GGUF backend: llama.cpp's llama-quantize on the checkpoint's cached F16 GGUF, one type per recipe,
with or without an importance matrix, with per-tensor type overrides.

The result is read back with the `gguf` package: the manifest's types, sizes and bits per weight
are what the file holds, not what was asked for.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orlik import gguf_read, llamacpp
from orlik.checkpoint import Checkpoint
from orlik.errors import InputError, MissingDependencyError, OutputError, ToolError, UnknownNameError
from orlik.fsutil import sha256_file
from orlik.gguf_convert import f16_gguf
from orlik.manifest import Variant
from orlik.quantize.backends import Backend, Calibration, common
from orlik.quantize.recipe import (
    GGUF_REQUIRES_IMATRIX,
    GGUF_TENSOR_TYPES,
    GGUF_TENSOR_TYPES_REQUIRING_IMATRIX,
    GGUF_TYPES,
    Recipe,
)
from orlik.sysinfo import package_version, usable_cores

MODEL_FILE = "model.gguf"
LOG_FILE = "llama-quantize.log"
# Nominal bits per weight of each file type (llama.cpp's figures, mixes rounded up); only used to
# check that the disk can hold the result before llama-quantize starts writing.
NOMINAL_BPW = {
    "F16": 16, "BF16": 16, "Q8_0": 8.5, "Q6_K": 6.6, "Q5_K_M": 5.7, "Q5_K_S": 5.5, "Q5_0": 5.5,
    "Q4_K_M": 4.9, "Q4_K_S": 4.6, "Q4_0": 4.5, "Q3_K_L": 4.3, "Q3_K_M": 3.9, "Q3_K_S": 3.5,
    "Q2_K": 3.4, "Q2_K_S": 3.0, "IQ4_NL": 4.5, "IQ4_XS": 4.3, "IQ3_M": 3.7, "IQ3_S": 3.5,
    "IQ3_XS": 3.3, "IQ3_XXS": 3.1, "IQ2_M": 2.7, "IQ2_S": 2.5, "IQ2_XS": 2.4, "IQ2_XXS": 2.1,
    "IQ1_M": 1.8, "IQ1_S": 1.6,
}  # fmt: skip
_KEYS = ("general.file_type", "quantize.imatrix.dataset", "quantize.imatrix.chunks_count")
_TENSOR_LINE = re.compile(r"\[\s*(\d+)/\s*(\d+)\]")
_QUANT_SIZE = re.compile(r"quant size\s*=\s*[0-9.]+ MiB \(([0-9.]+) BPW\)")


def glob_to_regex(glob: str) -> str:
    """A shell glob over whole tensor names -> the ECMAScript regex llama-quantize searches with.

    llama-quantize lower-cases the pattern, so the regex avoids letter escapes (\\d, \\w).
    """
    out = []
    i = 0
    while i < len(glob):
        c = glob[i]
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[" and "]" in glob[i + 1 :]:
            j = glob.index("]", i + 1)
            body = glob[i + 1 : j]
            out.append("[^" + body[1:] + "]" if body.startswith("!") else "[" + body + "]")
            i = j
        else:
            out.append("\\" + c if c in ".^$+(){}|\\/" else c)
        i += 1
    return "^" + "".join(out) + "$"


def _tensor_type(t: str, what: str) -> str:
    u = t.upper()
    if u not in GGUF_TENSOR_TYPES:
        raise UnknownNameError(f"tensor type for {what}", t, GGUF_TENSOR_TYPES)
    return u


class GGUFBackend(Backend):
    name = "gguf"
    formats = ("gguf",)
    # Read by the auto recipes (gguf_auto.py): calibration tokens and window of the sensitivity pass,
    # fraction of rows whose error is measured (and at most how many), sampling seed, comma-separated
    # candidate types, and calibration tokens on which the result's real KLD is measured (0: not
    # measured), calibration tokens and window of the per-kind KLD probes that calibrate the estimate
    # (quantize/probes.py; 0 tokens: none), and the Fisher pass's matmul dtype (auto, float32, bfloat16).
    options = {"sens_tokens": int, "sens_seq_len": int, "sens_rows": float, "sens_max_rows": int, "seed": int,
               "types": str, "measure_tokens": int, "probe_tokens": int, "probe_seq_len": int, "sens_dtype": str}  # fmt: skip

    @classmethod
    def options_for(cls, recipe: Recipe) -> dict[str, type]:
        # stock types take no options: recording one would only rebuild an identical file
        return cls.options if recipe.options.get("auto") else {}

    def __init__(self) -> None:
        self.on_progress: Any = None  # callable(done, total) set by the driver for per-tensor progress
        # auto recipes' probe matrices quantized from prepare() on (gguf_auto.prequantize_early), by
        # (checkpoint hash, imatrix path); taken by the first auto build, the rest stopped by close()
        self._early: dict[tuple[str, str], Any] = {}

    @classmethod
    def missing(cls) -> str | None:
        try:
            import gguf  # noqa: F401
        except ImportError:
            return "the gguf package is missing; pip install 'orlik[gguf]'"
        try:
            llamacpp.tool("llama-quantize")
            llamacpp.converter()
        except MissingDependencyError as e:
            return str(e)
        return None

    def check(self, recipe: Recipe, calib: Calibration) -> None:
        """Refuse, before any work, what llama-quantize would refuse or silently misread."""
        if recipe.options.get("auto"):
            return self._check_auto(recipe, calib)
        if recipe.qtype not in GGUF_TYPES:
            raise UnknownNameError("GGUF type", str(recipe.qtype), GGUF_TYPES)
        types = [_tensor_type(t, g) for g, t in recipe.overrides]
        if recipe.output_type:
            types.append(_tensor_type(recipe.output_type, "the output tensor"))
        if recipe.embedding_type:
            types.append(_tensor_type(recipe.embedding_type, "the token embedding"))
        if recipe.imatrix:
            if calib.imatrix is None:
                raise InputError(
                    f"recipe {recipe.name} quantizes with an importance matrix but none was given; "
                    "pass --imatrix FILE or --calib DIR (run `orlik calibrate imatrix` first)"
                )
            return
        if recipe.qtype in GGUF_REQUIRES_IMATRIX:
            raise InputError(
                f"{recipe.qtype} needs an importance matrix (llama-quantize refuses it without one); "
                f"use {recipe.qtype}-imat with --calib or --imatrix"
            )
        bad = sorted({t for t in types if t in GGUF_TENSOR_TYPES_REQUIRING_IMATRIX})
        if bad:
            raise InputError(
                f"override type(s) {', '.join(bad)} need an importance matrix; use {recipe.qtype}-imat"
            )

    def stale(self, variant: Variant, recipe: Recipe) -> str | None:
        if not recipe.options.get("auto"):
            return None
        from orlik.quantize.backends import gguf_auto

        return common.auto_method_changed(variant, gguf_auto.METHOD)

    def _check_auto(self, recipe: Recipe, calib: Calibration) -> None:
        from orlik.quantize import sensitivity
        from orlik.quantize.backends import gguf_auto

        if not any(recipe.options.get(k) is not None for k in ("like", "target_size", "target_bpw")):
            raise InputError(f"recipe {recipe.name} needs a target: --target-size SIZE, --target-bpw BPW, "
                             "or a preset such as auto-like-Q3_K_M")  # fmt: skip
        if recipe.options.get("target_size") is not None:
            from orlik.quantize.allocate import parse_size

            parse_size(recipe.options["target_size"])
        gguf_auto._types_option(recipe)
        sensitivity.base_settings(recipe.options)  # refuses probe_tokens that are not whole windows
        if calib.jsonl is None:
            raise InputError(
                f"recipe {recipe.name} measures sensitivity on the calibration set; pass --calib DIR"
            )
        if recipe.imatrix and calib.imatrix is None:
            raise InputError(f"recipe {recipe.name} quantizes with the importance matrix; pass --calib DIR "
                             "(its imatrix.gguf is computed if missing) or --imatrix FILE")  # fmt: skip

    def prepare(self, ckpt: Checkpoint, recipe: Recipe, calib: Calibration) -> None:
        if recipe.options.get("auto") and recipe.imatrix and calib.imatrix is not None:
            from orlik.quantize.backends import gguf_auto

            key = (ckpt.hash, str(calib.imatrix))
            if key not in self._early:
                self._early[key] = gguf_auto.prequantize_early(
                    ckpt, recipe, calib, f16_gguf(ckpt), calib.imatrix
                )
        self._inputs(ckpt, recipe, calib)

    def close(self) -> None:
        for pre in self._early.values():
            if pre is not None:
                pre.stop()
        self._early.clear()

    def _inputs(
        self, ckpt: Checkpoint, recipe: Recipe, calib: Calibration
    ) -> tuple[Path, gguf_read.GGUFSummary, gguf_read.Imatrix | None]:
        """The F16 GGUF (converted once), its tensors, and the imatrix checked against them."""
        self.check(recipe, calib)
        f16 = f16_gguf(ckpt)
        source = gguf_read.summarize(f16, keys=("general.architecture",))
        imatrix = gguf_read.check_imatrix(calib.imatrix, source) if recipe.imatrix and calib.imatrix else None
        for glob, _ in recipe.overrides:
            if not any(re.search(glob_to_regex(glob), t.name) for t in source.tensors):
                raise InputError(
                    f"override {glob!r} matches no tensor of {ckpt.path} (names look like "
                    f"{source.tensors[-1].name}; globs match whole names, e.g. 'blk.*.ffn_down.weight')"
                )
        return f16, source, imatrix

    def quantize(self, ckpt: Checkpoint, recipe: Recipe, calib: Calibration, out: Path) -> Variant:
        if recipe.options.get("auto"):
            return self._quantize_auto(ckpt, recipe, calib, out)
        return self._quantize(ckpt, recipe, calib, out)

    def _quantize_auto(self, ckpt: Checkpoint, recipe: Recipe, calib: Calibration, out: Path) -> Variant:
        """Plan the per-tensor types, then run llama-quantize with every matrix overridden. The KLD
        check runs beside the single-threaded steps: its F16 logits (gguf_check.kld_base) while the
        F16 GGUF's header is read, the written file's KLD while that file's header is read back."""
        import dataclasses
        import time
        from concurrent.futures import Future, ThreadPoolExecutor

        from orlik.quantize.backends import gguf_auto, gguf_check

        f16 = f16_gguf(ckpt)
        pre = self._early.pop((ckpt.hash, str(calib.imatrix)), None)
        with ThreadPoolExecutor(1, thread_name_prefix="orlik-kld") as bg:
            # beside the header read and the sensitivity pass's own threads: one thread, not all cores
            base = bg.submit(gguf_check.kld_base, f16, calib, recipe, ckpt.hash, max(1, usable_cores() - 1))
            inputs = self._inputs(ckpt, recipe, calib)
            _, source, imatrix = inputs
            try:
                plan = gguf_auto.plan(
                    ckpt, recipe, calib, source, imatrix.path if imatrix else None, usable_cores(), pre
                )
            finally:
                if pre is not None:
                    pre.stop()
            types = plan.types
            tool_recipe = dataclasses.replace(recipe, qtype=gguf_auto.base_file_type(types, source), options={},
                                              overrides=tuple((n, t) for n, t in types.items()))  # fmt: skip
            measured: list[Future[Any]] = []

            def check(dst: Path) -> None:  # on a core the header read-back leaves free
                measured.append(
                    bg.submit(lambda: gguf_check.measure_kld(dst, base.result(), max(1, usable_cores() - 1)))
                )

            t0 = time.time()
            v = self._quantize(ckpt, tool_recipe, calib, out, inputs, after_tool=check)
            record = plan.record()
            record["seconds"]["llama_quantize"] = round(time.time() - t0, 2)
            record["bytes"] = v.bytes
            record["size_error"] = round(v.bytes / plan.target_bytes - 1, 6)
            record["calibration_hash"] = calib.hash
            t1 = time.time()
            record["measured"] = measured[0].result()
            record["seconds"]["measure_wait"] = round(time.time() - t1, 2)
        if abs(record["size_error"]) > 0.01:
            raise ToolError(f"{recipe.name}: the file is {v.bytes:,} bytes, not within 1% of the target "
                            f"{plan.target_bytes:,}")  # fmt: skip
        v.recipe = recipe.to_dict()
        v.name = recipe.name
        v.extra["gguf_file_type"] = f"auto (base {tool_recipe.qtype})"
        v.extra["auto"] = record
        return v

    def _quantize(self, ckpt: Checkpoint, recipe: Recipe, calib: Calibration, out: Path,
                  inputs: tuple[Path, gguf_read.GGUFSummary, gguf_read.Imatrix | None] | None = None,
                  after_tool: Callable[[Path], None] | None = None) -> Variant:  # fmt: skip
        """llama-quantize `recipe` into `out`; `after_tool` is handed the written file before its
        header is read back."""
        f16, source, imatrix = inputs or self._inputs(ckpt, recipe, calib)
        _check_space(out, source.tensor_bytes, recipe.qtype or "F16")
        dst = out / MODEL_FILE
        args = [*_arguments(recipe, imatrix.path if imatrix else None), str(f16), str(dst), str(recipe.qtype)]
        args.append(str(usable_cores()))
        rc, log = llamacpp.run_tool("llama-quantize", args, self._progress)
        if rc != 0 or not dst.is_file():
            raise _quantize_error(recipe, log, dst)
        # Kept beside the model: llama-quantize's per-tensor decisions are the record of what it did.
        (out / LOG_FILE).write_text(log, encoding="utf-8")
        if after_tool is not None:
            after_tool(dst)
        reported = _QUANT_SIZE.search(log)

        got = gguf_read.summarize(dst, keys=_KEYS)
        _check_applied(recipe, got, source)
        calibration_hash = (imatrix.calibration_hash or calib.hash) if imatrix else None
        return Variant(
            name=recipe.name,
            format="gguf",
            recipe=recipe.to_dict(),
            base_hash=ckpt.hash,
            files={MODEL_FILE: sha256_file(dst)},
            logs={LOG_FILE: sha256_file(out / LOG_FILE)},
            bytes=dst.stat().st_size,
            bpw=round(got.bpw, 4),
            tools={"llama.cpp": llamacpp.build_info(), "converter": "convert_hf_to_gguf.py", "gguf": package_version("gguf") or "unknown"},
            calibration_hash=calibration_hash,
            imatrix_hash=(calib.imatrix_hash or sha256_file(imatrix.path)) if imatrix else None,
            extra={
                "gguf_file_type": recipe.qtype,
                "tensor_types": got.type_histogram(),
                "tensor_type_by_name": got.types(),
                "parameters": got.n_params,
                "tensor_bytes": got.tensor_bytes,
                "bpw_definition": "8 x tensor-data bytes / parameters over all tensors (llama.cpp's BPW)",
                "blocks_bpw": round(got.blocks_bpw, 4),
                "llama_quantize_bpw": float(reported.group(1)) if reported else None,
                "f16_gguf": {"path": str(f16), "bytes": f16.stat().st_size},
                "imatrix": None if imatrix is None else {
                    "path": str(imatrix.path), "datasets": imatrix.datasets, "chunks": imatrix.chunk_count,
                    "chunk_size": imatrix.chunk_size, "lang": imatrix.orlik.get(gguf_read.KEY_CALIB_LANG),
                },
                "llama_quantize_args": args[:-4],
            },
        )  # fmt: skip

    def _progress(self, piece: str) -> None:
        if self.on_progress is None:
            return
        marks = _TENSOR_LINE.findall(piece)
        if marks:
            done, total = marks[-1]
            self.on_progress(int(done), int(total))


def _arguments(recipe: Recipe, imatrix: Path | None) -> list[str]:
    args: list[str] = []
    if imatrix is not None:
        args += ["--imatrix", str(imatrix)]
    if recipe.output_type:
        args += ["--output-tensor-type", recipe.output_type.lower()]
    if recipe.embedding_type:
        args += ["--token-embedding-type", recipe.embedding_type.lower()]
    for glob, t in recipe.overrides:
        args += ["--tensor-type", f"{glob_to_regex(glob)}={t.lower()}"]
    return args


def _check_space(out: Path, f16_bytes: int, qtype: str) -> None:
    need = int(f16_bytes * NOMINAL_BPW.get(qtype, 16) / 16 * 1.25) + (16 << 20)
    free = shutil.disk_usage(out).free
    if free < need:
        raise OutputError(
            f"not enough free space in {out.parent}: {qtype} needs about {need / 2**20:.0f} MiB, "
            f"{free / 2**20:.0f} MiB free"
        )


def _check_applied(recipe: Recipe, got: gguf_read.GGUFSummary, source: gguf_read.GGUFSummary) -> None:
    """The overrides asked for must be in the file; llama-quantize falls back silently on odd shapes."""
    types = got.types()
    shapes = source.by_name()
    want: dict[str, str] = {}
    if recipe.output_type:
        name = "output.weight" if "output.weight" in types else "token_embd.weight"
        want[name] = recipe.output_type.upper()
    if recipe.embedding_type:
        want["token_embd.weight"] = recipe.embedding_type.upper()
    for name in types:
        for glob, t in recipe.overrides:
            if re.search(glob_to_regex(glob), name) and name in shapes and len(shapes[name].ne) >= 2:
                want.setdefault(name, t.upper())
                break
    wrong = [f"{n} is {types[n]}, not {t}" for n, t in want.items() if n in types and types[n] != t]
    if wrong:
        raise ToolError(
            f"llama-quantize did not apply the overrides of {recipe.name}: {'; '.join(wrong[:3])}"
        )


def _quantize_error(recipe: Recipe, log: str, dst: Path) -> Exception:
    if "requires an imatrix" in log or "requires an importance matrix" in log:
        return InputError(f"{recipe.qtype} needs an importance matrix; use {recipe.qtype}-imat with --calib")
    m = re.search(r"imatrix size \d+ is different from tensor size \d+ for \S+", log)
    if m:
        return InputError(f"shape mismatch between the imatrix and the model: {m.group(0)}")
    if "No space left on device" in log or "failed to write" in log.lower():
        return OutputError(f"disk full while writing {dst}; nothing was kept")
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    errs = [ln for ln in lines if "error" in ln.lower() or "failed" in ln.lower()]
    return ToolError(f"llama-quantize failed for {recipe.name}: {(errs or lines or ['no output'])[-1][:300]}")


BACKEND = GGUFBackend

"""`orlik train merge`: a linear merge of N checkpoints of one shape, streamed tensor by tensor.

The arithmetic is mergekit's `linear` method, step for step: float32 accumulation of
weight x tensor in input order (addcmul), divided by the sum of the weights when normalizing, cast
back to the inputs' dtype. mergekit's YAML for `linear` is accepted as it is. Only one tensor per
input is in memory at a time (see tensorio), so merging two 7B checkpoints needs a few hundred MB,
not two models.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orlik import progress
from orlik.checkpoint import TOKENIZER_FILES, Checkpoint
from orlik.errors import CheckpointError, InputError
from orlik.fsutil import atomic_dir, atomic_write_text, sha256_file
from orlik.training import tensorio

if TYPE_CHECKING:
    import torch

METHODS = ("linear",)
_DTYPES = ("float16", "bfloat16", "float32")
# Config keys that may differ between checkpoints of one architecture (bookkeeping, not shape).
_CONFIG_FREE = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache", "architectures"}


@dataclass
class MergePlan:
    models: list[Path]
    weights: list[float]
    method: str = "linear"
    normalize: bool = True
    dtype: str | None = None  # inputs are cast to this before merging (mergekit's `dtype`)
    source: str = "command line"
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["models"] = [str(m) for m in self.models]
        return d


def plan_from_args(models: list[Path], weights: list[float] | None, normalize: bool = True,
                   dtype: str | None = None) -> MergePlan:  # fmt: skip
    if len(models) < 2:
        raise InputError("merge needs at least two checkpoints")
    weights = weights if weights is not None else [1.0] * len(models)
    if len(weights) != len(models):
        raise InputError(f"{len(weights)} weights given for {len(models)} checkpoints")
    return _checked(MergePlan(models=[Path(m) for m in models], weights=[float(w) for w in weights],
                              normalize=normalize, dtype=dtype))  # fmt: skip


def plan_from_mergekit_yaml(path: Path) -> MergePlan:
    """A mergekit config (merge_method: linear, models[].model + parameters.weight, parameters.normalize,
    dtype). Paths are taken as mergekit takes them: relative to the working directory."""
    import yaml

    try:
        cfg = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise InputError(f"cannot read merge config {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{path}: expected a mergekit YAML mapping")
    method = cfg.get("merge_method")
    if method not in METHODS:
        raise InputError(
            f"{path}: merge_method {method!r} is not supported; orlik merges: {', '.join(METHODS)}"
        )
    if cfg.get("slices"):
        raise InputError(
            f"{path}: `slices` is not supported for linear merges; list the checkpoints under `models`"
        )
    unsupported = sorted(set(cfg) - {"merge_method", "models", "parameters", "dtype", "out_dtype", "base_model",
                                     "tokenizer_source", "name"})  # fmt: skip
    if unsupported:
        raise InputError(f"{path}: unsupported keys {', '.join(unsupported)}")
    if cfg.get("tokenizer_source") not in (None, "base"):
        raise InputError(f"{path}: tokenizer_source {cfg['tokenizer_source']!r} is not supported; "
                         "orlik merges checkpoints that share one tokenizer")  # fmt: skip
    models, weights = [], []
    for i, m in enumerate(cfg.get("models") or []):
        if not isinstance(m, dict) or not isinstance(m.get("model"), str):
            raise InputError(f"{path}: models[{i}] needs a `model:` path")
        w = (m.get("parameters") or {}).get("weight")
        if not isinstance(w, (int, float)) or isinstance(w, bool):
            raise InputError(f"{path}: models[{i}] needs a numeric parameters.weight (per-tensor weights "
                             "and gradients are not supported)")  # fmt: skip
        models.append(Path(m["model"]))
        weights.append(float(w))
    params = cfg.get("parameters") or {}
    normalize = params.get("normalize", True)
    if not isinstance(normalize, bool):
        raise InputError(f"{path}: parameters.normalize must be true or false")
    dtype = cfg.get("dtype")
    out_dtype = cfg.get("out_dtype")
    if out_dtype not in (None, dtype):
        raise InputError(f"{path}: out_dtype different from dtype is not supported")
    plan = MergePlan(models=models, weights=weights, normalize=normalize, dtype=dtype, source=str(path))
    if len(models) < 2:
        raise InputError(f"{path}: a merge needs at least two models")
    return _checked(plan)


def _checked(plan: MergePlan) -> MergePlan:
    if plan.dtype is not None and plan.dtype not in _DTYPES:
        raise InputError(f"dtype {plan.dtype!r} is not one of {', '.join(_DTYPES)}")
    if plan.normalize and abs(sum(plan.weights)) < 1e-12:
        raise InputError("the weights sum to 0, so they cannot be normalized; pass --no-normalize")
    return plan


@dataclass
class _Inputs:
    ckpts: list[Checkpoint]
    tensors: list[dict[str, tensorio.TensorInfo]]


def _open_inputs(plan: MergePlan) -> _Inputs:
    """Open every checkpoint and refuse, before anything is written, a merge that cannot be done."""
    ckpts = [Checkpoint.open(m) for m in plan.models]
    first = ckpts[0]
    tensors = [tensorio.checkpoint_tensors(c.weight_files) for c in ckpts]
    for c, t in zip(ckpts[1:], tensors[1:], strict=True):
        if c.arch != first.arch:
            raise CheckpointError(f"{c.path} is a {c.arch} model but {first.path} is {first.arch}")
        if set(t) != set(tensors[0]):
            extra = sorted(set(t) ^ set(tensors[0]))
            raise CheckpointError(f"{c.path} and {first.path} hold different tensors (e.g. {extra[0]})")
        for name, info in tensors[0].items():
            if t[name].shape != info.shape:
                raise CheckpointError(f"shape mismatch: {name} is {list(t[name].shape)} in {c.path} but "
                                      f"{list(info.shape)} in {first.path}")  # fmt: skip
            if plan.dtype is None and t[name].dtype != info.dtype:
                raise CheckpointError(f"dtype mismatch: {name} is {t[name].dtype} in {c.path} but "
                                      f"{info.dtype} in {first.path}; set a common dtype")  # fmt: skip
        _check_config(first, c)
        _check_tokenizer(first, c)
    for name, info in tensors[0].items():
        if info.dtype not in ("F16", "BF16", "F32", "F64"):
            raise CheckpointError(f"{first.path}: tensor {name} is {info.dtype}; linear merging needs floats")
    return _Inputs(ckpts, tensors)


def _check_config(a: Checkpoint, b: Checkpoint) -> None:
    for k in sorted((set(a.config) | set(b.config)) - _CONFIG_FREE):
        if a.config.get(k) != b.config.get(k) and not isinstance(a.config.get(k), dict):
            raise CheckpointError(f"config mismatch: {k} is {b.config.get(k)!r} in {b.path} but "
                                  f"{a.config.get(k)!r} in {a.path}")  # fmt: skip


def _check_tokenizer(a: Checkpoint, b: Checkpoint) -> None:
    for n in TOKENIZER_FILES:
        fa, fb = a.path / n, b.path / n
        if fa.is_file() != fb.is_file() or (fa.is_file() and sha256_file(fa) != sha256_file(fb)):
            raise CheckpointError(f"tokenizer mismatch: {n} differs between {a.path} and {b.path}; "
                                  "linear merging needs one shared vocabulary")  # fmt: skip


def linear(tensors: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    """mergekit's linear merge of one tensor: float32 (float64 for float64 input) weighted sum, in
    input order, divided by the weights' sum, rounded once to the input dtype."""
    import torch

    first = tensors[0]
    acc_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    w = torch.tensor(weights, dtype=acc_dtype)
    # mergekit starts from zeros and adds every term; starting from the first product and leaving out
    # zero-weight terms gives the same sums except that a -0.0 stays -0.0 (0.0 + -0.0 is +0.0), so a
    # self-merge, or weights (1, 0), return the input bit for bit.
    terms = [(t, c) for t, c in zip(tensors, w.unbind(0), strict=True) if float(c) != 0.0]
    if not terms:
        return torch.zeros_like(first)
    result = terms[0][0].to(acc_dtype).mul_(terms[0][1])
    for t, c in terms[1:]:
        result.addcmul_(t, c)
    if normalize:
        result.div_(w.sum())
    return result.to(first.dtype)


def run(plan: MergePlan, out: Path, force: bool = False) -> dict[str, Any]:
    import torch

    inputs = _open_inputs(plan)
    names = list(inputs.tensors[0])
    cast = getattr(torch, plan.dtype) if plan.dtype else None
    out_tensors = [
        tensorio.OutTensor(n, tensorio.dtype_code(cast) if cast else inputs.tensors[0][n].dtype,
                           inputs.tensors[0][n].shape)
        for n in names
    ]  # fmt: skip

    def pieces(reader: tensorio.TensorReader, n: str) -> Iterator[torch.Tensor]:
        # Linear merging is elementwise, so each tensor goes through in flat pieces: one piece per
        # input in memory (plus a float32 accumulator), whatever the tensor's size.
        for ts in zip(*(reader.chunks(t[n]) for t in inputs.tensors), strict=True):
            yield linear(
                [t.to(cast) for t in ts] if cast is not None else list(ts), plan.weights, plan.normalize
            )

    def produce(reader: tensorio.TensorReader, bar: Any) -> Iterator[Iterator[torch.Tensor]]:
        for n in names:
            yield pieces(reader, n)
            bar.advance(1)

    first = inputs.ckpts[0]
    with atomic_dir(Path(out), force=force, kind="checkpoint") as tmp, tensorio.TensorReader() as reader:
        with progress.bar("merge", total=len(names)) as bar:
            files = tensorio.write_checkpoint_weights(tmp, out_tensors, produce(reader, bar))
        cfg = dict(first.config)
        if plan.dtype:
            cfg["dtype"] = plan.dtype
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        tensorio.copy_side_files(first.path, tmp)
        summary = {"out": str(out), "method": plan.method, "models": [str(c.path) for c in inputs.ckpts],
                   "model_hashes": [c.hash for c in inputs.ckpts], "weights": plan.weights,
                   "normalize": plan.normalize, "dtype": plan.dtype, "tensors": len(names),
                   "files": files, "config_source": plan.source}  # fmt: skip
        atomic_write_text(tmp / "merge.json", json.dumps(summary, indent=2) + "\n")
    return summary

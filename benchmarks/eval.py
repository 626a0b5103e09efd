"""Polish task accuracy per variant, through the OpenAI-compatible endpoint, by lm-evaluation-harness.

Three steps, as bench: a plan (tasks and servers, all checked before anything starts), the work
(one `orlik serve` per variant, or the running server --base-url names, scored by lm-eval's
`local-completions` model with `num_concurrent` requests in flight), and the report
(benchmarks/eval_report.py). The tasks are the project's own (benchmarks/tasks/) plus any folder
of lm-eval task YAMLs the user includes.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orlik.errors import InputError, MissingDependencyError, ToolError, UnknownNameError

TASKS_DIR = Path(__file__).parent / "tasks"
NEEDED = (
    "task",
    "output_type",
    "doc_to_text",
    "doc_to_target",
    "doc_to_choice",
    "custom_dataset",
    "dataset_kwargs",
)
NUM_CONCURRENT = 4  # requests in flight: the server's --parallel slots overlap them


@dataclass(frozen=True)
class TaskSpec:
    """One lm-eval task YAML of the kind orlik ships: choices, and a JSONL file beside it."""

    name: str
    yaml: Path
    data: Path
    fields: tuple[str, ...]
    choices: tuple[str, ...]

    def labels(self) -> list[int]:
        from orlik.benchmarks.tasks import jsonl

        try:
            return [int(r["label"]) for r in jsonl.read(self.data, list(self.fields))]
        except (ValueError, TypeError, KeyError) as e:
            raise InputError(f"task {self.name}: {e}") from None

    def majority(self) -> float:
        """Accuracy of always answering the most frequent label: the floor a model must beat."""
        counts = Counter(self.labels())
        return max(counts.values()) / sum(counts.values())


def _yaml(path: Path) -> dict[str, Any]:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    # lm-eval's own tags: kept as text here, resolved by lm-eval when it loads the task.
    Loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")
    try:
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # a SafeLoader with one tag added
    except (OSError, yaml.YAMLError) as e:
        raise InputError(f"{path}: not a readable task YAML: {e}") from None
    return doc if isinstance(doc, dict) else {}


def read_spec(path: Path) -> TaskSpec:
    """The task in `path`, with every field lm-eval and the report need; InputError naming the first missing."""
    doc = _yaml(path)
    missing = [k for k in NEEDED if k not in doc]
    if missing:
        raise InputError(f"{path}: the task has no {missing[0]!r} (a task needs {', '.join(NEEDED)})")
    kw = doc["dataset_kwargs"] or {}
    if "file" not in kw or "fields" not in kw:
        raise InputError(f"{path}: dataset_kwargs needs 'file' (the JSONL beside it) and 'fields'")
    data = path.parent / str(kw["file"])
    if not data.is_file():
        raise InputError(f"{path}: its data file {data} does not exist")
    choices = doc["doc_to_choice"]  # a list of letters, or a template that reads each item's own
    letters = tuple(str(c) for c in choices) if isinstance(choices, list) else ()
    return TaskSpec(str(doc["task"]), path, data, tuple(kw["fields"]), letters)


def available(include: Sequence[Path] = ()) -> dict[str, TaskSpec]:
    """Every task: the project's, then those in the --include folders (a later one wins a name)."""
    found: dict[str, TaskSpec] = {}
    for d in [TASKS_DIR, *include]:
        if not Path(d).is_dir():
            raise InputError(f"task folder {d} does not exist")
        for y in sorted(Path(d).glob("*.yaml")):
            spec = read_spec(y)
            found[spec.name] = spec
    return found


def task_spec(name: str, include: Sequence[Path] = ()) -> TaskSpec:
    return resolve_tasks(name, include)[0]


def resolve_tasks(names: str, include: Sequence[Path] = ()) -> list[TaskSpec]:
    """'all' (the project's five and any included) or comma-separated names; each checked now."""
    found = available(include)
    wanted = list(found) if names.strip() == "all" else [n.strip() for n in names.split(",") if n.strip()]
    if not wanted:
        raise InputError("--tasks names no task; give 'all' or names such as pl_sentiment,pl_topic")
    out = []
    for n in wanted:
        if n not in found:
            raise UnknownNameError("task", n, list(found))
        found[n].labels()  # a missing field or unreadable line fails before any server starts
        out.append(found[n])
    return out


# ------------------------------------------------------------------------------------- the work
@dataclass
class TaskScore:
    acc: float
    stderr: float
    n: int


@dataclass
class VariantScores:
    name: str
    tasks: dict[str, TaskScore] = field(default_factory=dict)
    seconds: float = 0.0

    def mean(self) -> float:
        return sum(t.acc for t in self.tasks.values()) / max(len(self.tasks), 1)


def _get(url: str, api_key: str | None) -> Any:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(url, headers=headers, timeout=10)
    except httpx.HTTPError as e:
        raise InputError(f"cannot reach {url}: {e.__class__.__name__}: {e}") from None
    if r.status_code == 401:
        raise InputError(f"{url} refused the API key (401); pass --api-key or set ORLIK_API_KEY")
    if r.status_code != 200:
        raise InputError(f"{url} answered {r.status_code}: {r.text[:200]}")
    return r.json()


def served_model(base_url: str, api_key: str | None, name: str | None) -> tuple[str, int | None]:
    """The model to evaluate at base_url (the only one, or `name`) and its context length if known."""
    ids = [m["id"] for m in _get(f"{base_url}/v1/models", api_key).get("data", [])]
    if name is None:
        if len(ids) != 1:
            raise InputError(
                f"{base_url} serves {len(ids)} models ({', '.join(ids)}); name one with --model-name"
            )
        name = ids[0]
    elif name not in ids:
        raise UnknownNameError("served model", name, ids)
    with contextlib.suppress(InputError):
        info = _get(f"{base_url}/tokenizer_info?model={name}", api_key)
        return name, int(info.get("model_max_length") or 0) or None
    return name, None


@contextlib.contextmanager
def _env(key: str, value: str) -> Iterator[None]:
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _api_key_env(api_key: str | None) -> contextlib.AbstractContextManager[None]:
    # lm-eval's local-completions sends OPENAI_API_KEY as its Bearer token.
    return _env("OPENAI_API_KEY", api_key or "")


def run_tasks(base_url: str, model: str, specs: Sequence[TaskSpec], *, api_key: str | None = None,
              num_concurrent: int = NUM_CONCURRENT, max_length: int | None = None,
              limit: int | None = None) -> dict[str, TaskScore]:  # fmt: skip
    """lm-eval's local-completions against base_url: accuracy and its standard error per task."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise MissingDependencyError('lm-eval is not installed; pip install "orlik[eval]"') from None
    dirs = sorted({str(s.yaml.parent) for s in specs})
    tm = TaskManager(include_path=dirs, include_defaults=False)
    # Token ids go over the wire, tokenized by the served model itself (/tokenize): exact for GGUF.
    args = {"model": model, "base_url": f"{base_url}/v1/completions", "num_concurrent": int(num_concurrent),
            "tokenizer_backend": "remote", "tokenized_requests": True, "max_retries": 3,
            "max_length": int(max_length or 2048), "auth_token": api_key, "timeout": 600}  # fmt: skip
    with _api_key_env(api_key), _env("TQDM_DISABLE", "1"):  # orlik's own output, not lm-eval's bars
        try:
            out = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=[s.name for s in specs],
                                          task_manager=tm, limit=limit, log_samples=False)  # fmt: skip
        except (RuntimeError, ValueError, OSError) as e:
            raise ToolError(f"lm-eval failed against {base_url}: {str(e).splitlines()[0][:300]}") from None
    scores = {}
    for s in specs:
        r = out["results"][s.name]
        n = int(out.get("n-samples", {}).get(s.name, {}).get("effective", 0))
        scores[s.name] = TaskScore(float(r["acc,none"]), float(r.get("acc_stderr,none") or 0.0), n)
    return scores


@contextlib.contextmanager
def serving(name: str, path: Path, *, parallel: int, threads: int | None, log: Path | None) -> Iterator[str]:
    """`orlik serve NAME=PATH` on a free loopback port for the duration; yields its base URL."""
    from orlik.benchmarks import serving_proc

    args = ["--parallel", str(parallel)] + (["--threads", str(threads)] if threads else [])
    try:
        with serving_proc.orlik_serve([f"{name}={path}"], *args, log=log) as url:
            yield url
    except SystemExit as e:  # serving_proc's way of saying the child did not come up
        raise ToolError(f"orlik serve {path}: {e}" + (f" (log: {log})" if log else "")) from None


def evaluate_url(base_url: str, label: str, specs: Sequence[TaskSpec], *, model: str | None = None,
                 api_key: str | None = None, num_concurrent: int = NUM_CONCURRENT,
                 limit: int | None = None) -> VariantScores:  # fmt: skip
    t0 = time.monotonic()
    name, n_ctx = served_model(base_url, api_key, model)
    tasks = run_tasks(base_url, name, specs, api_key=api_key, num_concurrent=num_concurrent,
                      max_length=n_ctx, limit=limit)  # fmt: skip
    return VariantScores(label, tasks, round(time.monotonic() - t0, 1))


def evaluate(model: Path | None, variant_names: Sequence[str], *, tasks: str = "all", include: Sequence[Path] = (),
             variants_dir: Path | None = None, base_url: str | None = None, api_key: str | None = None,
             model_name: str | None = None, num_concurrent: int = NUM_CONCURRENT, parallel: int = NUM_CONCURRENT,
             threads: int | None = None, limit: int | None = None,
             logs: Path | None = None) -> tuple[list[TaskSpec], list[VariantScores]]:  # fmt: skip
    """Every target's scores: the server at base_url, or FP16 and each variant served in turn."""
    specs = resolve_tasks(tasks, include)
    if base_url:
        base_url = base_url.rstrip("/").removesuffix("/v1")
        name, _ = served_model(base_url, api_key, model_name)
        return specs, [evaluate_url(base_url, name, specs, model=name, api_key=api_key,
                                    num_concurrent=num_concurrent, limit=limit)]  # fmt: skip
    if model is None:
        raise InputError("give a MODEL (an FP16 checkpoint) or --base-url of a running server")
    from orlik import paths
    from orlik.benchmarks.plan import resolve_variants
    from orlik.checkpoint import Checkpoint

    Checkpoint.open(model)
    vdir = variants_dir or paths.variants_dir(model)
    variants = resolve_variants(variant_names, vdir) if (variant_names or vdir.is_dir()) else []
    targets = [(FP16_NAME, Path(model)), *((v.name, v.path) for v in variants)]
    scores = []
    for name, path in targets:
        log = (logs / f"{name}.log") if logs else None
        if logs:
            logs.mkdir(parents=True, exist_ok=True)
        with serving(name, path, parallel=parallel, threads=threads, log=log) as url:
            scores.append(
                evaluate_url(url, name, specs, model=name, num_concurrent=num_concurrent, limit=limit)
            )
    return specs, scores


FP16_NAME = "FP16"

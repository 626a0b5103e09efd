"""What every training verb shares on transformers' Trainer and TRL: arguments, the rich progress bar,
resuming from the engine's own checkpoints, the rank test, and the FP16 export.

The same code runs as one process or under `torchrun` / `accelerate launch` (DDP with gloo on CPU,
NCCL on GPU, or FSDP through an accelerate config): the Trainer reads the launcher's environment.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from orlik import owner, progress
from orlik.checkpoint import Checkpoint
from orlik.errors import InputError
from orlik.fsutil import atomic_dir, atomic_write_text, check_writable

TRAINING_JSON = "training.json"  # written last into every checkpoint orlik trains: its mark too
RUN_JSON = "orlik-run.json"  # in <out>.work: the settings its engine checkpoints were made with
# Files of a source checkpoint that a post-trained checkpoint carries over unchanged.
_NOT_CARRIED = re.compile(
    r"^(config\.json|model\.safetensors\.index\.json|\.orlik.*)$|\.(safetensors|bin|pt)$"
)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return world()[0] == 0


def set_threads(threads: int | None) -> None:
    """torch threads: the given number, else the cores shared evenly by the launched processes.
    Also keeps the libraries' own progress bars and notices out of orlik's output."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # TRL's configs still default the field transformers 5 renamed (gradient -> activation checkpointing).
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
    per_rank = max(1, (os.cpu_count() or 1) // world()[1])
    torch.set_num_threads(threads or per_rank)


def claim_out(out: Path, *, force: bool, work_marks: tuple[str, ...] = (RUN_JSON,)) -> Path:
    """Check, before any training, that `out` and its engine-checkpoint folder `<out>.work` may be
    written: the parent is writable and whatever orlik would replace there is orlik's (or --force).
    Returns the work folder."""
    out = Path(out)
    check_writable(out.parent)
    work = out.with_name(out.name + ".work")
    owner.check_replaceable(out, force=force, marks=(TRAINING_JSON,), kind="checkpoint")
    owner.check_replaceable(work, force=force, marks=work_marks, kind="train-state")
    return work


def open_chat_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint a post-training verb starts from; it needs a chat template to render chats."""
    ckpt = Checkpoint.open(path)
    if not ckpt.chat_template:
        raise InputError(f"{ckpt.path} has no chat template (chat_template.jinja or tokenizer_config.json)")
    return ckpt


def training_args(
    work: Path, *, seed: int, steps: int, batch_size: int, lr: float, cls: Any = None, **kw: Any
) -> Any:
    """TrainingArguments with orlik's conventions: the step budget, per-step logging, no tqdm or
    reporting integrations, engine checkpoints in `work`. `batch_size` is the global batch: each of
    the launched processes takes an equal share, so a run's batches do not depend on how many
    processes share it."""
    from transformers import TrainingArguments

    _, n = world()
    if batch_size % n:
        raise InputError(f"batch size {batch_size} does not split evenly over {n} processes")
    defaults: dict[str, Any] = dict(
        output_dir=str(work),
        max_steps=steps,
        per_device_train_batch_size=batch_size // n,
        learning_rate=lr,
        seed=seed,
        data_seed=seed,
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="steps",
        save_total_limit=1,
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        train_sampling_strategy="sequential",
        ddp_find_unused_parameters=False,
        save_only_model=False,
    )
    import torch

    if not torch.cuda.is_available():
        # Without this the engine treats a CPU torchrun launch as N independent runs.
        defaults.update(use_cpu=True, ddp_backend="gloo" if n > 1 else None)
    defaults.update(kw)
    return (cls or TrainingArguments)(**defaults)


class ProgressBar:
    """A TrainerCallback that drives orlik's rich bar: step, loss, tokens per second (and any extra
    field a verb adds). It also keeps every logged row, so the verb can write the loss curve."""

    def __init__(self, title: str, fields: tuple[str, ...] = ()) -> None:
        self.title, self.fields = title, fields
        self.rows: list[dict[str, Any]] = []
        self.extra: dict[str, str] = {}
        self._stack = ExitStack()
        self._bar: Any = None
        self._t0 = 0.0
        self._tok0 = 0
        self.tokens_per_second: float | None = None
        self.seconds = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        fields = {"loss": "-", "tok_s": "-", **{f: "-" for f in self.fields}}
        if is_main():
            self._bar = self._stack.enter_context(progress.bar(self.title, total=state.max_steps, **fields))
            self._bar.update(completed=state.global_step)
        self._t0, self._tok0 = time.perf_counter(), state.num_input_tokens_seen

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        if not logs or "train_loss" in logs:  # the closing summary, not a step
            return
        self.rows.append({"step": state.global_step, **logs})
        self.seconds = time.perf_counter() - self._t0
        tokens = state.num_input_tokens_seen - self._tok0
        if tokens and self.seconds > 0:
            self.tokens_per_second = tokens / self.seconds
        if self._bar is not None:
            for f in self.fields:
                if isinstance(logs.get(f), (int, float)):
                    self.extra[f] = f"{logs[f]:.3g}"
            upd = {f: self.extra.get(f, "-") for f in self.fields}
            if "loss" in logs:
                upd["loss"] = f"{logs['loss']:.3f}"
            if self.tokens_per_second:
                upd["tok_s"] = f"{self.tokens_per_second:,.0f}"
            self._bar.update(completed=state.global_step, **upd)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.seconds = time.perf_counter() - self._t0
        # The whole curve, also the steps before a resume (the engine's state carries their logs).
        self.rows = [dict(r) for r in state.log_history if "train_loss" not in r and "eval_loss" not in r]
        self._stack.close()

    def __getattr__(self, name: str) -> Any:
        # Every other TrainerCallback event is a no-op (TrainerCallback's own methods return None).
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def losses(self, key: str = "loss") -> list[float]:
        return [r[key] for r in self.rows if key in r]


def install(trainer: Any, bar: ProgressBar) -> None:
    """Swap the engine's tqdm printer for orlik's bar; keep the libraries' own bars and notices out."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(bar)


def last_checkpoint(work: Path) -> Path | None:
    """The newest engine checkpoint that was written to the end (kill -9 can leave one half-written:
    the Trainer writes trainer_state.json last)."""
    if not work.is_dir():
        return None
    found = sorted(
        (int(m.group(1)), p) for p in work.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()
    )
    for _, p in reversed(found):
        try:
            json.loads((p / "trainer_state.json").read_text())
            return p
        except (OSError, ValueError):
            continue
    return None


def resume_point(work: Path, settings: dict[str, Any], resume: bool) -> str | None:
    """The checkpoint to resume from, if `work` holds one made with the same settings. Engine
    checkpoints made with other settings are removed (they are orlik's, in orlik's .work dir)."""
    run_file = work / RUN_JSON
    same = False
    if run_file.is_file():
        try:
            same = json.loads(run_file.read_text()) == json.loads(json.dumps(settings))
        except ValueError:
            same = False
    ckpt = last_checkpoint(work) if resume and same else None
    if is_main():
        if not same and work.is_dir() and any(_CHECKPOINT.match(p.name) for p in work.iterdir()):
            progress.info(
                f"[yellow]ignoring the checkpoints in {work}: they were made with other settings[/]"
            )
            for p in work.iterdir():
                if _CHECKPOINT.match(p.name):
                    shutil.rmtree(p, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        owner.write_marker(work, "train-state", "complete")
        atomic_write_text(run_file, json.dumps(settings, indent=1))
    if ckpt is not None:
        progress.info(f"resuming from {ckpt.name}")
    return str(ckpt) if ckpt else None


def finish(work: Path) -> None:
    """Remove the engine checkpoints once the exported checkpoint is in place."""
    if is_main() and owner.is_orlik_dir(work, (RUN_JSON,)):
        shutil.rmtree(work, ignore_errors=True)


def export_from(source: Path, model: Any, out: Path, report: dict[str, Any], *, force: bool = False) -> None:
    """Write `model` as an FP16 checkpoint beside the source's tokenizer, chat template and generation
    config (copied unchanged), with `report` as training.json. Only the main process writes."""
    import torch

    if not is_main():
        return
    with atomic_dir(out, force=force, marks=(TRAINING_JSON,), kind="checkpoint") as tmp:
        model.to(torch.float16).save_pretrained(str(tmp), safe_serialization=True)
        for f in Path(source).iterdir():
            if f.is_file() and not _NOT_CARRIED.search(f.name) and f.name not in (TRAINING_JSON, "eval.md"):
                shutil.copy2(f, tmp / f.name)
        atomic_write_text(tmp / TRAINING_JSON, json.dumps(report, indent=1, ensure_ascii=False))

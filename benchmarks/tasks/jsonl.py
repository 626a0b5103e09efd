"""lm-eval's `custom_dataset` for the Polish tasks: a JSONL file beside the task YAML, no downloads.

lm-eval imports this file by path from the YAML's folder (`!function jsonl.load`), so it needs
nothing from orlik: `lm_eval --include_path <this folder> --tasks orlik_pl` works on its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent


def read(file: str | Path, fields: list[str]) -> list[dict[str, Any]]:
    """The records of a task file; ValueError naming the file, line and field when one is missing."""
    path = Path(file) if Path(file).is_absolute() else HERE / file
    if not path.is_file():
        raise ValueError(f"task data {path} does not exist")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: invalid JSON: {e.msg}") from None
        missing = [f for f in fields if f not in row] if isinstance(row, dict) else fields
        if missing:
            raise ValueError(
                f"{path}:{n}: the item has no field {missing[0]!r} (each needs {', '.join(fields)})"
            )
        rows.append(row)
    if not rows:
        raise ValueError(f"task data {path} holds no items")
    return rows


def load(file: str, fields: list[str], **_: Any) -> dict[str, Any]:
    """{"test": datasets.Dataset} for lm-eval; other keyword arguments (its metadata) are ignored."""
    import datasets

    return {"test": datasets.Dataset.from_list(read(file, fields))}

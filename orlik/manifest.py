"""variant.json: the manifest of one quantized variant. Metadata lives here, never in file names."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from orlik.errors import ManifestError
from orlik.fsutil import atomic_write_text, sha256_file
from orlik.owner import MARKER

SCHEMA_VERSION = 1
MANIFEST = "variant.json"


@dataclass
class Variant:
    """A quantized model directory described by its variant.json."""

    name: str
    format: str
    recipe: dict[str, Any]
    base_hash: str
    files: dict[str, str]
    bytes: int
    bpw: float
    tools: dict[str, str] = field(default_factory=dict)
    calibration_hash: str | None = None
    imatrix_hash: str | None = None
    # Files kept as a record of how the variant was made (llama-quantize's log), hashed like `files`
    # but not part of the model, so not counted in `bytes`.
    logs: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    schema_version: int = SCHEMA_VERSION
    path: Path | None = field(default=None, compare=False)

    _REQUIRED = {
        "name": str,
        "format": str,
        "recipe": dict,
        "base_hash": str,
        "files": dict,
        "bytes": int,
        "bpw": (int, float),
    }
    _OPTIONAL = {
        "tools": dict,
        "calibration_hash": (str, type(None)),
        "imatrix_hash": (str, type(None)),
        "logs": dict,
        "extra": dict,
        "created": str,
        "schema_version": int,
    }

    @classmethod
    def from_dict(cls, d: Any, *, where: str = "variant.json") -> Variant:
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: expected a JSON object")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(f"{where}: schema_version {version!r} is not {SCHEMA_VERSION}")
        missing = [k for k in cls._REQUIRED if k not in d]
        if missing:
            raise ManifestError(f"{where}: missing field(s) {', '.join(missing)}")
        known = set(cls._REQUIRED) | set(cls._OPTIONAL)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ManifestError(f"{where}: unknown field(s) {', '.join(unknown)}")
        for k, t in {**cls._REQUIRED, **cls._OPTIONAL}.items():
            if k in d and (not isinstance(d[k], t) or isinstance(d[k], bool)):
                raise ManifestError(f"{where}: field {k!r} has the wrong type ({type(d[k]).__name__})")
        if not d["files"] or not all(isinstance(v, str) and len(v) == 64 for v in d["files"].values()):
            raise ManifestError(f"{where}: 'files' must map each file to its sha256")
        if not all(isinstance(v, str) and len(v) == 64 for v in d.get("logs", {}).values()):
            raise ManifestError(f"{where}: 'logs' must map each file to its sha256")
        d = _with_logs(d)
        outside = [k for k in {**d["files"], **d["logs"]} if _escapes(k)]
        if outside:
            raise ManifestError(
                f"{where}: file name {outside[0]!r} is absolute or leaves the variant directory"
            )
        if d["bytes"] <= 0 or not 0 < d["bpw"] <= 32:
            raise ManifestError(f"{where}: implausible bytes/bpw ({d['bytes']}, {d['bpw']})")
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("path")
        return d

    @classmethod
    def load(cls, directory: str | Path) -> Variant:
        directory = Path(directory)
        f = directory / MANIFEST
        if not f.is_file():
            raise ManifestError(f"{directory} has no {MANIFEST}; is it an orlik variant?")
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ManifestError(f"{f} is corrupt: {e}") from None
        v = cls.from_dict(data, where=str(f))
        v.path = directory
        return v

    def save(self, directory: Path) -> None:
        atomic_write_text(
            Path(directory) / MANIFEST, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"
        )

    def verify(self, directory: Path | None = None) -> list[str]:
        """Files that are missing or whose sha256 differs; empty means the variant is intact."""
        base = Path(directory or self.path or ".")
        bad = []
        for rel, digest in {**self.files, **self.logs}.items():
            p = base / rel
            if not p.is_file() or sha256_file(p) != digest:
                bad.append(rel)
        return bad

    def check(self, *, hashes: bool = True, directory: Path | None = None) -> None:
        """Raise ManifestError unless every file (and log) is present, the files hold the recorded
        `bytes` and, with `hashes`, each has its recorded sha256. The size check costs a stat per
        file; hashing reads them all."""
        base = Path(directory or self.path or ".")
        missing = [rel for rel in {**self.files, **self.logs} if not (base / rel).is_file()]
        if missing:
            raise ManifestError(f"{base}: file(s) listed in {MANIFEST} are missing: {', '.join(missing)}")
        sizes = {rel: (base / rel).stat().st_size for rel in self.files}
        if self.bytes != sum(sizes.values()):
            raise ManifestError(f"{base}: files hold {sum(sizes.values())} bytes, {MANIFEST} records {self.bytes} (truncated "
                                "or replaced?); rebuild it with `orlik quantize`")  # fmt: skip
        bad = self.verify(base) if hashes else []
        if bad:
            raise ManifestError(f"{base}: files differ from {MANIFEST}: {', '.join(bad)} (rebuild it with "
                                "`orlik quantize`, or skip this check with --no-verify)")  # fmt: skip

    def main_file(self) -> Path:
        """The primary weights file (the first listed), for single-file formats such as GGUF."""
        assert self.path is not None
        return self.path / next(iter(self.files))


def _with_logs(d: dict[str, Any]) -> dict[str, Any]:
    """`d` with its `logs`. GGUF manifests written before `logs` existed (same schema version) list
    llama-quantize's log under `files` while `bytes` counts the .gguf alone: read the log as a log."""
    if "logs" in d:
        return d
    log = "llama-quantize.log"
    if d["format"] != "gguf" or log not in d["files"] or len(d["files"]) < 2:
        return {**d, "logs": {}}
    return {**d, "files": {k: h for k, h in d["files"].items() if k != log}, "logs": {log: d["files"][log]}}


def _escapes(name: str) -> bool:
    """A manifest file name that is absolute, or climbs out of the variant directory with `..`."""
    parts = name.replace("\\", "/").split("/")
    return not name or os.path.isabs(name) or name.startswith(("/", "\\")) or ":" in parts[0] or ".." in parts


def hash_files(directory: Path, names: list[str] | None = None) -> dict[str, str]:
    """sha256 of each file under `directory` (recursively), except the manifest itself."""
    directory = Path(directory)
    if names is None:
        names = sorted(
            str(p.relative_to(directory))
            for p in directory.rglob("*")
            if p.is_file() and p.name not in (MANIFEST, MARKER)
        )
    return {n: sha256_file(directory / n) for n in names}

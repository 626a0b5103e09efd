"""Atomic output directories and file hashing: nothing half-written is ever left marked done."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from orlik.errors import OutputError

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def cache_root() -> Path:
    """orlik's per-user cache ($ORLIK_CACHE, default ~/.cache/orlik)."""
    return Path(os.environ.get("ORLIK_CACHE", Path.home() / ".cache" / "orlik"))


def sha256_file_remembered(path: str | os.PathLike[str]) -> str:
    """sha256 of a (large) file, remembered in the cache under its device, inode, size and mtime,
    so that naming a multi-GB checkpoint again does not read it again: any write to the file
    changes that key. For identifying inputs; manifest verification always re-reads."""
    st = os.stat(path)
    key = sha256_bytes(
        f"{os.path.realpath(path)}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}".encode()
    )
    memo = cache_root() / "sha256" / key[:2] / key
    try:
        digest = memo.read_text(encoding="ascii").strip()
        if len(digest) == 64:
            return digest
    except OSError:
        pass
    digest = sha256_file(path)
    try:  # best effort: a read-only cache only costs the re-read next time
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{key}.{os.getpid()}.tmp")
        tmp.write_text(digest, encoding="ascii")
        os.replace(tmp, memo)
    except OSError:
        pass
    return digest


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_writable(parent: Path) -> None:
    """Fail early, with one line, when `parent` cannot hold new files."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".orlik-probe-"):
            pass
    except OSError as e:
        raise OutputError(f"cannot write to {parent}: {e.strerror or e}") from None


def _os_error(e: OSError, where: Path) -> OutputError:
    if e.errno == errno.ENOSPC:
        return OutputError(f"disk full while writing {where}; nothing was kept")
    return OutputError(f"cannot write {where}: {e.strerror or e}")


@contextlib.contextmanager
def atomic_dir(final: Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield `<final>.partial`; rename it to `final` only if the block succeeds.

    A failure or interruption removes the partial directory, so `final` is either the
    complete previous result or the complete new one.
    """
    final = Path(final)
    check_writable(final.parent)
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        yield partial
        if final.exists():
            if not replace:
                raise OutputError(f"{final} already exists")
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            partial.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            partial.rename(final)
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise _os_error(e, final) from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file through a temporary sibling and rename, so readers never see half of it."""
    path = Path(path)
    check_writable(path.parent)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _os_error(e, path) from None


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())

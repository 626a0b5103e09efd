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

from orlik import owner
from orlik.errors import OrlikError, OutputError

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


def _disk_full(e: BaseException) -> bool:
    """ENOSPC however a library reports it (safetensors raises SafetensorError, not OSError)."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno == errno.ENOSPC:
            return True
        text = str(cur)
        if "No space left on device" in text or "os error 28" in text or "StorageFull" in text:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _unusable(final: Path) -> str | None:
    name = final.name
    if name in ("", ".", "..") or final.resolve() == Path(final.resolve().anchor):
        return f"{final} cannot be an output directory (it names {final.resolve()}); give a new directory"
    return None


@contextlib.contextmanager
def atomic_dir(
    final: Path,
    *,
    replace: bool = True,
    force: bool = False,
    marks: tuple[str, ...] = (),
    kind: str = "output",
) -> Iterator[Path]:
    """Yield `<final>.partial`; rename it to `final` only if the block succeeds.

    A failure or interruption removes the partial directory, so `final` is either the complete
    previous result or the complete new one. Both carry orlik's mark (`owner.MARKER`, naming the
    writing process while it works), and an existing `final` is replaced only if it is orlik's
    (`marks` name the caller's own files that prove it too) or `force` is given. A kill -9 leaves
    at most a marked `<final>.partial` or `<final>.old`, which the next run removes.
    """
    final = Path(final)
    bad = _unusable(final)
    if bad:
        raise OutputError(bad)
    check_writable(final.parent)
    if os.path.lexists(final) and not replace:
        raise OutputError(f"{final} already exists")
    owner.check_replaceable(final, force=force, marks=marks, kind=kind)
    owner.clear_leftovers(final, force=force)
    partial, old = owner.leftovers(final)
    try:
        partial.mkdir()
        owner.write_marker(partial, kind, "partial")
        yield partial
        owner.write_marker(partial, kind, "complete")
        if os.path.lexists(final):
            if not replace:
                raise OutputError(f"{final} already exists")
            owner.check_replaceable(
                final, force=force, marks=marks, kind=kind
            )  # it may have appeared meanwhile
            _swap(final, partial, old, kind)
        else:
            partial.rename(final)
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise _os_error(e, final) from None
    except OrlikError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    except Exception as e:
        shutil.rmtree(partial, ignore_errors=True)
        if _disk_full(e):
            raise OutputError(f"disk full while writing {final}; nothing was kept") from None
        raise
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _swap(final: Path, partial: Path, old: Path, kind: str) -> None:
    """Put `partial` in the place of `final`. A link or file is unlinked, never followed; a directory
    is first marked as orlik's old copy, so a kill between the two renames leaves a removable `.old`."""
    if final.is_symlink() or not final.is_dir():
        final.unlink()
        partial.rename(final)
        return
    owner.write_marker(final, kind, "old")
    final.rename(old)
    partial.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file through a temporary sibling and rename, so readers never see half of it."""
    path = Path(path)
    check_writable(path.parent)
    owner.clean_stale_files(path, "tmp")
    tmp = owner.partial_name(path, "tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _os_error(e, path) from None


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())

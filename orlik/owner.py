"""What orlik made and who is still writing it: the `.orlik` mark in each directory orlik creates,
the writer's process recorded in it, and the refusal to replace or delete anything else.

A directory is orlik's when it holds `.orlik` (every directory `atomic_dir` writes) or one of the
caller's own marks (variant.json for a variant, training.json for a pretrained checkpoint), which
also covers outputs of orlik versions older than the mark. Leftovers of a killed run
(`X.partial`, `X.old`, `.X.partial-<pid>` files, `.X.work-<pid>` scratch directories) are removed only when they are marked as orlik's
and the process that wrote them is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from orlik.errors import OutputError

MARKER = ".orlik"
FORCE_HINT = "move it away, or pass --force to replace it"
ANY_KIND = "output"  # the kind atomic_dir wrote before each verb named its own


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux), so that a recycled PID is not taken for the writer."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else None


def host_tag() -> str:
    """Eight hex digits naming this machine, for file names (a cache may be shared over NFS)."""
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def me() -> dict[str, Any]:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "started": _start_time(pid)}


def pid_alive(pid: int, started: str | None = None) -> bool:
    """Whether `pid` runs on this machine (and, if `started` is known, is the same process)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    if started is not None:
        now = _start_time(pid)
        return now is None or now == started
    return True


def write_marker(directory: Path, kind: str, state: str) -> None:
    """Mark `directory` as orlik's: `state` is partial (being written), complete, or old (being replaced)."""
    from orlik import __version__

    data = {"made_by": "orlik", "version": __version__, "kind": kind, "state": state, **me()}
    (Path(directory) / MARKER).write_text(json.dumps(data) + "\n", encoding="utf-8")


def read_marker(directory: Path) -> dict[str, Any] | None:
    """The mark of a real directory (never through a symlink), or None if it has none."""
    d = Path(directory)
    if d.is_symlink() or not d.is_dir():
        return None
    try:
        data = json.loads((d / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("made_by") == "orlik" else None


def writer_alive(mark: dict[str, Any]) -> bool:
    """Whether the process named in a mark may still be writing (unknown hosts count as alive)."""
    pid = mark.get("pid")
    if not isinstance(pid, int):
        return False
    if mark.get("host") != socket.gethostname():
        return True
    if pid == os.getpid() and mark.get("started") == _start_time(pid):
        return False  # this very process: whatever it left is no longer being written
    return pid_alive(pid, mark.get("started") if isinstance(mark.get("started"), str) else None)


def is_orlik_dir(directory: Path, marks: Iterable[str] = ()) -> bool:
    d = Path(directory)
    if d.is_symlink() or not d.is_dir():
        return False
    return read_marker(d) is not None or any((d / m).is_file() for m in marks)


def _is_empty_dir(d: Path) -> bool:
    return not d.is_symlink() and d.is_dir() and not any(d.iterdir())


def check_replaceable(
    final: Path, *, force: bool = False, marks: Iterable[str] = (), kind: str | None = None
) -> None:
    """Refuse, with one line, to replace `final` unless orlik made it (or it is absent or empty) and,
    when `kind` is given, made it as that kind: a verb replaces its own outputs, not another verb's
    (a calibration set written over a variant, say). A mark without a kind, or with the old default
    "output", counts as any kind.

    With `force` anything may be replaced, but a symlink only as a link: its target is never
    entered, so nothing outside the output root is touched.
    """
    final = Path(final)
    if not os.path.lexists(final) or force or _is_empty_dir(final):
        return
    shown = str(final) if final.is_absolute() else f"{final} (= {final.resolve()})"
    if is_orlik_dir(final, marks):
        made = (read_marker(final) or {}).get("kind")
        if kind in (None, ANY_KIND) or made in (None, kind, ANY_KIND):
            return
        raise OutputError(f"{shown} is orlik's {made} output, not a {kind}; {FORCE_HINT}")
    if final.is_symlink():
        raise OutputError(f"{shown} is a symlink that orlik did not make; {FORCE_HINT} (the link only)")
    what = "a directory" if final.is_dir() else "a file"
    raise OutputError(f"{shown} is {what} that orlik did not make (no {MARKER} mark); {FORCE_HINT}")


def remove_replaced(path: Path) -> None:
    """Delete something orlik is replacing: a symlink or a file is unlinked, never followed."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def leftovers(final: Path) -> list[Path]:
    final = Path(final)
    return [final.with_name(final.name + suffix) for suffix in (".partial", ".old")]


def clear_leftovers(final: Path, *, force: bool = False, claim: bool = True) -> None:
    """Remove `final.partial` / `final.old` left by a killed orlik (marked, writer gone).

    With `claim` (orlik is about to write `final`, so it needs those names) anything else in the way
    is refused with one line: what orlik did not make (unless `force`; an empty directory is taken
    as it loses nothing) and what a live orlik process is writing (even with `force`: two writers
    would collide). Without `claim` those are left alone silently."""
    for p in leftovers(final):
        if not os.path.lexists(p):
            continue
        mark = read_marker(p)
        if mark is not None and mark.get("state") != "complete" and writer_alive(mark):
            if not claim:
                continue
            raise OutputError(
                f"{final} is being written by orlik process {mark.get('pid')} on {mark.get('host')}; "
                f"wait for it to finish or stop it (its work is in {p})"
            )
        if mark is None and not (claim and (force or _is_empty_dir(p))):
            if not claim:
                continue
            raise OutputError(f"{p} is in the way and orlik did not make it (no {MARKER} mark); {FORCE_HINT}")
        remove_replaced(p)


def partial_name(final: Path, tag: str = "partial") -> Path:
    """`.NAME.<tag>-<pid>.<host>` beside `final`: a temporary file that names its writer."""
    final = Path(final)
    return final.with_name(f".{final.name}.{tag}-{os.getpid()}.{host_tag()}")


@contextlib.contextmanager
def work_dir(final: Path, tag: str = "work") -> Iterator[Path]:
    """A scratch directory `.NAME.<tag>-<pid>.<host>` beside `final`, marked as orlik's and removed
    afterwards. Unlike one under /tmp, what a kill -9 leaves of it is found and removed by the next
    `clean_stale_files(final, tag)` (its mark and its PID say whose it is)."""
    d = partial_name(final, tag)
    d.mkdir()
    try:
        write_marker(d, "scratch", "partial")
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def clean_stale_files(final: Path, tag: str = "partial") -> list[Path]:
    """Delete `.NAME.<tag>-<pid>[.<host>]...` entries beside `final` whose writer on this machine is gone.

    The pattern is orlik's own mark for temporary files; files of live writers, of other machines
    and anything not matching it exactly are left alone. A directory under such a name is removed
    only when it also carries orlik's mark (a `work_dir`), never through a symlink."""
    final = Path(final)
    pat = re.compile(rf"^\.{re.escape(final.name)}\.{re.escape(tag)}-(\d+)(?:\.([0-9a-f]{{8}}))?(?:\..*)?$")
    removed = []
    try:
        entries = list(final.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = pat.match(p.name)
        if not m or (m.group(2) and m.group(2) != host_tag()):
            continue
        if pid_alive(int(m.group(1))):
            continue
        if p.is_dir() and not p.is_symlink():
            if read_marker(p) is None:
                continue  # not orlik's scratch directory: someone else's, kept
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):  # a read-only shared cache: left for its owner
                p.unlink(missing_ok=True)
        if not os.path.lexists(p):
            removed.append(p)
    return removed

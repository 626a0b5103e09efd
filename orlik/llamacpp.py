"""Where orlik's llama.cpp build lives: the converter, the tools and the shared libraries.

scripts/build-llamacpp.sh builds them once per version into the cache; every stage finds them here.
"""

from __future__ import annotations

import ctypes
import os
import platform
import signal
import subprocess
import sys
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from orlik import fsutil
from orlik.errors import MissingDependencyError

VERSION = "0.3.36"  # llama-cpp-python release whose vendored llama.cpp orlik builds
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-server")
HINT = "run `make llamacpp` (builds llama.cpp once, ~25 min on 2 cores, then cached)"


try:  # resolved in the parent: nothing is loaded between fork and exec
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):
    _PRCTL = None
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """preexec_fn for tools that write orlik's outputs: on Linux the kernel sends them SIGTERM when
    the thread that started them dies, so a kill -9 of orlik leaves no orphan writing a partial file
    (the next run removes that file, see orlik.owner)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def build_root() -> Path:
    """The build directory; ORLIK_LLAMACPP overrides it with a llama.cpp tree of the user's."""
    override = os.environ.get("ORLIK_LLAMACPP")
    if override:
        return Path(override)
    return fsutil.cache_root() / "llama.cpp" / f"{VERSION}-{platform.machine()}"


def source_dir() -> Path:
    root = build_root()
    vendored = root / "src" / "vendor" / "llama.cpp"
    return vendored if vendored.is_dir() else root


def bin_dir() -> Path:
    root = build_root()
    for cand in (root / "build" / "bin", root / "bin"):
        if cand.is_dir():
            return cand
    return root / "build" / "bin"


def tool(name: str) -> Path:
    """Path of a llama.cpp executable, or a MissingDependencyError that says how to get it."""
    path = bin_dir() / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise MissingDependencyError(f"{name} not found in {bin_dir()}; {HINT}")
    return path


def converter() -> Path:
    path = source_dir() / "convert_hf_to_gguf.py"
    if not path.is_file():
        raise MissingDependencyError(f"convert_hf_to_gguf.py not found in {source_dir()}; {HINT}")
    return path


@lru_cache(maxsize=1)
def build_info() -> str:
    """llama.cpp's own version string, e.g. 'version: 1 (abc123)', for manifests."""
    # llama-quantize answers --version with its usage text only, so ask the other tools.
    first = ""
    for name in ("llama-imatrix", "llama-perplexity", "llama-server"):
        try:
            out = subprocess.run([str(tool(name)), "--version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired, MissingDependencyError):
            continue
        text = (out.stdout + out.stderr).strip().splitlines()
        first = next((line for line in text if line.startswith("version")), "")
        if first:
            break
    if not first:
        return f"llama-cpp-python {VERSION}"
    return f"llama-cpp-python {VERSION}; llama.cpp {first.removeprefix('version: ')}".strip()


def run_tool(name: str, args: list[str], on_output: Callable[[str], None] | None = None) -> tuple[int, str]:
    """Run a llama.cpp tool; stream its merged stdout/stderr to `on_output` (for progress bars).

    Returns the exit code and the whole log, so callers can turn known failures into one line.
    """
    cmd = [str(tool(name)), *args]
    log: list[str] = []
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
    ) as proc:
        assert proc.stdout is not None
        try:
            while data := proc.stdout.read1(65536):
                piece = data.decode("utf-8", "replace")
                log.append(piece)
                if on_output is not None:
                    on_output(piece)
        except BaseException:
            proc.kill()  # an interrupt must not leave the tool writing behind our back
            raise
        rc = proc.wait()
    return rc, "".join(log)

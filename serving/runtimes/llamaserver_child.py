"""The llama-server child process: start, health, stop, and the stall watch that kills a hung one.

The child dies with orlik (SIGTERM from the kernel if orlik is killed). A child that exits on its
own, or is killed for hanging, leaves the last lines of its log in orlik's log before the log is
deleted, so a crash is never silent.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from orlik import owner
from orlik.errors import ToolError
from orlik.serving.faults import BackendDied

log = logging.getLogger("orlik.serving")

# Seconds without any sign of life (a streamed byte, an answered /health) before the child is asked
# whether it is still there; `orlik serve --stall-timeout` sets it.
STALL_TIMEOUT = 30.0
_PR_SET_PDEATHSIG = 1
_live: set[LlamaServer] = set()
_live_lock = threading.Lock()


def new_log() -> tuple[int, Path]:
    """A fresh log file for a child: `.orlik-llama-server.log.child-<orlik pid>.<host>.XXXX.log` in
    the temp dir. The name marks it as this orlik process's, so logs that a kill -9 of an earlier
    orlik left behind (their PID gone) are removed here; other files are never touched."""
    base = Path(tempfile.gettempdir()) / "orlik-llama-server.log"
    owner.clean_stale_files(base, "child")
    fd, name = tempfile.mkstemp(
        prefix=owner.partial_name(base, "child").name + ".", suffix=".log", dir=base.parent
    )
    return fd, Path(name)


def _pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    # Linux: the kernel sends SIGTERM to the child when the thread that started it dies, so a
    # SIGKILLed orlik leaves no orphan. Servers are started from long-lived threads only.
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


try:  # resolved in the parent: nothing is loaded between fork and exec
    _PRCTL: Any = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):
    _PRCTL = None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class LlamaServer:
    """One llama-server process: start, health-check, stop."""

    def __init__(self, gguf: Path, *, parallel: int, threads: int | None, ctx_per_slot: int | None,
                 alias: str = "orlik") -> None:  # fmt: skip
        self.gguf, self.parallel, self.threads = Path(gguf), int(parallel), threads
        self.ctx_per_slot, self.alias = ctx_per_slot, alias
        self.key = secrets.token_urlsafe(24)  # nobody else on the machine can use the child
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log_path: Path | None = None
        self.stalled: str | None = None  # why the stall watch killed it
        self.returncode: int | None = None  # the exit status of the last child, once stopped

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        from orlik import llamacpp

        cmd = [str(llamacpp.tool("llama-server")), "-m", str(self.gguf), "--host", "127.0.0.1",
               "--port", str(self.port), "-np", str(self.parallel), "--no-webui", "-a", self.alias,
               "--no-kv-unified"]  # fmt: skip
        if self.ctx_per_slot:
            # llama-server splits -c across slots; each request gets ctx_per_slot.
            cmd += ["-c", str(self.ctx_per_slot * self.parallel)]
        if self.threads:
            cmd += ["-t", str(self.threads), "-tb", str(self.threads)]
        return cmd

    def start(self, timeout: float = 180.0) -> None:
        import httpx

        for attempt in range(3):  # a free port can be taken between probing and binding
            self.port = free_port()
            fd, self.log_path = new_log()
            env = {**os.environ, "LLAMA_API_KEY": self.key}
            with os.fdopen(fd, "wb") as logf:
                self.proc = subprocess.Popen(
                    self.command(), stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                    env=env, start_new_session=True, preexec_fn=_pdeathsig,
                )  # fmt: skip
            with _live_lock:
                _live.add(self)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    r = httpx.get(f"{self.url}/health", timeout=2.0)
                    if r.status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            tail, code = self.log_tail(), self.proc.poll()
            self.stop(report=False)
            if "bind" in tail.lower() and attempt < 2:
                continue
            if code is not None and code < 0:  # killed from outside (OOM killer, kill -9) while loading
                raise BackendDied(f"llama-server for {self.gguf.name} {_exit_text(code)} while starting; "
                                  "retry shortly")  # fmt: skip
            raise ToolError(f"llama-server did not become healthy for {self.gguf.name}: {tail}")

    def log_tail(self, lines: int = 3, sep: str = " | ") -> str:
        if self.log_path is None or not self.log_path.is_file():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return sep.join(text[-lines:]) or "(empty log)"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_code(self, wait: float = 0.0) -> int | None:
        """The child's exit status once it has ended (waiting up to `wait` s), else None."""
        proc = self.proc
        if proc is None:  # stopped meanwhile (a restart replaced it): its status was kept
            return self.returncode
        try:
            return proc.wait(timeout=wait) if wait > 0 else proc.poll()
        except subprocess.TimeoutExpired:
            return None

    def kill(self, why: str) -> None:
        """SIGKILL a hung child (SIGTERM would stay pending in a stopped one); stop() reports it."""
        self.stalled = why
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    def stop(self, report: bool = True) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is not None:
            self.returncode = proc.returncode  # before proc goes: a request failing now reads it
        self.proc = None
        if proc is not None and proc.poll() is not None and report:
            # It ended without being asked to: say why, with its own last words, before they go.
            why = self.stalled or "not stopped by orlik"
            log.error("llama-server for %s %s (%s); last lines of its log:\n%s", self.gguf.name,
                      _exit_text(int(proc.returncode)), why, self.log_tail(20, "\n"))  # fmt: skip
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if proc is not None:
            self.returncode = proc.returncode
        with _live_lock:
            _live.discard(self)
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None


@atexit.register
def _stop_all() -> None:
    with _live_lock:
        servers = list(_live)
    for s in servers:
        s.stop(report=False)


class StallWatch:
    """Kills a child that shows no sign of life for `timeout` s and then does not answer /health.

    Signs of life are any byte on any of its streams and an answered /health. A long prompt on a
    slow machine sends no bytes for a while, but llama-server's HTTP thread still answers /health,
    so only a child that is stopped, swapped to death or wedged as a whole is taken for hung.
    """

    def __init__(self, server: LlamaServer, timeout: float = STALL_TIMEOUT) -> None:
        self.server, self.timeout = server, float(timeout)
        self.probe_timeout = min(3.0, max(0.5, self.timeout / 2))
        self.last = time.monotonic()  # streams refresh it with every line they read
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="orlik-stall-watch", daemon=True)

    def start(self) -> StallWatch:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()

    def _answers(self) -> bool:
        import httpx

        try:
            return httpx.get(f"{self.server.url}/health", timeout=self.probe_timeout).status_code == 200
        except httpx.HTTPError:
            return False

    def _run(self) -> None:
        tick = min(1.0, self.timeout / 4)
        while not self._stop.wait(tick):
            if not self.server.alive():
                return
            if time.monotonic() - self.last < self.timeout:
                continue
            if self._answers() or self._stop.is_set():
                self.last = time.monotonic()
                continue
            self.server.kill(f"no sign of life for {self.timeout:g} s and no answer to /health "
                             f"within {self.probe_timeout:g} s")  # fmt: skip
            return

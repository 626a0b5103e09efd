"""Start `orlik serve` (or a bare llama-server) as a child process for the serving benchmarks."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before becoming healthy")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise SystemExit(f"{url} did not become healthy in {timeout:.0f} s")


@contextlib.contextmanager
def orlik_serve(models: list[str], *args: str, log: Path | None = None) -> Iterator[str]:
    """`orlik serve MODELS ARGS --preload` on a free port; yields the base URL."""
    with orlik_serve_pid(models, *args, log=log) as (url, _):
        yield url


@contextlib.contextmanager
def orlik_serve_pid(
    models: list[str], *args: str, log: Path | None = None, checkout: Path | None = None
) -> Iterator[tuple[str, int]]:
    """As orlik_serve, yielding (base URL, the server's process id) for CPU accounting and chaos.

    `checkout`: serve with the `orlik` package found there (another version; the server runs there
    and has it on PYTHONPATH, since `python -m` puts the working directory first on sys.path)."""
    port = free_port()
    cmd = [sys.executable, "-m", "orlik", "serve", *models, "--port", str(port), "--preload", *args]
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    env = {**os.environ, "ORLIK_QUIET": "1"}
    if checkout is not None:
        env["PYTHONPATH"] = str(checkout)
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=checkout)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url, proc.pid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if out is not subprocess.DEVNULL:
            out.close()  # type: ignore[union-attr]

"""Serving under faults, with the real llama-server child: killed or stopped mid-stream, a cold start
under load, clients that leave while queued, and two models under one memory budget."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from serving_helpers import OrlikServer

STALL = 2.0  # --stall-timeout of the fault server: a hang is caught within STALL + probe + tick


def _child(srv: OrlikServer) -> psutil.Process:
    kids = [p for p in psutil.Process(srv.proc.pid).children(recursive=True) if "llama-server" in p.name()]
    assert len(kids) == 1, kids
    return kids[0]


def _body(n: int = 200, stream: bool = True, model: str = "m") -> dict[str, Any]:
    return {"model": model, "prompt": "Dawno, dawno temu", "max_tokens": n, "ignore_eos": True,
            "temperature": 0.8, "seed": 3, "stream": stream}  # fmt: skip


def _health(srv: OrlikServer) -> httpx.Response:
    return httpx.get(f"{srv.url}/health", timeout=10)


def _wait_healthy(srv: OrlikServer, timeout: float = 60.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        r = _health(srv)
        if r.status_code == 200 and r.json()["models"]["m"] == "loaded":
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"not healthy after {timeout} s: {_health(srv).text}")


def _stream_then(srv: OrlikServer, fault: Any) -> tuple[list[dict[str, Any]], float]:
    """Stream a long completion, call `fault()` after the first text chunk; the events after it
    and the seconds from the fault to the end of the stream."""
    after: list[dict[str, Any]] = []
    t_fault = 0.0
    with httpx.Client(timeout=60) as c, c.stream("POST", f"{srv.url}/v1/completions", json=_body(200)) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if not t_fault:
                fault()
                t_fault = time.monotonic()
            else:
                after.append(json.loads(line[6:]))
    return after, time.monotonic() - t_fault


@pytest.fixture
def fault_server(serving_gguf: Path, tmp_path: Path) -> Iterator[OrlikServer]:
    srv = OrlikServer([f"m={serving_gguf}"], "--parallel", "1", "--queue-size", "2", "--preload", "--threads", "1",
                      "--stream-interval", "0", "--stall-timeout", str(STALL), log=tmp_path / "serve.log")  # fmt: skip
    try:
        yield srv.wait()
    finally:
        srv.stop()


def test_child_killed_mid_stream_is_a_clean_error_then_recovers(fault_server: OrlikServer) -> None:
    srv = fault_server
    child = _child(srv)

    def kill() -> None:
        child.suspend()  # freeze it first, so the kill surely lands mid-generation
        child.kill()

    after, _ = _stream_then(srv, kill)
    errors = [e["error"] for e in after if "error" in e]
    assert errors and errors[0]["code"] == "backend_died", after[-3:]
    assert "restarting" in errors[0]["message"]
    _wait_healthy(srv)
    assert _child(srv).pid != child.pid  # a fresh child
    r = httpx.post(f"{srv.url}/v1/completions", json=_body(8, stream=False), timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    assert _health(srv).json()["running"] == 0
    log = srv.log.read_text(errors="replace") if srv.log else ""
    assert "was killed by SIGKILL" in log and "last lines of its log" in log


def test_stopped_child_is_caught_within_the_stall_timeout(fault_server: OrlikServer) -> None:
    srv = fault_server
    child = _child(srv)
    after, took = _stream_then(srv, child.suspend)
    errors = [e["error"] for e in after if "error" in e]
    assert errors and errors[0]["code"] == "backend_stalled", after[-3:]
    # STALL of silence, then a /health probe of at most 1 s, checked every STALL/4 s.
    assert STALL <= took < STALL + 1.0 + STALL / 4 + 2.0, took
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    states = {_health(srv).json()["models"]["m"]}
    _wait_healthy(srv)
    assert states <= {"restarting", "loaded"}
    r = httpx.post(f"{srv.url}/v1/completions", json=_body(8, stream=False), timeout=60)
    assert r.status_code == 200, r.text
    assert _health(srv).json()["running"] == 0  # the hung request's slot was freed


def test_stopped_child_before_a_request_gives_504_with_retry_after(fault_server: OrlikServer) -> None:
    srv = fault_server
    child = _child(srv)
    # The child is idle when it stops; the watch probes it after STALL s of silence. A request sent
    # at once waits on it, and is answered 504 when the watch kills it.
    child.suspend()
    t0 = time.monotonic()
    r = httpx.post(f"{srv.url}/v1/completions", json=_body(8, stream=False), timeout=60)
    assert r.status_code == 504 and r.json()["error"]["code"] == "backend_stalled", r.text
    assert int(r.headers["Retry-After"]) >= 1
    assert time.monotonic() - t0 < STALL + 1.0 + STALL / 4 + 2.0
    _wait_healthy(srv)
    assert httpx.post(f"{srv.url}/v1/completions", json=_body(8, stream=False), timeout=60).status_code == 200


def test_client_leaving_the_queue_frees_its_place_and_sigcont_recovers(serving_gguf: Path) -> None:
    # A long stall timeout: the stopped child holds the one slot until SIGCONT.
    srv = OrlikServer([f"m={serving_gguf}"], "--parallel", "1", "--queue-size", "1", "--preload",
                      "--threads", "1", "--stall-timeout", "120", "--stream-interval", "0").wait()  # fmt: skip
    try:
        child = _child(srv)
        results: dict[str, int] = {}
        # Prompts as token ids: a request reaches the queue without asking the stopped child to tokenize.
        ids = {**_body(4, stream=False), "prompt": [1, 5, 6, 7]}

        def post(name: str, timeout: float = 60) -> None:
            try:
                r = httpx.post(f"{srv.url}/v1/completions", json=ids, timeout=timeout)
                results[name] = r.status_code
            except httpx.TimeoutException:
                results[name] = -1

        holder = threading.Thread(target=_stream_then, args=(srv, child.suspend))  # stops it mid-stream
        holder.start()
        _until(lambda: child.status() == psutil.STATUS_STOPPED)
        assert _health(srv).json()["running"] == 1
        leaver = threading.Thread(target=post, args=("leaver", 1.0))  # gives up after 1 s in the queue
        leaver.start()
        _until(lambda: _health(srv).json()["queued"] == 1)
        leaver.join()
        assert results["leaver"] == -1
        _until(lambda: _health(srv).json()["queued"] == 0, 2.0)  # its place is free again...
        waiter = threading.Thread(target=post, args=("waiter",))
        waiter.start()  # ...so this one queues instead of getting 429
        _until(lambda: _health(srv).json()["queued"] == 1)
        child.resume()
        holder.join()
        waiter.join()
        assert results["waiter"] == 200, results
        assert _health(srv).json()["running"] == 0
    finally:
        srv.stop()


def _until(cond: Any, timeout: float = 20.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "condition not reached"
        time.sleep(0.05)


def test_cold_start_under_16_concurrent_requests_is_200_or_429(serving_gguf: Path) -> None:
    # Not preloaded: all 16 arrive while the child starts. 4 slots + 8 queue places are admitted,
    # and the other 4 are turned away at once instead of waiting for the load first.
    srv = OrlikServer([f"m={serving_gguf}"], "--parallel", "4", "--queue-size", "8", "--threads", "1").wait()
    try:
        out: list[tuple[int, float]] = []
        barrier = threading.Barrier(16)

        def go() -> None:
            barrier.wait()
            t0 = time.monotonic()
            r = httpx.post(f"{srv.url}/v1/completions", json=_body(16, stream=False), timeout=120)
            out.append((r.status_code, time.monotonic() - t0))

        threads = [threading.Thread(target=go) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(c for c, _ in out)
        assert codes == [200] * 12 + [429] * 4, codes
        assert max(s for c, s in out if c == 429) < min(s for c, s in out if c == 200)
        assert _health(srv).json()["queued"] == 0
    finally:
        srv.stop()


@pytest.mark.slow
def test_two_models_under_one_budget_never_500(serving_gguf: Path, tiny_checkpoint: Path) -> None:
    # The budget holds one model at a time: requests for the other wait (503 while it is in use),
    # and a model is never unloaded under a request that already chose it.
    from orlik.serving.models import ModelRegistry

    est = ModelRegistry([f"a={serving_gguf}", f"b={tiny_checkpoint}"], parallel=2).models
    budget = int(max(m.est_bytes for m in est.values()) * 1.2)
    srv = OrlikServer([f"a={serving_gguf}", f"b={tiny_checkpoint}"], "--parallel", "2", "--threads", "1",
                      "--memory-budget", str(budget), "--queue-size", "16").wait()  # fmt: skip
    try:
        codes: list[int] = []

        def go(i: int) -> None:
            model = "ab"[i % 2]
            with httpx.Client(timeout=120) as c:
                for j in range(4):
                    if (i + j) % 3 == 0:
                        r = c.post(f"{srv.url}/tokenize", json={"model": model, "prompt": "Ala ma kota"})
                    elif (i + j) % 3 == 1:
                        r = c.post(f"{srv.url}/detokenize", json={"model": model, "tokens": [5, 6, 7]})
                    else:
                        r = c.post(f"{srv.url}/v1/completions", json=_body(8, stream=False, model=model))
                    codes.append(r.status_code)

        threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert set(codes) <= {200, 503}, codes
        assert codes.count(200) >= len(codes) // 4
        h = _health(srv).json()
        assert list(h["models"].values()).count("loaded") <= 1 and h["running"] == 0
    finally:
        srv.stop()


def test_scheduler_counts_load_waiters_and_frees_a_left_queue_place() -> None:
    import asyncio

    from orlik.serving.engine import QueueFull, Scheduler
    from orlik.serving.faults import ClientGone

    async def scenario() -> None:
        s = Scheduler(queue_size=1, timeout=30, workers=1)
        with s.waiting_for_load("m", slots=1), s.waiting_for_load("m", slots=1):
            assert s.waiting == 1  # the second waits for a queue place, not a slot
            with pytest.raises(QueueFull), s.waiting_for_load("m", slots=1):
                pass
        assert s.waiting == 0
        sem = asyncio.Semaphore(1)
        await sem.acquire()
        left = asyncio.Event()

        async def gone() -> bool:
            return left.is_set()

        task = asyncio.ensure_future(s.acquire(sem, time.monotonic() + 30, gone))
        await asyncio.sleep(0.05)
        assert s.waiting == 1
        left.set()
        with pytest.raises(ClientGone):
            await task
        assert s.waiting == 0 and sem.locked()  # the slot is still the holder's, and no one else's
        sem.release()
        assert not sem.locked()

    asyncio.run(scenario())


def test_stall_timeout_is_checked(orlik_cli: Any, serving_gguf: Path) -> None:
    r = orlik_cli("serve", str(serving_gguf), "--stall-timeout", "0")
    assert r.code == 2 and "--stall-timeout" in r.err


def test_log_tail_of_a_dead_child_reaches_orlik_log(serving_gguf: Path, caplog: Any) -> None:
    from orlik.serving.runtimes.base import open_source
    from orlik.serving.runtimes.llamaserver import LlamaServer, gguf_file

    server = LlamaServer(gguf_file(open_source(serving_gguf)), parallel=1, threads=1, ctx_per_slot=64)
    server.start()
    try:
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(timeout=10)
        with caplog.at_level("ERROR", logger="orlik.serving"):
            server.stop()
        assert "was killed by SIGKILL" in caplog.text and "llama" in caplog.text.lower()
    finally:
        server.stop(report=False)


def test_a_request_on_a_child_already_replaced_by_the_restart_is_503(
    serving_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race the chaos benchmark found: the child dies, the restart stops its LlamaServer (and
    starts a new one) before a request on the old runtime sees the failure. That request saw
    'Connection refused' or a cut stream with no process left to ask, and answered 500; the exit
    status is now kept, so it is a 503 backend_died like any request on a dead child."""
    from orlik.serving.faults import BackendDied
    from orlik.serving.runtimes.base import Sampling, open_source
    from orlik.serving.runtimes.llamaserver import LlamaServerRuntime

    rt = LlamaServerRuntime.load(open_source(serving_gguf), parallel=1, threads=1, n_ctx=64)
    try:
        assert rt.server.proc is not None
        os.kill(rt.server.proc.pid, signal.SIGKILL)
        rt.server.proc.wait(timeout=10)
        # What the registry's restart does to the dead runtime. While stop() still reports the
        # death (reading the child's log), a failing request must already see the exit status.
        seen, tail = [], rt.server.log_tail
        monkeypatch.setattr(rt.server, "log_tail", lambda *a: seen.append(rt.server.exit_code()) or tail(*a))
        rt.server.stop()
        assert seen == [-signal.SIGKILL]
        with pytest.raises(BackendDied, match=r"ended mid-request \(exit status -9\)"):
            list(rt.generate([1, 2, 3], Sampling(max_tokens=4)))
        with pytest.raises(BackendDied):
            rt.tokenize("hej")
    finally:
        rt.close()


@pytest.mark.parametrize(("script", "error"), [("kill -9 $$", "BackendDied"), ("exit 3", "ToolError")])
def test_a_child_killed_while_starting_is_503_but_one_that_fails_is_500(
    script: str, error: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child killed from outside while it loads (OOM killer, kill -9: the chaos benchmark's killer
    hits restarts too) is worth a retry (503); one that exits by itself has a real problem (500)."""
    from orlik.errors import ToolError
    from orlik.serving.faults import BackendDied
    from orlik.serving.runtimes.llamaserver_child import LlamaServer

    monkeypatch.setattr(LlamaServer, "command", lambda self: ["sh", "-c", script])
    server = LlamaServer(tmp_path / "model.gguf", parallel=1, threads=1, ctx_per_slot=64)
    with pytest.raises(ToolError) as got:
        server.start(timeout=30)
    assert type(got.value) is {"BackendDied": BackendDied, "ToolError": ToolError}[error], got.value
    assert server.proc is None and not server.alive()


def test_child_logs_left_by_a_killed_orlik_are_removed_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child's log names the orlik process that owns it; a kill -9 of orlik leaves the log in the
    temp dir, and the next child's log removes it (only logs of dead PIDs, on this host)."""
    import subprocess
    import tempfile

    from orlik import owner
    from orlik.serving.runtimes.llamaserver_child import new_log

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen(["true"])
    gone.wait()
    host = owner.host_tag()
    stale = tmp_path / f".orlik-llama-server.log.child-{gone.pid}.{host}.k3x9.log"
    kept = [tmp_path / f".orlik-llama-server.log.child-{os.getppid()}.{host}.a1b2.log",  # a live orlik's
            tmp_path / f".orlik-llama-server.log.child-{gone.pid}.0badc0de.c3d4.log",  # another host's
            tmp_path / "orlik-llama-server-abc.log"]  # fmt: skip
    for p in [stale, *kept]:
        p.write_text("llama-server log\n")
    fd, path = new_log()
    os.close(fd)
    assert path.parent == tmp_path and path.name.startswith(f".orlik-llama-server.log.child-{os.getpid()}.")
    assert not stale.exists() and all(p.exists() for p in kept)

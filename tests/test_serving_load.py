"""Concurrency limits: a full queue is 429 with Retry-After, a disconnect frees its slot, and the
llama-server child dies with orlik."""

from __future__ import annotations

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

MODEL = "tiny-fp16"
# A JSON string of at least 300 characters: the model cannot end early, so a request surely
# outlives the few milliseconds the other requests take to arrive.
LONG = {
    "type": "json_schema",
    "json_schema": {"name": "long", "schema": {"type": "string", "minLength": 300}},
}


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrlikServer]:
    # One slot and a queue of one: easy to fill, and a leaked slot blocks the next request.
    # One torch thread: on a busy small machine more threads spin against each other.
    log = tmp_path_factory.mktemp("serve-load") / "serve.log"
    srv = OrlikServer([f"{MODEL}={tiny_checkpoint}"], "--parallel", "1", "--queue-size", "1", "--preload",
                      "--threads", "1", log=log)  # fmt: skip
    try:
        yield srv.wait()
    finally:
        srv.stop()


def _long_body(stream: bool = False) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Napisz długi tekst."}], "max_tokens": 400,
            "temperature": 1.0, "seed": 1, "response_format": LONG, "stream": stream}  # fmt: skip


def _running(srv: OrlikServer) -> int:
    return int(httpx.get(f"{srv.url}/health").json()["running"])


def test_full_queue_gets_429_with_retry_after(server: OrlikServer) -> None:
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def go() -> None:
        r = httpx.post(f"{server.url}/v1/chat/completions", json=_long_body(), timeout=300)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=go) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in results)
    # One runs, one waits in the queue of 1, the other three are turned away at once.
    assert codes == [200, 200, 429, 429, 429], [r.text[:200] for r in results]
    for r in results:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"
    assert _running(server) == 0


def test_client_disconnect_mid_stream_frees_the_slot(server: OrlikServer) -> None:
    with (
        httpx.Client(timeout=120) as c,
        c.stream("POST", f"{server.url}/v1/chat/completions", json=_long_body(True)) as r,
    ):
        assert r.status_code == 200
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data: ")
            if got >= 5:
                assert _running(server) == 1  # still generating: the JSON string is far from done
                break  # leaving the iterator closes the connection
        r.close()
    t0 = time.monotonic()
    while _running(server) and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    freed_after = time.monotonic() - t0
    assert _running(server) == 0, "the slot was not freed after the client left"
    # The slot is really free: a short request is served at once instead of queueing behind the rest.
    t1 = time.monotonic()
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=120,
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hej"}], "max_tokens": 3})  # fmt: skip
    assert r.status_code == 200, r.text
    assert freed_after < 5 and time.monotonic() - t1 < 30


def test_llama_server_child_dies_with_orlik(serving_gguf: Path) -> None:
    srv = OrlikServer([str(serving_gguf)], "--preload", "--parallel", "1")
    try:
        srv.wait()
        children = [
            p for p in psutil.Process(srv.proc.pid).children(recursive=True) if "llama-server" in p.name()
        ]
        assert len(children) == 1
        child = children[0]
        os.kill(srv.proc.pid, signal.SIGKILL)  # no chance to clean up: the kernel must end the child
        srv.proc.wait(timeout=10)
        gone, alive = psutil.wait_procs([child], timeout=10)
        assert child in gone and not alive
    finally:
        srv.stop()

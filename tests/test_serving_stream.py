"""llama-server's stream read on the event loop (serving/runtimes/llamaserver_stream.py and
serving/streamrun.py): the HTTP/SSE parser wherever TCP splits the bytes, llama-server's errors,
and, on a real child, the same events as the worker-thread path, stop strings and a dead child."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from orlik.errors import InputError, ToolError
from orlik.serving.runtimes.llamaserver import LlamaServerRuntime
from orlik.serving.runtimes.llamaserver_stream import SSEStream

HEAD = (b"HTTP/1.1 200 OK\r\nServer: llama.cpp\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(d: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(d, ensure_ascii=False).encode() + b"\n\n"


def _stream() -> SSEStream:
    rt = LlamaServerRuntime.__new__(LlamaServerRuntime)  # the parser needs only tokens_of and the watch
    rt.watch, rt._pieces = SimpleNamespace(last=0.0), {}  # type: ignore[assignment]
    return SSEStream(rt, {})


def _feed(s: SSEStream, body: bytes, rng: random.Random) -> list[tuple[int, str]]:
    """Feed `body` in random pieces (1 byte to all of it), taking tokens after each."""
    out, i = [], 0
    while i < len(body):
        n = rng.choice([1, 2, 3, 7, 64, len(body)])
        s.data_received(body[i : i + n])
        i += n
        out += [(t.id, t.text or "") for t in s.take()]
    return out


def test_parser_gives_the_same_tokens_however_tcp_splits_the_bytes() -> None:
    """Chunks holding one event, two events, half an event; multi-byte UTF-8 cut by the split."""
    evs = [
        _event({"content": c, "tokens": [i], "stop": False})
        for i, c in enumerate(["Ża", "ż", "ółć", " 🙂", "x"])
    ]
    final = _event({"content": "", "tokens": [], "stop": True, "tokens_predicted": 5})
    body = HEAD + _chunk(evs[0]) + _chunk(evs[1] + evs[2]) + _chunk(evs[3][:9]) + _chunk(evs[3][9:])
    body += _chunk(evs[4]) + _chunk(final) + b"0\r\n\r\n"
    want = [(0, "Ża"), (1, "ż"), (2, "ółć"), (3, " 🙂"), (4, "x")]
    for seed in range(40):
        s = _stream()
        assert _feed(s, body, random.Random(seed)) == want
        assert s.ended


def test_refused_request_is_the_servers_message_and_a_cut_stream_is_not_an_end() -> None:
    s = _stream()
    msg = b'{"error":{"code":400,"message":"the request exceeds the available context size"}}'
    s.data_received(b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n" % len(msg) + msg[:10])
    assert s.take() == []  # the body is not complete yet
    s.data_received(msg[10:])
    with pytest.raises(InputError, match="exceeds the available context size"):
        s.take()
    s = _stream()
    s.data_received(HEAD + _chunk(_event({"error": {"code": 500, "message": "boom"}})))
    with pytest.raises(ToolError, match=r"llama-server error 500: .*boom"):
        s.take()
    s = _stream()  # the last chunk without the final event: not a normal end
    s.data_received(HEAD + _chunk(_event({"content": "a", "tokens": [7], "stop": False})) + b"0\r\n\r\n")
    assert [t.id for t in s.take()] == [7]
    assert not s.ended and s._lost is not None


def _loop_run(rt: LlamaServerRuntime, req: Any, interval: float) -> tuple[str, Any, float]:
    """A generation through StreamRun as the server runs it: (text, last event, seconds)."""
    from orlik.serving.streamrun import StreamRun

    async def main() -> tuple[str, Any, float]:
        ended = []
        stream = rt.stream(req.prompt, req.sampling)
        assert stream is not None
        run = StreamRun(rt, req, stream, time.monotonic() + 120, 120, lambda: ended.append(1))
        await stream.start()
        t0, out, last = time.monotonic(), [], None
        while (ev := await run.next_merged(interval)) is not None:
            out.append(ev.text)
            last = ev
        assert ended == [1]  # the slot is freed exactly once
        return "".join(out), last, time.monotonic() - t0

    return asyncio.run(main())


@pytest.fixture(scope="module")
def runtime(serving_gguf: Path) -> Any:
    from orlik.serving.runtimes.base import open_source

    rt = LlamaServerRuntime.load(open_source(serving_gguf), parallel=1, threads=1, n_ctx=256)
    yield rt
    rt.close()


@pytest.mark.parametrize("interval", [0.0, 0.01])
def test_loop_reader_matches_the_worker_thread_with_stop_strings(runtime: Any, interval: float) -> None:
    """Greedy decoding: the same text and finish as engine.events(), with and without a stop string
    (cut exactly where it starts), and a logprobs request still goes to the worker thread."""
    import threading

    from orlik.serving.engine import GenRequest, events, merge
    from orlik.serving.runtimes.base import Sampling

    prompt = runtime.tokenize("Ala ma kota, a kot ma")

    def req(stop: list[str], n: int = 40) -> GenRequest:
        sampling = Sampling(max_tokens=n, temperature=0.0, seed=1, ignore_eos=True)
        return GenRequest(prompt=prompt, sampling=sampling, stop=stop)

    ref = merge(list(events(runtime, req([]), threading.Event())))
    assert (ref.finish_reason, ref.completion_tokens) == ("length", 40) and len(ref.text) >= 12, ref
    text, last, _ = _loop_run(runtime, req([]), interval)
    assert (text, last.finish_reason, last.completion_tokens) == (ref.text, "length", 40)
    stop = ref.text[len(ref.text) // 2 : len(ref.text) // 2 + 3]
    text, last, _ = _loop_run(runtime, req([stop]), interval)
    assert (text, last.finish_reason) == (ref.text[: ref.text.index(stop)], "stop")
    assert runtime.stream(prompt, Sampling(max_tokens=4, logprobs=2)) is None


def test_loop_reader_on_a_killed_child_is_backend_died(serving_gguf: Path) -> None:
    from orlik.serving.engine import GenRequest
    from orlik.serving.faults import BackendDied
    from orlik.serving.runtimes.base import Sampling, open_source

    rt = LlamaServerRuntime.load(open_source(serving_gguf), parallel=1, threads=1, n_ctx=64)
    try:
        assert rt.server.proc is not None
        os.kill(rt.server.proc.pid, signal.SIGKILL)
        rt.server.proc.wait(timeout=10)
        with pytest.raises(BackendDied, match=r"exit status -9"):
            _loop_run(rt, GenRequest(prompt=[1, 2, 3], sampling=Sampling(max_tokens=4)), 0.01)
    finally:
        rt.close()

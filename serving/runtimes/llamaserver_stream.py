"""llama-server's /completion stream read on orlik's event loop: no worker thread per request and
no hand-off per token.

A minimal HTTP/1.1 client for the one request shape orlik sends its own child (a POST answered by
a chunked event stream, or an error with a body), as an asyncio protocol: the loop's transport
buffers what arrives, and the request parses it when it is ready to send, so a fast model's tokens
are taken in bursts while a slow one's go out as they come.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any

from orlik.errors import InputError, ToolError
from orlik.serving.runtimes.base import Token, TokenStream

if TYPE_CHECKING:
    from orlik.serving.runtimes.llamaserver import LlamaServerRuntime


class SSEStream(asyncio.Protocol, TokenStream):
    def __init__(self, rt: LlamaServerRuntime, body: dict[str, Any]) -> None:
        self.rt, self.body = rt, body
        self.ended = False
        self._transport: asyncio.Transport | None = None
        self._raw = b""  # received and not yet parsed (an unfinished chunk)
        self._parts: list[bytes] = []  # received since the last take()
        self._status: int | None = None
        self._chunked = False
        self._length = -1  # Content-Length of an error body
        self._sse = b""  # event-stream bytes of an unfinished event (or an error body so far)
        self._last_chunk = False  # the chunked body's end was read
        self._waiter: asyncio.Future[None] | None = None
        self._urgent = False  # the waiter wants only the stream's end (a timed wait), not every token
        self._lost: Exception | None = None  # the connection ended (None while open)
        self._closed = False  # by close(): nothing more is wanted

    # asyncio.Protocol: called by the loop's transport.
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.rt.watch.last = time.monotonic()  # a sign of life for the stall watch
        self._parts.append(data)
        # A timed wait ends early only for the final event (its "stop" is never inside a JSON string).
        if not self._urgent or b'"stop":true' in data:
            self._wake()

    def eof_received(self) -> bool | None:
        return None  # close the transport: llama-server has said all it will

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc or EOFError("the stream ended before its final event")
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # TokenStream.
    async def start(self) -> None:
        port = self.rt.server.port
        body = json.dumps(self.body).encode()
        head = (f"POST /completion HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {self.rt.server.key}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")  # fmt: skip
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: self, "127.0.0.1", port)
        except OSError as e:
            raise await self._failure(e) from None
        assert self._transport is not None
        self._transport.write(head.encode("latin-1") + body)

    async def wait(self, timeout: float | None = None) -> None:
        """Until data arrives. With `timeout`: until then, or the stream's end if sooner (tokens
        that arrive meanwhile wait in the buffer, so a burst costs one wake-up); never raises."""
        if self._closed or self.ended:
            return
        if self._lost is not None:
            if timeout is not None:
                return
            raise await self._failure(self._lost)
        loop = asyncio.get_running_loop()
        self._waiter = w = loop.create_future()
        self._urgent = timeout is not None
        timer = loop.call_later(timeout, _done, w) if timeout is not None else None
        try:
            await w
        finally:
            self._waiter, self._urgent = None, False
            if timer is not None:
                timer.cancel()

    def close(self) -> None:
        self._closed = True
        if self._transport is not None:
            self._transport.close()  # llama-server stops generating for a closed connection
        self._wake()

    async def _failure(self, e: Exception) -> Exception:
        # _failure waits up to a second for the child's exit status: not on the loop.
        return await asyncio.to_thread(self.rt._failure, e, "failed mid-request")

    def take(self) -> list[Token]:
        if self.ended:
            return []
        if self._parts:
            self._raw += b"".join(self._parts)
            self._parts.clear()
        if self._status is None and not self._head():
            return []
        if self._status != 200:
            return self._error_body()
        return self._tokens(self._dechunk())

    def _head(self) -> bool:
        end = self._raw.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = self._raw[:end].decode("latin-1").split("\r\n")
        self._raw = self._raw[end + 4 :]
        try:
            self._status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            raise ToolError(f"llama-server sent a malformed response: {lines[0][:100]!r}") from None
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "transfer-encoding":
                self._chunked = "chunked" in value
            elif name == "content-length" and value.isdigit():
                self._length = int(value)
        return True

    def _error_body(self) -> list[Token]:
        """A refused request: the whole body, then its error (400s are the client's)."""
        if self._chunked:
            self._sse += self._dechunk()
            done = self._last_chunk or self._lost is not None
        else:
            self._sse, done = self._raw, self._lost is not None or 0 <= self._length <= len(self._raw)
        if not done:
            return []
        raise llama_error(int(self._status or 500), self._sse.decode("utf-8", "replace"))

    def _dechunk(self) -> bytes:
        """The payload of every whole chunk received (and `_last_chunk` once the empty one is in)."""
        raw, out, pos, n = self._raw, [], 0, len(self._raw)
        while not self._last_chunk:
            eol = raw.find(b"\r\n", pos)
            if eol < 0:
                break
            try:
                size = int(raw[pos:eol].split(b";", 1)[0], 16)
            except ValueError:
                raise ToolError(f"llama-server sent a malformed chunk: {raw[pos:eol][:40]!r}") from None
            if size == 0:
                self._last_chunk, pos = True, n  # trailers, if any, are of no interest
                break
            end = eol + 2 + size
            if n < end + 2:
                break
            out.append(raw[eol + 2 : end])
            pos = end + 2
        self._raw = raw[pos:] if pos else raw
        return out[0] if len(out) == 1 else b"".join(out)

    def _tokens(self, data: bytes) -> list[Token]:
        out: list[Token] = []
        if data:
            *events, self._sse = (self._sse + data).split(b"\n\n")
            for e in events:
                d = parse_event(e)
                if d is not None:
                    out += self.rt.tokens_of(d)
                    if d.get("stop"):
                        self.ended = True
                        self.close()
                        return out
        if self._last_chunk and self._lost is None:  # ended without its final event: wait() reports it
            self._lost = EOFError("the stream ended before its final event")
        return out


def _done(w: asyncio.Future[None]) -> None:
    if not w.done():
        w.set_result(None)


def parse_event(e: bytes) -> dict[str, Any] | None:
    """One SSE event of llama-server's stream (without its blank line): the data, None for other
    lines; an error event raises it."""
    if e.startswith(b"data: "):
        d: dict[str, Any] = json.loads(e[6:])
        if "error" in d:
            raise llama_error(int(d["error"].get("code", 500)), json.dumps(d))
        return d
    if e.startswith(b"error: "):
        raise llama_error(500, e[7:].decode("utf-8", "replace"))
    return None


def llama_error(status: int, text: str) -> Exception:
    try:
        msg = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        msg = text.strip()[:300]
    if 400 <= status < 500:
        return InputError(f"llama-server rejected the request: {msg}")
    return ToolError(f"llama-server error {status}: {msg}")

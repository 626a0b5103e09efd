"""GGUF serving through a managed llama-server child: real slots and continuous batching.

orlik starts llama-server on a free 127.0.0.1 port with a private API key, waits for /health, and
forwards generation to its native /completion stream as token ids (the prompt is rendered and
tokenized by orlik), so templates, stop strings, usage and errors stay orlik's while concurrent
requests overlap in llama.cpp's batch. The child dies with orlik: it is stopped on close/exit and
gets SIGTERM from the kernel if orlik is killed.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import time
from collections.abc import Iterator
from typing import Any

from orlik.checkpoint import Checkpoint
from orlik.errors import InputError, MissingDependencyError, ToolError
from orlik.manifest import Variant
from orlik.serving.faults import BackendDied, BackendStalled
from orlik.serving.runtimes.base import Runtime, Sampling, Token
from orlik.serving.runtimes.llamacpp import gguf_file
from orlik.serving.runtimes.llamaserver_child import STALL_TIMEOUT, LlamaServer, StallWatch, free_port
from orlik.serving.runtimes.llamaserver_stream import SSEStream, llama_error, parse_event

__all__ = ["RUNTIME", "LlamaServer", "LlamaServerRuntime", "free_port", "gguf_file"]


class LlamaServerRuntime(Runtime):
    name = "llama-server"
    formats = ("gguf",)
    supports_json_schema = True  # llama.cpp turns the schema into a GBNF grammar

    def __init__(self, server: LlamaServer, meta: Any, stall_timeout: float = STALL_TIMEOUT) -> None:
        import httpx

        self.server, self.meta = server, meta
        self.watch = StallWatch(server, stall_timeout)
        self._headers = {"Authorization": f"Bearer {server.key}", "Content-Type": "application/json"}
        self.client = httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {server.key}"},
            timeout=httpx.Timeout(None, connect=10.0),
            limits=httpx.Limits(max_connections=server.parallel + 8, max_keepalive_connections=server.parallel + 8),
        )  # fmt: skip
        models = self._post_json("GET", "/v1/models")["data"][0].get("meta", {})
        self._n_ctx = int(models.get("n_ctx") or meta.n_ctx_train)
        self._n_vocab = int(models.get("n_vocab") or meta.n_vocab)
        self._pieces: dict[int, bytes] = {}
        self.watch.start()

    @classmethod
    def missing(cls) -> str | None:
        from orlik import llamacpp

        try:
            llamacpp.tool("llama-server")
            import httpx  # noqa: F401
        except MissingDependencyError as e:
            return str(e)
        except ImportError:
            return 'httpx is not installed; pip install "orlik[serve]"'
        return None

    @classmethod
    def load(cls, source: Variant | Checkpoint, **options: Any) -> LlamaServerRuntime:
        from orlik.gguf_read import GGUFMeta

        path = gguf_file(source)
        meta = GGUFMeta.read(path)
        server = LlamaServer(path, parallel=int(options.get("parallel") or 1), threads=options.get("threads"),
                             ctx_per_slot=options.get("n_ctx"), alias=str(options.get("alias") or path.stem))  # fmt: skip
        server.start()
        try:
            return cls(server, meta, float(options.get("stall_timeout") or STALL_TIMEOUT))
        except BaseException:
            server.stop()
            raise

    def _post_json(self, method: str, url: str, body: dict[str, Any] | None = None) -> Any:
        import httpx

        try:
            r = self.client.request(method, url, json=body)
        except httpx.HTTPError as e:
            raise self._failure(e, "is unreachable") from None
        self.watch.last = time.monotonic()
        if r.status_code != 200:
            raise llama_error(r.status_code, r.text)
        return r.json()

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def n_vocab(self) -> int:
        return self._n_vocab

    @property
    def bos_id(self) -> int | None:
        return self.meta.bos_id

    @property
    def eos_ids(self) -> set[int]:
        return set(self.meta.eos_ids)

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        body = {"content": text, "add_special": add_bos, "parse_special": special}
        return [int(t) for t in self._post_json("POST", "/tokenize", body)["tokens"]]

    def detokenize(self, tokens: list[int]) -> str:
        return str(self._post_json("POST", "/detokenize", {"tokens": list(tokens)})["content"])

    def token_piece(self, token: int) -> bytes:
        # Generation fills this cache from llama-server's own "bytes" fields (exact, even for
        # partial UTF-8); detokenize is the fallback for ids it has not reported yet.
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self.detokenize([token]).encode("utf-8")
        return piece

    def logits(self, tokens: list[int]) -> Any:
        raise InputError(
            "the llama-server runtime serves generation only; use the llamacpp runtime for logits"
        )

    def alive(self) -> bool:
        return self.server.alive()

    def request_body(self, tokens: list[int], s: Sampling) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": list(tokens), "n_predict": int(s.max_tokens), "stream": True, "return_tokens": True,
            "cache_prompt": True, "temperature": float(s.temperature), "top_k": int(max(s.top_k, 0)),
            "top_p": float(s.top_p), "min_p": float(s.min_p), "typical_p": 1.0,
            "repeat_penalty": float(s.repetition_penalty), "repeat_last_n": self._n_ctx,
            "presence_penalty": float(s.presence_penalty), "frequency_penalty": float(s.frequency_penalty),
            "dry_multiplier": 0.0, "xtc_probability": 0.0, "mirostat": 0,
            "seed": -1 if s.seed is None else int(s.seed) % 2**32,
            "n_probs": max(1, s.logprobs) if s.logprobs is not None else 0, "ignore_eos": bool(s.ignore_eos),
        }  # fmt: skip
        if s.json_schema is not None:
            body["json_schema"] = s.json_schema
        elif s.grammar:
            body["grammar"] = s.grammar
        return body

    def generate(self, tokens: list[int], sampling: Sampling) -> Iterator[Token]:
        for d in self._events(self.request_body(tokens, sampling)):
            yield from self.tokens_of(d)
            if d.get("stop"):
                return

    def stream(self, tokens: list[int], sampling: Sampling) -> SSEStream | None:
        # With logprobs a token's bytes may need a /detokenize call, which would block the loop:
        # those requests run in a worker thread (generate()).
        if sampling.logprobs is not None:
            return None
        return SSEStream(self, self.request_body(tokens, sampling))

    def tokens_of(self, d: dict[str, Any]) -> list[Token]:
        """The tokens of one llama-server event."""
        ids = d.get("tokens") or []
        probs = d.get("completion_probabilities")
        if probs or len(ids) != 1:
            probs, last = probs or [], len(ids) - 1
            return [
                self._token(int(t), d.get("content", "") if i == last else "", probs, i)
                for i, t in enumerate(ids)
            ]
        # The per-token case: llama-server's own text delta, relayed as it is.
        return [Token(id=int(ids[0]), text=d.get("content", ""))]

    def _events(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """llama-server's /completion stream, one parsed event at a time, until its final one
        (the worker-thread path; the server reads it on its event loop, see SSEStream).

        Read with the standard library's http.client on a connection of its own. Closing the
        generator closes the connection, so llama-server stops generating for a client that left.
        """
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port)
        watch = self.watch
        try:
            conn.request("POST", "/completion", json.dumps(body).encode(), self._headers)
            r = conn.getresponse()
            if r.status != 200:
                raise llama_error(r.status, r.read().decode("utf-8", "replace"))
            buf = b""
            while data := r.read1(65536):
                watch.last = time.monotonic()  # a sign of life for the stall watch
                *events, buf = (buf + data).split(b"\n\n")
                for e in events:
                    d = parse_event(e)
                    if d is not None:
                        yield d
                        if d.get("stop"):
                            return
            raise self._failure(EOFError("the stream ended before its final event"), "failed mid-request")
        except (http.client.HTTPException, OSError) as e:
            raise self._failure(e, "failed mid-request") from None
        finally:
            conn.close()

    def _failure(self, e: Exception, what: str) -> Exception:
        """A dead or hung child is a 503/504 with Retry-After (it is being restarted); else a 500."""
        name = self.server.gguf.name
        code = self.server.exit_code(wait=1.0)  # the socket can close just before the exit is seen
        if self.server.stalled:
            return BackendStalled(f"llama-server ({name}) stopped responding ({self.server.stalled}); "
                                  "orlik killed it and is restarting it, retry shortly")  # fmt: skip
        if code is not None:
            return BackendDied(f"llama-server ({name}) ended mid-request (exit status {code}); "
                               "orlik is restarting it, retry shortly")  # fmt: skip
        return ToolError(f"llama-server ({name}) {what}: {e}")

    def _token(self, tid: int, text: str, probs: list[dict[str, Any]], i: int) -> Token:
        if i >= len(probs):
            return Token(id=tid, text=text)
        p = probs[i]
        top = []
        for alt in p.get("top_logprobs") or []:
            if "bytes" in alt:
                self._pieces.setdefault(int(alt["id"]), bytes(alt["bytes"]))
            top.append((int(alt["id"]), float(alt["logprob"])))
        if "bytes" in p:
            self._pieces.setdefault(tid, bytes(p["bytes"]))
        return Token(id=tid, logprob=float(p.get("logprob", 0.0)), top_logprobs=top, text=text)

    def close(self) -> None:
        self.watch.close()
        with contextlib.suppress(Exception):
            self.client.close()
        self.server.stop()


RUNTIME = LlamaServerRuntime

"""GGUF serving through a managed llama-server child: real slots and continuous batching.

orlik starts llama-server on a free 127.0.0.1 port with a private API key, waits for /health, and
forwards generation to its native /completion stream as token ids (the prompt is rendered and
tokenized by orlik), so templates, stop strings, usage and errors stay orlik's while concurrent
requests overlap in llama.cpp's batch. The child dies with orlik: it is stopped on close/exit and
gets SIGTERM from the kernel if orlik is killed.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from orlik.checkpoint import Checkpoint
from orlik.errors import InputError, MissingDependencyError, ToolError
from orlik.manifest import Variant
from orlik.serving.runtimes.base import Runtime, Sampling, Token
from orlik.serving.runtimes.llamacpp import gguf_file

_PR_SET_PDEATHSIG = 1
_live: set[LlamaServer] = set()
_live_lock = threading.Lock()


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
            fd, log = tempfile.mkstemp(prefix="orlik-llama-server-", suffix=".log")
            self.log_path = Path(log)
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
            tail = self.log_tail()
            self.stop()
            if "bind" in tail.lower() and attempt < 2:
                continue
            raise ToolError(f"llama-server did not become healthy for {self.gguf.name}: {tail}")

    def log_tail(self, lines: int = 3) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) or "(empty log)"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
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
        s.stop()


class LlamaServerRuntime(Runtime):
    name = "llama-server"
    formats = ("gguf",)
    supports_json_schema = True  # llama.cpp turns the schema into a GBNF grammar

    def __init__(self, server: LlamaServer, meta: Any) -> None:
        import httpx

        self.server, self.meta = server, meta
        self.client = httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {server.key}"},
            timeout=httpx.Timeout(None, connect=10.0),
            limits=httpx.Limits(max_connections=server.parallel + 8, max_keepalive_connections=server.parallel + 8),
        )  # fmt: skip
        models = self._post_json("GET", "/v1/models")["data"][0].get("meta", {})
        self._n_ctx = int(models.get("n_ctx") or meta.n_ctx_train)
        self._n_vocab = int(models.get("n_vocab") or meta.n_vocab)
        self._pieces: dict[int, bytes] = {}

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
            return cls(server, meta)
        except BaseException:
            server.stop()
            raise

    def _post_json(self, method: str, url: str, body: dict[str, Any] | None = None) -> Any:
        import httpx

        try:
            r = self.client.request(method, url, json=body)
        except httpx.HTTPError as e:
            raise ToolError(f"llama-server ({self.server.gguf.name}) is unreachable: {e}") from None
        if r.status_code != 200:
            raise _error(r.status_code, r.text)
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
        import httpx

        body = self.request_body(tokens, sampling)
        try:
            with self.client.stream("POST", "/completion", json=body) as r:
                if r.status_code != 200:
                    raise _error(r.status_code, r.read().decode("utf-8", "replace"))
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    d = json.loads(line[6:])
                    if "error" in d:
                        raise _error(int(d["error"].get("code", 500)), json.dumps(d))
                    ids = d.get("tokens") or []
                    probs = d.get("completion_probabilities") or []
                    for i, tid in enumerate(ids):
                        yield self._token(
                            int(tid), d.get("content", "") if i == len(ids) - 1 else "", probs, i
                        )
                    if d.get("stop"):
                        return
        except httpx.HTTPError as e:
            raise ToolError(f"llama-server ({self.server.gguf.name}) failed mid-request: {e}") from None

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
        with contextlib.suppress(Exception):
            self.client.close()
        self.server.stop()


def _error(status: int, text: str) -> Exception:
    try:
        msg = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        msg = text.strip()[:300]
    if 400 <= status < 500:
        return InputError(f"llama-server rejected the request: {msg}")
    return ToolError(f"llama-server error {status}: {msg}")


RUNTIME = LlamaServerRuntime

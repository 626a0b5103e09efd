"""OpenAI's response and stream-chunk shapes for chat and text completions, built from engine events."""

from __future__ import annotations

import json
import time
import uuid
from json.encoder import encode_basestring  # type: ignore[attr-defined]  # C; json.dumps' own
from typing import Any

from orlik.serving.engine import Event, TokenLogprob


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class _Format:
    prefix = ""
    object_full = ""
    object_chunk = ""

    def __init__(self, model: str, *, logprobs: bool, include_usage: bool) -> None:
        self.model, self.want_logprobs, self.include_usage = model, logprobs, include_usage
        self.id = f"{self.prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self._text_sse: tuple[str, str] | None = None

    def _text_choice(self, text: str) -> dict[str, Any]:
        raise NotImplementedError

    def sse(self, ev: Event) -> str:
        """The SSE lines of one event. A text-only event, the one sent per token, is written from a
        template cut once from a real chunk: the same bytes as dumps(chunk), without building it."""
        if ev.logprobs or ev.finish_reason is not None or self.want_logprobs or not ev.text:
            return "".join(f"data: {dumps(c)}\n\n" for c in self.chunks(ev))
        if self._text_sse is None:
            mark = "\u0000orlik\u0000"
            head, tail = f"data: {dumps(self._chunk(self._text_choice(mark)))}\n\n".split(
                encode_basestring(mark)
            )
            self._text_sse = head, tail
        return self._text_sse[0] + encode_basestring(ev.text) + self._text_sse[1]

    def chunks(self, ev: Event) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        c = {**self._envelope(self.object_chunk), "choices": [choice]}
        if self.include_usage:
            c["usage"] = None  # OpenAI: null on every chunk but the last one
        return c

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self._envelope(self.object_chunk), "choices": [], "usage": usage}

    def start(self) -> list[dict[str, Any]]:
        return []


class ChatFormat(_Format):
    prefix, object_full, object_chunk = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def _logprobs(self, lps: list[TokenLogprob]) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        return {"content": [
            {"token": lp.token, "logprob": lp.logprob, "bytes": lp.bytes,
             "top_logprobs": [{"token": t, "logprob": v, "bytes": b} for t, b, v in lp.top]}
            for lp in lps
        ]}  # fmt: skip

    def start(self) -> list[dict[str, Any]]:
        return [self._chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None})]  # fmt: skip

    def _text_choice(self, text: str) -> dict[str, Any]:
        return {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}

    def chunks(self, ev: Event) -> list[dict[str, Any]]:
        out = []
        if ev.text or ev.logprobs:
            out.append(self._chunk({"index": 0, "delta": {"content": ev.text}, "logprobs": self._logprobs(ev.logprobs),
                                    "finish_reason": None}))  # fmt: skip
        if ev.finish_reason is not None:
            out.append(
                self._chunk({"index": 0, "delta": {}, "logprobs": None, "finish_reason": ev.finish_reason})
            )
        return out

    def full(self, events: list[Event], usage: dict[str, int]) -> dict[str, Any]:
        text = "".join(e.text for e in events)
        lps = [lp for e in events for lp in e.logprobs]
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": self._logprobs(lps), "finish_reason": events[-1].finish_reason}  # fmt: skip
        return {**self._envelope(self.object_full), "choices": [choice], "usage": usage}


class CompletionFormat(_Format):
    prefix, object_full, object_chunk = "cmpl", "text_completion", "text_completion"

    def __init__(self, model: str, *, logprobs: bool, include_usage: bool, echo: str = "") -> None:
        super().__init__(model, logprobs=logprobs, include_usage=include_usage)
        self.echo = echo
        self.offset = len(echo)  # text_offset of the next token, in characters of the returned text

    def _logprobs(self, lps: list[TokenLogprob]) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        offsets = []
        for lp in lps:
            offsets.append(self.offset)
            self.offset += len(lp.token)
        return {
            "tokens": [lp.token for lp in lps],
            "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{t: v for t, _, v in lp.top} for lp in lps],
            "text_offset": offsets,
        }

    def start(self) -> list[dict[str, Any]]:
        if not self.echo:
            return []
        return [self._chunk({"index": 0, "text": self.echo, "logprobs": None, "finish_reason": None})]

    def _text_choice(self, text: str) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": None}

    def chunks(self, ev: Event) -> list[dict[str, Any]]:
        if not (ev.text or ev.logprobs or ev.finish_reason):
            return []
        return [self._chunk({"index": 0, "text": ev.text, "logprobs": self._logprobs(ev.logprobs),
                             "finish_reason": ev.finish_reason})]  # fmt: skip

    def full(self, events: list[Event], usage: dict[str, int]) -> dict[str, Any]:
        text = self.echo + "".join(e.text for e in events)
        lps = [lp for e in events for lp in e.logprobs]
        choice = {
            "index": 0,
            "text": text,
            "logprobs": self._logprobs(lps),
            "finish_reason": events[-1].finish_reason,
        }
        return {**self._envelope(self.object_full), "choices": [choice], "usage": usage}

"""The per-token serving path: the templated SSE chunk is byte-identical to the JSON it replaces,
and llama-server's stream is relayed exactly (text, ids, finish) through the lean reader."""

from __future__ import annotations

import json

import pytest

from orlik.serving.engine import Event, TokenLogprob
from orlik.serving.formats import ChatFormat, CompletionFormat, dumps

TEXTS = [
    "a",
    " ma",
    'cudzysłów " i \\ ukośnik',
    "\n\t\r\x00\x1f\x7f",
    "żółć 😀 \u2028\u2029",
    "</script>",
    "{}",
]


def _plain(fmt: ChatFormat | CompletionFormat, ev: Event) -> str:
    return "".join(f"data: {dumps(c)}\n\n" for c in fmt.chunks(ev))


@pytest.mark.parametrize("usage", [False, True])
@pytest.mark.parametrize("kind", [ChatFormat, CompletionFormat])
def test_templated_text_chunk_is_the_same_bytes_as_json(kind: type, usage: bool) -> None:
    fmt = kind('model "z" cudzysłowem', logprobs=False, include_usage=usage)
    for text in TEXTS:
        ev = Event(text=text, completion_tokens=3)
        assert fmt.sse(ev) == _plain(fmt, ev)
        line = fmt.sse(ev)
        assert line.startswith("data: ") and line.endswith("\n\n")
        chunk = json.loads(line[6:])
        got = chunk["choices"][0]["delta"]["content"] if kind is ChatFormat else chunk["choices"][0]["text"]
        assert got == text


@pytest.mark.parametrize("kind", [ChatFormat, CompletionFormat])
def test_events_with_finish_or_logprobs_take_the_full_path(kind: type) -> None:
    fmt = kind("m", logprobs=True, include_usage=False)
    ref = kind("m", logprobs=True, include_usage=False)
    ref.id, ref.created = fmt.id, fmt.created
    lp = TokenLogprob("a", [97], -0.5, [("a", [97], -0.5), ("b", [98], -1.5)])
    for ev in (Event("a", [lp]), Event("", [], "stop", 2), Event("x", [lp], "length", 3)):
        assert fmt.sse(ev) == _plain(ref, ev)
    fmt2 = kind("m", logprobs=False, include_usage=True)
    ev = Event("end", [], "stop", 4)
    assert fmt2.sse(ev) == _plain(fmt2, ev)

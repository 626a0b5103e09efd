"""Serving pieces without a server: stop-string holdback, UTF-8-safe detokenizing, templates, metrics."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from orlik.errors import InputError
from orlik.serving.textstream import IncrementalDetokenizer, StopBuffer


def _feed(stops: list[str], pieces: list[str]) -> tuple[list[str], str, str | None]:
    buf = StopBuffer(stops)
    sent = [buf.push(p) for p in pieces]
    tail = buf.flush()
    return sent, tail, buf.stopped


def test_stop_string_split_across_tokens_is_never_sent() -> None:
    sent, tail, stopped = _feed(["</end>"], ["Hello wor", "ld </", "en", "d> more"])
    assert "".join(sent) + tail == "Hello world "
    assert stopped == "</end>"
    # Nothing of the stop string leaked in any single piece either.
    assert all("<" not in s for s in sent)


def test_partial_stop_prefix_is_released_when_it_does_not_complete() -> None:
    sent, tail, stopped = _feed(["STOP"], ["a S", "T", "x", "yz ST"])
    assert sent == ["a ", "", "STx", "yz "]
    assert tail == "ST" and stopped is None


def test_earliest_of_several_stops_wins() -> None:
    sent, _, stopped = _feed(["world", "lo w"], ["Hel", "lo world"])
    assert "".join(sent) == "Hel" and stopped == "lo w"


def test_no_stops_passes_through() -> None:
    sent, tail, stopped = _feed([], ["a", "b"])
    assert sent == ["a", "b"] and tail == "" and stopped is None


def test_detokenizer_holds_back_partial_utf8_and_keeps_spaces(tiny_checkpoint: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    text = " zażółć gęślą jaźń 😀 end"
    ids = tok.encode(text, add_special_tokens=False)
    prompt = tok.encode("Prompt:", add_special_tokens=True)
    detok = IncrementalDetokenizer(lambda t: tok.decode(t, skip_special_tokens=False), prompt)
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)  # never half a character
    # The emoji is four byte-fallback tokens: nothing is sent until the last one.
    assert "😀" in deltas


def test_template_renders_in_a_sandbox() -> None:
    from orlik.serving.templates import ChatTemplate, TemplateRenderError

    tpl = ChatTemplate(
        "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}", "<s>", "</s>", "t"
    )
    assert tpl.render([{"role": "user", "content": "hej"}]) == "<s><user>hej"
    evil = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}", origin="evil")
    with pytest.raises(TemplateRenderError):
        evil.render([{"role": "user", "content": "x"}])
    strict = ChatTemplate("{{ raise_exception('roles must alternate') }}", origin="s")
    with pytest.raises(TemplateRenderError, match="roles must alternate"):
        strict.render([])


def test_missing_chat_template_fails_at_load_with_the_override_named(checkpoint_copy: Path) -> None:
    from orlik.serving.models import ModelRegistry

    (checkpoint_copy / "chat_template.jinja").unlink()
    cfg = json.loads((checkpoint_copy / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (checkpoint_copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=r"no chat template.*--chat-template"):
        ModelRegistry([str(checkpoint_copy)])
    override = checkpoint_copy.parent / "t.jinja"
    override.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    reg = ModelRegistry([f"mine={checkpoint_copy}"], chat_template=override)
    assert reg.get("mine").template.origin.endswith("(--chat-template)")
    reg.close()


def test_memory_budget_parsing_and_too_small_budget(tiny_checkpoint: Path) -> None:
    from orlik.serving.models import ModelRegistry, parse_bytes

    assert parse_bytes("8G") == 8 << 30 and parse_bytes("512MiB") == 512 << 20 and parse_bytes("1000") == 1000
    with pytest.raises(InputError):
        parse_bytes("lots")
    with pytest.raises(InputError, match="more than the whole --memory-budget"):
        ModelRegistry([str(tiny_checkpoint)], memory_budget=1 << 20)


def test_metrics_text_format() -> None:
    from orlik.serving.metrics import Metrics

    m = Metrics()
    m.request("/v1/completions", 'a"b', 200)
    m.tokens("a", 10, 5)
    m.timing("a", 0.3, 0.1)
    m.gauge("orlik_queue_depth", lambda: {(): 3})
    text = m.render()
    assert 'orlik_requests_total{endpoint="/v1/completions",model="a\\"b",status="200"} 1' in text
    assert 'orlik_request_latency_seconds_bucket{model="a",le="0.5"} 1' in text
    assert 'orlik_request_latency_seconds_bucket{model="a",le="0.25"} 0' in text
    assert "orlik_queue_depth 3" in text and 'orlik_completion_tokens_total{model="a"} 5' in text


def test_engine_stops_at_max_tokens_and_sends_the_last_token(tiny_checkpoint: Path) -> None:
    from orlik.checkpoint import Checkpoint
    from orlik.serving.engine import GenRequest, events
    from orlik.serving.runtimes.base import Sampling
    from orlik.serving.runtimes.hf import HFRuntime

    rt = HFRuntime.load(Checkpoint.open(tiny_checkpoint))
    prompt = rt.tokenize("Dzisiaj jest", add_bos=True)
    req = GenRequest(prompt=prompt, sampling=Sampling(max_tokens=12, temperature=0), logprobs=0)
    evs = list(events(rt, req, threading.Event()))
    ids = [t.id for t in rt.generate(prompt, Sampling(max_tokens=12, temperature=0))]
    eos = rt.eos_ids
    cut = next((i for i, t in enumerate(ids) if t in eos), len(ids))
    assert (
        "".join(e.text for e in evs)
        == rt.detokenize(prompt[-5:] + ids[:cut])[len(rt.detokenize(prompt[-5:])) :]
    )
    assert evs[-1].finish_reason == ("length" if cut == 12 else "stop")
    assert evs[-1].completion_tokens == cut
    assert sum(len(e.logprobs) for e in evs) == cut  # one logprob per generated token


def test_memory_budget_unloads_the_idle_model_first(tiny_checkpoint: Path) -> None:
    from orlik.serving.models import ModelRegistry, ServerBusy

    probe = ModelRegistry([str(tiny_checkpoint)])
    one = next(iter(probe.models.values())).est_bytes
    probe.close()
    # Room for one model, not two: loading b must unload a (idle), and fails while a is busy.
    reg = ModelRegistry([f"a={tiny_checkpoint}", f"b={tiny_checkpoint}"], memory_budget=int(one * 1.5))
    try:
        a, b = reg.get("a"), reg.get("b")
        reg.load_blocking(a)
        reg.load_blocking(b)
        assert a.runtime is None and b.runtime is not None
        b.active = 1  # a request holds b
        with pytest.raises(ServerBusy):
            reg.load_blocking(a)
        b.active = 0
        reg.load_blocking(a)
        assert a.runtime is not None and b.runtime is None
    finally:
        reg.close()

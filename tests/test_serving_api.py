"""The OpenAI-compatible server end to end: a real `orlik serve` (GGUF via llama-server, and FP16)
driven by the official openai client and raw HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from serving_helpers import OrlikServer

KEY = "test-key-123"
GGUF, FP16 = "tiny-q8_0", "tiny-fp16"
MODELS = [GGUF, FP16]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(
    serving_gguf: Path, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OrlikServer]:
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    srv = OrlikServer([f"{GGUF}={serving_gguf}", f"{FP16}={tiny_checkpoint}"], "--parallel", "2",
                      "--queue-size", "4", "--max-body", "65536", "--threads", "1", api_key=KEY, log=log)  # fmt: skip
    try:
        yield srv.wait()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server: OrlikServer) -> Any:
    return server.client()


def test_models_lists_both_with_format(client: Any) -> None:
    ids = {m.id: m for m in client.models.list().data}
    assert set(ids) == set(MODELS)
    assert ids[GGUF].model_extra["format"] == "gguf" and ids[FP16].model_extra["format"] == "fp16"


@pytest.mark.parametrize("model", MODELS)
def test_chat_stream_with_include_usage(client: Any, model: str) -> None:
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Cześć! Jak się masz?"}], max_tokens=12,
        temperature=0.8, seed=7, stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None  # the usage chunk comes last, with no choices
    assert all(c.usage is None for c in chunks[:-1])
    assert finishes in (["length"], ["stop"])
    assert usage.prompt_tokens > 5 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert (finishes == ["length"]) == (usage.completion_tokens == 12)
    # The same request without streaming gives the same text (seeded sampling is reproducible).
    full = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Cześć! Jak się masz?"}], max_tokens=12,
        temperature=0.8, seed=7,
    )  # fmt: skip
    assert full.choices[0].message.content == text
    assert full.usage.completion_tokens == usage.completion_tokens


@pytest.mark.parametrize("model", MODELS)
def test_stop_string_across_token_boundary_is_held_back(client: Any, model: str) -> None:
    kw = dict(
        model=model, prompt="Dzisiaj rano poszedłem do", max_tokens=40, temperature=1.0, seed=3, logprobs=0
    )
    ref = client.completions.create(**kw)
    text, toks = ref.choices[0].text, ref.choices[0].logprobs.tokens
    # A stop string made of the end of one token and the start of the next, first seen there.
    starts, pos = [], 0
    for t in toks:
        starts.append(pos)
        pos += len(t)
    cands = [(starts[i + 1] - 1, text[starts[i + 1] - 1 : starts[i + 1] + 1]) for i in range(len(toks) - 1)
             if toks[i] and toks[i + 1] and starts[i + 1] + 1 <= len(text)]  # fmt: skip
    cands = [(at, s) for at, s in cands if len(s) == 2 and text.find(s) == at]
    assert cands, f"no token boundary to test in {toks!r}"
    at, stop = cands[len(cands) // 2]
    pieces, finish = [], None
    for chunk in client.completions.create(**kw, stop=[stop], stream=True):
        pieces.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == text[:at]  # nothing of the stop string, not even its first character
    assert finish == "stop"


@pytest.mark.parametrize("model", MODELS)
def test_json_schema_output_parses(client: Any, model: str) -> None:
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Podaj imię i wiek jako JSON."}], max_tokens=120,
        temperature=0.7, seed=1, response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}},
    )  # fmt: skip
    assert r.choices[0].finish_reason == "stop"
    obj = json.loads(r.choices[0].message.content)
    assert set(obj) == {"name", "age"} and isinstance(obj["name"], str) and len(obj["name"]) <= 12
    assert isinstance(obj["age"], int) and 0 <= obj["age"] <= 120


def test_json_object_mode(client: Any) -> None:
    r = client.chat.completions.create(model=FP16, messages=[{"role": "user", "content": "JSON please"}],
                                       max_tokens=80, temperature=0, response_format={"type": "json_object"})  # fmt: skip
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut by max_tokens: still the beginning of an object
        assert r.choices[0].message.content.startswith("{")


def test_chat_logprobs(client: Any) -> None:
    r = client.chat.completions.create(model=GGUF, messages=[{"role": "user", "content": "Hej"}], max_tokens=6,
                                       logprobs=True, top_logprobs=3, temperature=0)  # fmt: skip
    items = r.choices[0].logprobs.content
    assert len(items) == r.usage.completion_tokens
    for it in items:
        assert len(it.top_logprobs) == 3 and it.logprob <= 0
        # Greedy: the chosen token is the most likely one.
        assert it.logprob == pytest.approx(it.top_logprobs[0].logprob, abs=1e-4)
    assert "".join(it.token for it in items) == r.choices[0].message.content


def test_wrong_or_missing_key_is_401(server: OrlikServer) -> None:
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": GGUF, "messages": []})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/health").status_code == 200  # health stays open


def test_unknown_model_is_404_listing_models(client: Any) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert GGUF in str(e.value) and FP16 in str(e.value)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"model": GGUF, "messages": [{"role": "user", "content": "x"}], "n": 2}, "n must be 1"),
        ({"model": GGUF, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
        ({"model": GGUF, "messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
        ({"model": GGUF, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"model": GGUF, "messages": []}, "messages"),
        ({"model": GGUF, "messages": [{"role": "robot", "content": "x"}]}, "role"),
        ({"model": GGUF, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "logprobs"),
        ({"model": GGUF, "messages": [{"role": "user", "content": "x"}], "stop": ""}, "stop"),
        ({"model": GGUF, "messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}, "too many"),
        ({"model": GGUF, "messages": [{"role": "assistant", "content": "x"}]}, "alternate"),
        ({"model": GGUF, "messages": [{"role": "user", "content": "x"}],
          "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}}, "schema"),
    ],
)  # fmt: skip
def test_client_mistakes_are_400(server: OrlikServer, body: dict[str, Any], needle: str) -> None:
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=server.headers, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and needle in err["message"] + str(err["param"])


def test_malformed_json_is_400(server: OrlikServer) -> None:
    r = httpx.post(f"{server.url}/v1/completions", content=b'{"model": "x", ', headers={**server.headers,
                   "Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_prompt_longer_than_context_says_by_how_much(client: Any) -> None:
    n_ctx = httpx.post(f"{client.base_url}".replace("/v1/", "") + "/tokenize",
                       json={"model": GGUF, "prompt": "x"}, headers={"Authorization": f"Bearer {KEY}"}).json()["max_model_len"]  # fmt: skip
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=GGUF, prompt=[5] * (n_ctx + 10), max_tokens=1)
    assert f"the prompt is {n_ctx + 10} tokens, 11 too many" in str(e.value)


def test_body_over_limit_is_413(server: OrlikServer) -> None:
    body = {"model": GGUF, "prompt": "a" * 70_000}
    r = httpx.post(f"{server.url}/v1/completions", json=body, headers=server.headers)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_tokenize_detokenize_round_trip(server: OrlikServer) -> None:
    h = server.headers
    for model in MODELS:
        t = httpx.post(f"{server.url}/tokenize", json={"model": model, "prompt": "Zażółć gęślą jaźń",
                       "add_special_tokens": False}, headers=h).json()  # fmt: skip
        assert t["count"] == len(t["tokens"]) > 3 and t["max_model_len"] == 1024
        d = httpx.post(
            f"{server.url}/detokenize", json={"model": model, "tokens": t["tokens"]}, headers=h
        ).json()
        assert d["prompt"].strip() == "Zażółć gęślą jaźń"
    chat = httpx.post(f"{server.url}/tokenize", json={"model": FP16, "messages": [{"role": "user", "content": "hi"}]},
                      headers=h).json()  # fmt: skip
    assert chat["tokens"][0] == 1 and chat["count"] > 5  # BOS from the template, once


def test_metrics_count_requests_and_tokens(server: OrlikServer, client: Any) -> None:
    client.completions.create(model=GGUF, prompt="Raz dwa", max_tokens=3)
    text = httpx.get(f"{server.url}/metrics", headers=server.headers).text
    assert f'orlik_requests_total{{endpoint="/v1/completions",model="{GGUF}",status="200"}}' in text
    assert f'orlik_completion_tokens_total{{model="{GGUF}"}}' in text
    assert "orlik_queue_depth 0" in text and f'orlik_request_latency_seconds_count{{model="{GGUF}"}}' in text


def test_openapi_lists_served_models(server: OrlikServer) -> None:
    spec = httpx.get(f"{server.url}/openapi.json").json()
    model = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]["model"]
    assert sorted(model["enum"]) == sorted(MODELS)

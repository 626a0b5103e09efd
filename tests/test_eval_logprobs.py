"""Prompt log-probabilities on /v1/completions (echo + logprobs) against a real `orlik serve`:
they equal log-softmax of the runtime's own logits (the call `orlik bench` scores with), for GGUF
(served by llama-server, scored in-process by llama.cpp) and FP16; the limits of generation apply."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from serving_helpers import OrlikServer

KEY = "eval-key"
GGUF, FP16 = "tiny-q8_0", "tiny-fp16"
TEXT = "Recenzja: Słuchawki grają czysto, ale bateria trzyma krótko.\nOcena:"


@pytest.fixture(scope="module")
def server(
    serving_gguf: Path, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OrlikServer]:
    log = tmp_path_factory.mktemp("serve-eval") / "serve.log"
    srv = OrlikServer([f"{GGUF}={serving_gguf}", f"{FP16}={tiny_checkpoint}"], "--parallel", "1",
                      "--queue-size", "1", "--threads", "1", "--ctx-size", "256", api_key=KEY, log=log)  # fmt: skip
    try:
        yield srv.wait()
    finally:
        srv.stop()


def _post(srv: OrlikServer, path: str, body: dict[str, Any], key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{srv.url}{path}", json=body, headers=headers, timeout=120)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("model", [GGUF, FP16])
def test_prompt_logprobs_equal_runtime_logits(
    server: OrlikServer, model: str, serving_gguf: Path, tiny_checkpoint: Path
) -> None:
    from orlik.serving.runtimes.base import load_runtime

    ids = _post(server, "/tokenize", {"model": model, "prompt": TEXT}).json()["tokens"]
    r = _post(server, "/v1/completions", {"model": model, "prompt": ids, "echo": True, "logprobs": 1,
                                          "max_tokens": 1, "temperature": 0})  # fmt: skip
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1  # the prompt, then the one generated token
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None

    rt = load_runtime(serving_gguf if model == GGUF else tiny_checkpoint, n_ctx=256, threads=1)
    try:
        want = _log_softmax(rt.logits(ids))
    finally:
        rt.close()
    expect = [float(want[i - 1, ids[i]]) for i in range(1, len(ids))]
    np.testing.assert_allclose(lp["token_logprobs"][1 : len(ids)], expect, rtol=0, atol=2e-4)
    # top_logprobs holds the argmax (and the token itself): lm-eval's is_greedy reads it.
    for i in range(1, len(ids)):
        assert max(lp["top_logprobs"][i].values()) == pytest.approx(float(want[i - 1].max()), abs=2e-4)
    # The generated token is the greedy one after the prompt, with its log-probability.
    assert lp["token_logprobs"][-1] == pytest.approx(float(want[-1].max()), abs=2e-4)


def test_remote_tokenizer_endpoints(server: OrlikServer) -> None:
    """What lm-eval's remote tokenizer reads: /tokenizer_info (one model named), then /tokenize."""
    info = httpx.get(
        f"{server.url}/tokenizer_info", params={"model": FP16}, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert info.status_code == 200 and info.json()["eos_token"]
    two = httpx.get(f"{server.url}/tokenizer_info", headers={"Authorization": f"Bearer {KEY}"})
    assert two.status_code == 400  # two models are served: name one
    assert httpx.get(f"{server.url}/tokenizer_info", params={"model": FP16}).status_code == 401


def test_limits_apply_to_scoring(server: OrlikServer) -> None:
    body = {"model": FP16, "prompt": [5] * 300, "echo": True, "logprobs": 0, "max_tokens": 1}
    r = _post(server, "/v1/completions", body)
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]  # 300 tokens > --ctx 256
    assert _post(server, "/v1/completions", {**body, "prompt": [5] * 20}, key="wrong").status_code == 401

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as c:
            hold = {"model": FP16, "prompt": [5] * 20, "max_tokens": 200, "ignore_eos": True, "stream": True}
            async with c.stream("POST", f"{server.url}/v1/completions", json=hold) as s:
                await s.aiter_lines().__anext__()  # generating: the one slot is taken
                reqs = [c.post(f"{server.url}/v1/completions", json=body) for _ in range(3)]
                return [r.status_code for r in await asyncio.gather(*reqs)]

    body["prompt"] = [5] * 20
    codes = asyncio.run(burst())  # one waits in the queue of one (then scores), the others get 429
    assert sorted(codes) == [200, 429, 429]

"""The GGUF runtime (llama-cpp-python): tokens and logits agree with the FP16 checkpoint, and
generation uses llama.cpp's sampler (greedy, seeded, penalties, grammar, JSON schema, logprobs)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from orlik import corpus
from orlik.errors import InputError
from orlik.manifest import Variant
from orlik.serving.runtimes.base import Sampling, load_runtime, runtime_class


@pytest.fixture(scope="module")
def f16(bench_ggufs: dict[str, Path]) -> Iterator:
    from orlik.serving.runtimes.llamacpp import LlamaCppRuntime

    rt = LlamaCppRuntime.load(bench_ggufs["F16"], n_ctx=512, threads=1)
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def hf(tiny_checkpoint: Path) -> Iterator:
    rt = load_runtime(tiny_checkpoint, threads=1)
    yield rt
    rt.close()


def test_gguf_format_maps_to_llamacpp(bench_ggufs: dict[str, Path]) -> None:
    rt = load_runtime(bench_ggufs["variants"] / "Q8_0", n_ctx=256, threads=1)
    try:
        assert runtime_class("gguf").name == "llama.cpp" == rt.name
        assert rt.n_ctx >= 256 and rt.n_vocab == 2000
        assert isinstance(Variant.load(bench_ggufs["variants"] / "Q8_0"), Variant)
    finally:
        rt.close()


def test_tokens_match_the_reference_tokenizer(f16, hf) -> None:
    for lang in ("pl", "en"):
        text = corpus.heldout_text(lang)[:3000]
        assert f16.tokenize(text) == hf.tokenize(text)
    assert f16.bos_id == hf.bos_id and hf.tok.eos_token_id in f16.eos_ids
    ids = hf.tokenize("Zażółć gęślą jaźń", add_bos=False)
    assert f16.detokenize(ids) == "Zażółć gęślą jaźń"
    assert b"".join(f16.token_piece(t) for t in ids).decode() == " Zażółć gęślą jaźń"


def test_f16_logits_agree_with_transformers(f16, hf) -> None:
    ids = hf.tokenize(corpus.heldout_text("pl")[:2000])[:200]
    a, b = f16.logits(ids), hf.logits(ids)
    assert a.shape == b.shape == (200, 2000) and a.dtype == np.float32
    assert np.abs(a - b).max() < 0.05  # F16 weights, fp16 activations in llama.cpp vs fp32 in torch
    assert (a.argmax(1) == b.argmax(1)).mean() > 0.98
    np.testing.assert_array_equal(f16.logits_from(ids, 120), a[120:])


def test_greedy_is_the_argmax_and_prefix_reuse_is_exact(f16) -> None:
    prompt = f16.tokenize("Warszawa jest stolicą")
    out = [t.id for t in f16.generate(prompt, Sampling(max_tokens=6, temperature=0.0))]
    assert len(out) <= 6
    seq = list(prompt)
    for tok in out:
        assert int(f16.logits(seq)[-1].argmax()) == tok
        seq.append(tok)
    # A second request sharing the prompt reuses the KV cache and must give the same tokens.
    list(f16.generate([*prompt, 5, 6], Sampling(max_tokens=2, temperature=0.0)))
    again = [t.id for t in f16.generate(prompt, Sampling(max_tokens=6, temperature=0.0))]
    assert again == out


def test_seeded_sampling_is_reproducible(f16) -> None:
    prompt = f16.tokenize("Dzisiaj")
    s = Sampling(max_tokens=12, temperature=1.0, top_k=50, top_p=0.95, min_p=0.01, seed=7)
    a = [t.id for t in f16.generate(prompt, s)]
    b = [t.id for t in f16.generate(prompt, s)]
    c = [t.id for t in f16.generate(prompt, Sampling(max_tokens=12, temperature=1.0, seed=8))]
    assert a == b and a != c


def test_repetition_penalty_changes_greedy_output(f16) -> None:
    prompt = f16.tokenize("to jest to jest to jest")
    # ignore_eos: a tiny model may end after a token or two, leaving nothing for the penalty to change.
    plain = [t.id for t in f16.generate(prompt, Sampling(max_tokens=16, temperature=0.0, ignore_eos=True))]
    pen = [
        t.id
        for t in f16.generate(
            prompt, Sampling(max_tokens=16, temperature=0.0, repetition_penalty=2.0, ignore_eos=True)
        )
    ]
    assert len(plain) == len(pen) == 16 and not f16.eos_ids & set(plain + pen)
    assert plain != pen
    assert len(set(pen)) >= len(set(plain))


def test_grammar_and_json_schema_constrain_the_output(f16) -> None:
    prompt = f16.tokenize("Liczba:")
    toks = [t.id for t in f16.generate(prompt, Sampling(max_tokens=8, temperature=1.0, seed=1,
                                                        grammar='root ::= [0-9]+ "."'))]  # fmt: skip
    digits = f16.detokenize([t for t in toks if t not in f16.eos_ids])  # EOS once the grammar is complete
    assert (digits[:-1].isdigit() and digits.endswith(".")) or (digits.isdigit() and len(toks) == 8)
    schema = {"type": "object", "properties": {"wiek": {"type": "integer"}}, "required": ["wiek"]}
    toks = [
        t.id
        for t in f16.generate(prompt, Sampling(max_tokens=40, temperature=1.0, seed=2, json_schema=schema))
    ]
    text = f16.detokenize([t for t in toks if t not in f16.eos_ids])
    assert isinstance(json.loads(text)["wiek"], int)
    with pytest.raises(InputError, match="grammar"):
        list(f16.generate(prompt, Sampling(max_tokens=2, grammar="root ::= (")))


def test_logprobs_are_the_model_distribution(f16) -> None:
    prompt = f16.tokenize("Kraków")
    tok = next(iter(f16.generate(prompt, Sampling(max_tokens=1, temperature=0.0, logprobs=3))))
    lp = f16.logits(prompt)[-1].astype(np.float64)
    lp = lp - lp.max() - np.log(np.exp(lp - lp.max()).sum())
    assert tok.logprob == pytest.approx(lp.max(), abs=1e-5)
    assert [i for i, _ in tok.top_logprobs] == list(np.argsort(-lp)[:3])
    assert tok.top_logprobs[0][0] == tok.id

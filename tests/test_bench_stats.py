"""Table 8 arithmetic without models: llama.cpp's statistics, the compact reference's KLD bound,
chunking, overlap check, Pareto front and the memory recommendation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from orlik.benchmarks import recommend, reference, scoring, stats, texts
from orlik.benchmarks.plots import pareto_front
from orlik.benchmarks.report import fmt_pm
from orlik.errors import InputError


def _series(rng: np.random.Generator, n: int = 2000) -> stats.Series:
    nll_b = rng.gamma(2.0, 1.5, n)
    nll_q = nll_b + rng.normal(0.05, 0.2, n)
    kld = rng.gamma(1.0, 0.01, n)
    dp = np.exp(-nll_q) - np.exp(-nll_b)
    return stats.Series(nll_q, nll_b, kld, kld, kld, dp, rng.random(n) < 0.9)


def test_summary_matches_llama_cpp_formulas() -> None:
    s = _series(np.random.default_rng(0))
    r = stats.summarize(s)
    n = len(s)
    # mean ± sqrt(var/(N-1)) with the population variance, as mean_and_uncertainty computes it.
    se = lambda x: math.sqrt(np.var(x) / (n - 1))  # noqa: E731
    assert r["ppl"] == pytest.approx(math.exp(s.nll_q.mean()), rel=1e-12)
    assert r["ppl_err"] == pytest.approx(r["ppl"] * se(s.nll_q), rel=1e-9)
    assert r["kld_err"] == pytest.approx(se(s.kld), rel=1e-9)
    # The ln-ratio error from the covariance equals the plain error of the difference series.
    assert r["ln_ppl_ratio_err"] == pytest.approx(se(s.nll_q - s.nll_b), rel=1e-9)
    assert r["cor_ln_ppl"] == pytest.approx(np.corrcoef(s.nll_q, s.nll_b)[0, 1], rel=1e-9)
    cov = np.cov(s.nll_q, s.nll_b, ddof=0)[0, 1] / (n - 1)
    expect = math.sqrt(r["ppl_err"] ** 2 + r["ppl_base_err"] ** 2 - 2 * r["ppl"] * r["ppl_base"] * cov)
    assert r["dppl_err"] == pytest.approx(expect, rel=1e-9)
    assert r["dp_rms"] == pytest.approx(math.sqrt(np.mean(s.dp**2)), rel=1e-12)
    assert r["same_top"] == pytest.approx(s.same_top.mean())
    assert r["same_top_err"] == pytest.approx(math.sqrt(r["same_top"] * (1 - r["same_top"]) / (n - 1)))
    assert r["kld_percentiles"]["max"] == s.kld.max() and r["kld_percentiles"]["min"] == s.kld.min()
    assert r["kld_percentiles"]["median"] == pytest.approx(np.median(s.kld))


def test_percentile_interpolates_like_llama_cpp() -> None:
    v = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    assert stats.percentile(v, 0.9) == pytest.approx(3.6)
    assert stats.percentile(v, 0.999) == pytest.approx(3.996)
    assert stats.median(np.array([1.0, 2.0, 3.0, 10.0])) == 2.5
    assert stats.mean_and_uncertainty(10.0, 30.0, 5) == (2.0, 0.0)  # llama.cpp gives no error for N <= 10


def _peaked_logits(
    rng: np.random.Generator, n: int, vocab: int, noise: float
) -> tuple[np.ndarray, np.ndarray]:
    base = rng.standard_normal((n, vocab)).astype(np.float32) * 3.0
    base[np.arange(n), rng.integers(0, vocab, n)] += 12.0  # peaked, like a trained LM
    quant = (base + rng.standard_normal((n, vocab)).astype(np.float32) * noise).astype(np.float32)
    return base, quant


def _kld64(q: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The textbook KLD per row in float64, the yardstick for both scoring paths."""
    lp, lq = scoring.log_softmax(b), scoring.log_softmax(q)
    return (np.exp(lp) * (lp - lq)).sum(axis=1)


@pytest.mark.parametrize(("noise", "shift"), [(0.01, 0.0), (0.3, 0.0), (0.3, 7.5), (2.0, -3.0)])
def test_exact_scores_match_float64_within_the_stated_error(noise: float, shift: float) -> None:
    """score_exact works in float32 with float64 sums; its docstring promises under 1e-7 per row."""
    rng = np.random.default_rng(5)
    b, q = _peaked_logits(rng, 200, 5000, noise)
    q = q + np.float32(shift)  # a constant offset changes nothing in the distribution
    targets = rng.integers(0, 5000, 200)
    got = scoring.score_exact(q, b, targets)
    want = _kld64(q, b)
    assert np.abs(got.kld - want).max() < 1e-7
    assert abs(got.kld.mean() - want.mean()) < 1e-9 + 1e-6 * want.mean()
    lq, lb = scoring.log_softmax(q), scoring.log_softmax(b)
    rows = np.arange(200)
    np.testing.assert_allclose(got.nll_q, -lq[rows, targets], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.nll_b, -lb[rows, targets], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got.same_top, q.argmax(1) == b.argmax(1))
    # Several variants at once give each one the scores it gets alone.
    many = scoring.score_exact_many({"a": q, "b": b}, b, targets)
    np.testing.assert_array_equal(many["a"].kld, got.kld)
    assert np.abs(many["b"].kld).max() < 1e-7


@pytest.mark.parametrize(("kmax", "tail"), [(1, 1e-4), (8, 1e-4), (64, 1e-4), (1000, 1e-4), (1000, 1e-9)])
def test_topk_bound_holds_against_full_vocabulary(kmax: int, tail: float) -> None:
    rng = np.random.default_rng(kmax)
    b, q = _peaked_logits(rng, 150, 1000, 0.3)
    targets = rng.integers(0, 1000, 150)
    top = scoring.compress(b, targets, kmax, tail)
    est = scoring.score_topk(q, targets, top)
    exact = _kld64(q, b)
    assert np.all(est.kld_lo <= exact + 1e-12) and np.all(exact <= est.kld_hi + 1e-12)
    # Everything but the KLD is exact from the compact reference.
    full = scoring.score_exact(q, b, targets)
    for f in ("nll_q", "nll_b", "dp", "same_top"):
        np.testing.assert_allclose(getattr(est, f), getattr(full, f), rtol=1e-6, atol=1e-7)
    # The estimate is far closer than its bound; the bound is what is guaranteed.
    assert abs(est.kld.mean() - exact.mean()) <= (est.kld_hi - est.kld_lo).mean()


def test_negligible_tail_makes_the_estimate_exact() -> None:
    rng = np.random.default_rng(11)
    b, q = _peaked_logits(rng, 100, 1000, 0.3)
    b[np.arange(100), b.argmax(1)] += 30.0  # everything but the top token below e^-30
    targets = rng.integers(0, 1000, 100)
    top = scoring.compress(b, targets, 1024, 1e-9)
    assert np.diff(top.offsets).max() <= 2 and top.tail_mass.max() <= 1e-9
    est, exact = scoring.score_topk(q, targets, top), _kld64(q, b)
    np.testing.assert_allclose(est.kld, exact, rtol=1e-6, atol=1e-9)
    assert (est.kld_hi - est.kld_lo).max() < 1e-6


def test_compress_keeps_the_fewest_tokens_for_the_tail_mass() -> None:
    rng = np.random.default_rng(3)
    b, _ = _peaked_logits(rng, 40, 500, 0.0)
    top = scoring.compress(b, np.zeros(40, int), 125, 1e-3)
    lp = scoring.log_softmax(b)
    for i in range(40):
        k = top.offsets[i + 1] - top.offsets[i]
        kept = top.ids[top.offsets[i] : top.offsets[i + 1]].astype(int)
        assert top.tail_mass[i] <= 1e-3 or k == 125  # a quarter of the vocabulary at most
        assert top.tail_mass[i] == pytest.approx(1 - np.exp(lp[i, kept]).sum(), abs=1e-12)
        if 1 < k < 125:  # one token fewer would leave too much out
            assert top.tail_mass[i] + np.exp(lp[i, kept[-1]]) > 1e-3
    assert top.ids.dtype == np.uint16 and top.logp.dtype == np.float32


def test_chunks_follow_llama_perplexity() -> None:
    ids = list(range(100, 100 + 1000))
    ch = reference.make_chunks(ids, 128, bos=1)
    assert ch.tokens.shape == (7, 128)  # 1000 // 128 whole chunks, the rest is dropped
    assert (ch.tokens[:, 0] == 1).all() and ch.tokens[1, 1] == ids[129]
    assert ch.targets.shape == (7, 128 - 1 - 64)  # positions 64..126 predict tokens 65..127
    assert ch.targets[0, 0] == ids[65] and ch.targets[0, -1] == ids[127]
    with pytest.raises(InputError, match="at least 2×ctx = 2048"):
        reference.make_chunks(ids, 1024, bos=1)


def test_calibration_overlap_is_refused(tmp_path) -> None:
    calib = tmp_path / "calibration.jsonl"
    doc = " ".join(f"słowo{i} jest tutaj" for i in range(200))
    calib.write_text(json.dumps({"text": doc}) + "\n", encoding="utf-8")
    copied = texts.EvalText("copy", "Wstęp. " + doc, "test")
    fresh = texts.EvalText("fresh", " ".join(f"inne{i} zdanie" for i in range(300)), "test")
    rep = texts.check_overlap([fresh], calib)
    assert rep["texts"]["fresh"]["shared"] == 0
    with pytest.raises(InputError, match=r"shares 99.\d% of its 8-word sequences"):
        texts.check_overlap([fresh, copied], calib)


def test_pareto_front_and_formatting() -> None:
    pts = [(4.0, 0.10), (5.0, 0.05), (6.0, 0.07), (8.0, 0.01), (9.0, 0.02)]
    assert pareto_front(pts) == [0, 1, 3]
    assert fmt_pm(0.012345, 0.00041) == "0.01235 ± 0.00041"
    assert fmt_pm(8.04e-5, 1.5e-7) == "(8.040 ± 0.015)e-05"


def _results(speed: bool = False) -> dict:
    model = {"layers": 32, "kv_heads": 8, "head_dim": 128}
    rows = lambda kld: {"all": {"kld": kld, "ppl": 5.0, "same_top": 0.9}}  # noqa: E731
    gib = 1 << 30
    return {"model": model, "texts": {"pl": {}, "en": {}}, "variants": [
        {"name": "FP16", "format": "fp16", "bytes": 14 * gib, "rows": rows(0.0)},
        {"name": "Q8_0", "format": "gguf", "bytes": int(7.5 * gib), "rows": rows(0.001)},
        {"name": "Q4_K_M", "format": "gguf", "bytes": int(4.1 * gib), "rows": rows(0.02)},
        {"name": "Q2_K", "format": "gguf", "bytes": int(2.7 * gib), "rows": rows(0.2)}]}  # fmt: skip


def test_recommend_counts_the_kv_cache() -> None:
    assert recommend.parse_size("4GiB") == 4 << 30 and recommend.parse_size("512 MiB") == 512 << 20
    assert recommend.parse_size("8GB") == 8_000_000_000
    with pytest.raises(InputError):
        recommend.parse_size("lots")
    # 32 layers × 8 KV heads × 128 dims × 2 (K and V) × 2 bytes = 128 KiB per token.
    assert recommend.kv_cache_bytes(_results()["model"], 4096) == 512 << 20
    r = recommend.recommend(_results(), 5 << 30, 4096)
    assert r["pick"] == "Q4_K_M" and "Q8_0 would be better" in r["why"]
    # At 32k tokens the 4 GiB KV cache pushes Q4_K_M out; Q2_K is what fits.
    assert recommend.recommend(_results(), 7 << 30, 32768)["pick"] == "Q2_K"
    with pytest.raises(InputError, match="nothing fits"):
        recommend.recommend(_results(), 2 << 30, 4096)


def test_fp16_engine_follows_the_formats_in_the_table() -> None:
    """auto computes FP16 in llama.cpp only when every variant is GGUF; one other format (or none)
    puts it in transformers, and an explicit choice is kept."""
    from types import SimpleNamespace

    from orlik.benchmarks.run import choose_engine
    from orlik.errors import InputError

    gguf, gptq = SimpleNamespace(format="gguf"), SimpleNamespace(format="gptq")
    assert choose_engine("auto", [gguf, gguf])[0] == "llama.cpp"
    assert choose_engine("auto", [gguf, gptq])[0] == "transformers"
    assert choose_engine("auto", [])[0] == "transformers"
    assert choose_engine("transformers", [gguf]) == ("transformers", "asked for (--fp16-engine)")
    with pytest.raises(InputError, match=r"valid: auto, transformers, llama\.cpp"):
        choose_engine("torch", [gguf])

"""`orlik bench` and `orlik recommend` end to end on the tiny model's GGUF variants: the report
files, the compact reference and its bound, and exit code 2 with one clear line on bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from orlik import corpus

CTX = 128


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 3,300 tokens of held-out Polish: 26 chunks of 128 tokens."""
    f = tmp_path_factory.mktemp("bench-text") / "heldout-pl.txt"
    f.write_text(corpus.heldout_text("pl")[:9000], encoding="utf-8")
    return f


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, bench_ggufs: dict[str, Path],
              text_file: Path) -> dict:  # fmt: skip
    """One exact run over Q8_0 and Q2_K (copies, so the model cards land in a private dir)."""
    from orlik.benchmarks.run import Options, bench

    vdir = tmp_path_factory.mktemp("bench-run") / "variants"
    for q in ("Q8_0", "Q2_K"):
        shutil.copytree(bench_ggufs["variants"] / q, vdir / q)
    out = vdir.parent / "reports"
    res = bench(tiny_checkpoint, [], variants_dir=vdir, out=out,
                opts=Options(ctx=CTX, text_files=[text_file], mode="exact", threads=1))  # fmt: skip
    return {"results": res, "out": out, "vdir": vdir}


def test_report_files_and_figures(bench_run: dict) -> None:
    out, res = bench_run["out"], bench_run["results"]
    names = [v["name"] for v in res["variants"]]
    assert names[0] == "FP16" and set(names[1:]) == {"Q8_0", "Q2_K"}
    rows = {v["name"]: v["rows"]["heldout-pl"] for v in res["variants"]}
    t = res["texts"]["heldout-pl"]
    assert t["chunks"] == t["tokens"] // CTX >= 10
    assert rows["Q8_0"]["tokens"] == t["scored_tokens"] == t["chunks"] * (CTX - 1 - CTX // 2)
    # Fewer bits, further from FP16: what a user reads off Table 8.
    assert 0 < rows["Q8_0"]["kld"] < rows["Q2_K"]["kld"]
    assert rows["Q8_0"]["dp_rms"] < rows["Q2_K"]["dp_rms"]
    assert rows["Q2_K"]["ppl_base"] == pytest.approx(rows["FP16"]["ppl"], rel=1e-9)
    assert rows["Q8_0"]["mode"] == "exact" and rows["Q8_0"]["kld_lo"] == rows["Q8_0"]["kld_hi"]

    md = (out / "table.md").read_text()
    assert (
        "| Variant | Format | Size [GiB] | PPL | ΔPPL | KLD | Mean Δp [%] | RMS Δp [%] | Same top p [%] |"
        in md
    )
    assert "| Q2_K | gguf |" in md and "KLD percentiles" in md
    lines = (out / "table.csv").read_text().splitlines()
    assert lines[0].startswith("text,variant,format,bytes,size_gib,bpw,ppl,ppl_err") and len(lines) == 4
    saved = json.loads((out / "results.json").read_text())
    assert saved["model"]["hash"] and saved["texts"]["heldout-pl"]["tokens_sha256"]
    assert "llama_cpp_python" in saved["tools"] and saved["settings"]["kld_mode"] == "exact"
    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_model_card_in_each_variant(bench_run: dict) -> None:
    card = (bench_run["vdir"] / "Q2_K" / "README.md").read_text()
    front = card.split("---")[1]
    for key in ("base_model:", "quantized_by: orlik", "license:", "tags:", "- gguf"):
        assert key in front
    assert "| Q2_K | gguf |" in card and "from llama_cpp import Llama" in card


def test_reference_is_compact_cached_and_bounds_the_exact_kld(bench_run: dict, tiny_checkpoint: Path,
                                                               text_file: Path) -> None:  # fmt: skip
    """The exact run wrote the compact reference; a topk run reuses it, and the exact KLD of every
    variant lies inside the bound it reports."""
    from orlik.benchmarks.run import Options, bench

    info = bench_run["results"]["texts"]["heldout-pl"]["reference"]
    scored = bench_run["results"]["texts"]["heldout-pl"]["scored_tokens"]
    assert info["reused"] is False
    # llama-perplexity keeps (n_vocab + 2) uint16 per scored token (+ 8 bytes header per chunk).
    assert info["bytes"] < scored * (2000 + 2) * 2
    res = bench(tiny_checkpoint, ["Q8_0", "Q2_K"], variants_dir=bench_run["vdir"], out=bench_run["out"],
                opts=Options(ctx=CTX, text_files=[text_file], mode="topk", threads=1, cards=False))  # fmt: skip
    assert res["texts"]["heldout-pl"]["reference"]["reused"] is True
    exact = {v["name"]: v["rows"]["heldout-pl"] for v in bench_run["results"]["variants"]}
    for v in res["variants"][1:]:
        r = v["rows"]["heldout-pl"]
        assert r["mode"] == "topk"
        assert r["kld_lo"] - 1e-12 <= exact[v["name"]]["kld"] <= r["kld_hi"] + 1e-12
        for k in ("ppl", "dp_rms", "same_top"):  # exact from the compact reference too
            assert r[k] == pytest.approx(exact[v["name"]][k], rel=1e-6)


def test_cli_prints_the_table(orlik_cli, bench_run: dict, tiny_checkpoint: Path, text_file: Path) -> None:
    code, out, err = orlik_cli("-q", "bench", str(tiny_checkpoint), "Q8_0", "--variants-dir",
                         str(bench_run["vdir"]), "--ctx", str(CTX), "--text", str(text_file), "--threads", "1",
                         "--out", str(bench_run["out"].parent / "cli-reports"), "--no-cards")  # fmt: skip
    assert code == 0, err
    assert "Table 8" in out and "Q8_0" in out and "Same top p [%]" in out


def test_recommend_from_the_report(orlik_cli, bench_run: dict) -> None:
    res = bench_run["results"]
    sizes = {v["name"]: v["bytes"] for v in res["variants"]}
    budget = sizes["Q8_0"] + 64 * 1024 * 8  # Q8_0 and a small KV cache fit, FP16 does not
    code, out, _ = orlik_cli(
        "recommend", "--memory", f"{budget}B", "--ctx", "16", "--reports", str(bench_run["out"])
    )
    assert code == 0 and out.startswith("Q8_0:") and "KV cache" in out
    code, _, err = orlik_cli("recommend", "--memory", "1MiB", "--reports", str(bench_run["out"]))
    assert code == 2 and "nothing fits" in err


# ---------------------------------------------------------------- bad input: exit 2, one line
def _bad(orlik_cli: Any, *args: str) -> str:
    code, _, err = orlik_cli("bench", *args)
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("orlik: error:")]
    assert len(lines) == 1
    return lines[0]


def test_missing_variant(
    orlik_cli, tiny_checkpoint: Path, bench_ggufs: dict[str, Path], text_file: Path
) -> None:
    msg = _bad(orlik_cli, str(tiny_checkpoint), "Q5_K_M", "--variants-dir", str(bench_ggufs["variants"]),
               "--text", str(text_file))  # fmt: skip
    assert "variant 'Q5_K_M' not found" in msg and "Q2_K" in msg


def test_corrupt_manifest(
    orlik_cli, tmp_path: Path, tiny_checkpoint: Path, bench_ggufs: dict[str, Path]
) -> None:
    bad = tmp_path / "Q8_0"
    shutil.copytree(bench_ggufs["variants"] / "Q8_0", bad)
    (bad / "variant.json").write_text('{"name": "Q8_0", "format": ')
    msg = _bad(orlik_cli, str(tiny_checkpoint), str(bad))
    assert "variant.json is corrupt" in msg


def test_text_shorter_than_two_contexts(orlik_cli, tmp_path: Path, tiny_checkpoint: Path,
                                        bench_ggufs: dict[str, Path]) -> None:  # fmt: skip
    short = tmp_path / "short.txt"
    short.write_text(corpus.heldout_text("en")[:1500], encoding="utf-8")
    msg = _bad(orlik_cli, str(tiny_checkpoint), str(bench_ggufs["variants"] / "Q8_0"), "--text", str(short),
               "--ctx", "512")  # fmt: skip
    assert "at least 2×ctx = 1024 are needed" in msg


def test_variant_with_another_tokenizer_is_scored_on_the_shared_ids(tmp_path: Path, tiny_checkpoint: Path,
        bench_ggufs: dict[str, Path], text_file: Path) -> None:  # fmt: skip
    """Q8_0's weights with a tokenizer that splits text differently: fed the reference's ids it scores
    exactly as Q8_0 does, and the table notes how often its own split differs."""
    from bench_helpers import make_variant, retokenized_copy

    from orlik.benchmarks.run import Options, bench

    vdir = tmp_path / "variants"
    shutil.copytree(bench_ggufs["variants"] / "Q8_0", vdir / "Q8_0")
    make_variant(
        retokenized_copy(bench_ggufs["Q8_0"], tmp_path / "retok.gguf"), "Q8_0-retok", vdir, tiny_checkpoint
    )
    res = bench(tiny_checkpoint, [], variants_dir=vdir, out=tmp_path / "reports",
                opts=Options(ctx=CTX, text_files=[text_file], mode="exact", threads=1, cards=False))  # fmt: skip
    by = {v["name"]: v for v in res["variants"]}
    assert by["Q8_0-retok"]["rows"]["heldout-pl"]["kld"] == by["Q8_0"]["rows"]["heldout-pl"]["kld"]
    assert by["Q8_0"]["token_mismatch"] == {"heldout-pl": 0.0}
    share = by["Q8_0-retok"]["token_mismatch"]["heldout-pl"]
    assert 0.01 < share <= 1.0
    md = (tmp_path / "reports" / "table.md").read_text()
    assert "Q8_0-retok is scored on the FP16 reference's token ids" in md and f"{100 * share:.2f}%" in md
    assert "- Q8_0 is scored" not in md


def test_text_overlapping_the_calibration_set(orlik_cli, tmp_path: Path, tiny_checkpoint: Path,
                                              bench_ggufs: dict[str, Path], tiny_calibration: Path) -> None:  # fmt: skip
    recs = [json.loads(ln) for ln in (tiny_calibration / "calibration.jsonl").read_text().splitlines()]
    leaked = tmp_path / "leaked.txt"
    leaked.write_text("\n\n".join(r["text"] for r in recs[:30]), encoding="utf-8")
    msg = _bad(orlik_cli, str(tiny_checkpoint), str(bench_ggufs["variants"] / "Q8_0"), "--text", str(leaked),
               "--calib", str(tiny_calibration))  # fmt: skip
    assert "with the calibration set" in msg


def test_speed_child_measures_a_variant(bench_ggufs: dict[str, Path], hf_ids: list[int]) -> None:
    from orlik.benchmarks import speed

    prompts = speed.prompts(hf_ids, 1, reps=2, n=64)
    got = speed.measure_all([("Q8_0", bench_ggufs["variants"] / "Q8_0")], prompts, gen_tokens=16, threads=1)[
        "Q8_0"
    ]
    assert "error" not in got, got
    assert got["runtime"] == "llama.cpp" and got["prompt_tokens"] == 64 and got["threads"] == 1
    assert got["prompt_tps"] > 0 and got["decode_tps"] > 0 and np.isfinite(got["ttft_s"])
    assert (
        got["peak_rss_load_bytes"] > got["rss_base_bytes"] > 0
        and got["peak_rss_gen_bytes"] > got["rss_base_bytes"]
    )


@pytest.fixture(scope="module")
def hf_ids(tiny_checkpoint: Path) -> list[int]:
    from orlik.checkpoint import Checkpoint

    tok = Checkpoint.open(tiny_checkpoint).load_tokenizer()
    return tok.encode(corpus.heldout_text("pl")[:4000], add_special_tokens=True)


def test_quantize_warns_when_the_gguf_tokenizer_differs(tmp_path: Path, tiny_checkpoint: Path,
        bench_ggufs: dict[str, Path], tiny_calibration: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """The check `orlik quantize` runs on the calibration text: silent when llama.cpp splits it as the
    checkpoint's tokenizer does, a warning with the share when it does not."""
    from bench_helpers import make_variant, retokenized_copy

    from orlik.checkpoint import Checkpoint
    from orlik.manifest import Variant
    from orlik.quantize import gguf_tokens

    ckpt, jsonl = Checkpoint.open(tiny_checkpoint), tiny_calibration / "calibration.jsonl"
    same = gguf_tokens.warn_if_different(ckpt, [Variant.load(bench_ggufs["variants"] / "Q8_0")], jsonl)
    assert same is not None and same < 0.01
    retok = make_variant(
        retokenized_copy(bench_ggufs["Q8_0"], tmp_path / "retok.gguf"), "retok", tmp_path, tiny_checkpoint
    )
    capsys.readouterr()
    share = gguf_tokens.warn_if_different(ckpt, [Variant.load(retok)], jsonl)
    assert share is not None and share > 0.01
    err = capsys.readouterr().err
    assert "splits the calibration text differently" in err and f"{100 * share:.2f}%" in err


def test_dry_run_prints_the_plan_and_writes_nothing(orlik_cli: Any, tmp_path: Path, tiny_checkpoint: Path,
                                                    bench_ggufs: dict[str, Path], text_file: Path) -> None:  # fmt: skip
    r = orlik_cli("--json", "bench", tiny_checkpoint, "--variants-dir", bench_ggufs["variants"], "--text", text_file,
                  "--ctx", CTX, "--threads", "2", "--out", tmp_path / "reports", "--dry-run")  # fmt: skip
    assert r.code == 0, r.err
    plan = json.loads(r.out)
    assert [v["name"] for v in plan["variants"]] == ["Q2_K", "Q4_K_M", "Q8_0"]
    assert plan["fp16_engine"] == "llama.cpp" and plan["fp16_engine_why"] == "every variant is GGUF"
    assert plan["kld_mode"] in ("exact", "topk") and plan["ctx"] == CTX and plan["threads"]["fp16"] >= 1
    assert not (tmp_path / "reports").exists()

"""`orlik data quality`: >= 100 stylometric features, an XGBoost classifier trained on the labelled
set derived from the corpus and scored on its held-out documents, and labels that `orlik train sft`
reads as WICEL weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from data_helpers import cli

from orlik import corpus
from orlik.training.data import stylometry


def test_features_are_many_and_finite() -> None:
    assert len(stylometry.FEATURE_NAMES) >= 100
    assert stylometry.pos_available(), "morfeusz2 (orlik[data]) gives the part-of-speech rates"
    for text in ("", "słowo", "123 456", "!!!\n\n\n", corpus.documents(lang="pl")[0].text):
        f = stylometry.features(text)
        assert list(f) == stylometry.FEATURE_NAMES
        assert all(math.isfinite(v) for v in f.values()), text
    pl = stylometry.features(corpus.documents(lang="pl")[0].text)
    assert pl["pos_noun"] > 0.15 and pl["pos_unknown"] < 0.1 and pl["pl_diacritic_ratio"] > 0.02


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("quality") / "model"
    r = cli("-q", "--json", "data", "quality", "train", "--out", out, "--rounds", "40", "--threads", "1")
    assert r.code == 0, r.err
    return out, json.loads((out / "quality.json").read_text())


def test_heldout_accuracy_and_report(model: tuple[Path, dict]) -> None:
    out, rep = model
    assert rep["accuracy"] >= 0.85, rep["confusion"]
    assert sum(map(sum, rep["confusion"])) == rep["heldout_examples"] > 0
    assert rep["features"] >= 100 and len(rep["top_features"]) >= 10
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "quality.md").read_text()
    assert "Confusion" in md and "Top features" in md
    # p(HIGH) >= 0.9 implies HIGH is the argmax: the cut-off only ever removes HIGH labels.
    high_argmax = sum(row[0] for row in rep["confusion"])
    high_cut = sum(row[0] for row in rep["confusion_with_cutoff"])
    assert 0 < high_cut <= high_argmax


def test_scores_feed_sft_quality_weights(model: tuple[Path, dict], tmp_path: Path) -> None:
    from orlik.training import chats

    out, _ = model
    good = corpus.chats(split="train")[:6]
    spam = {"messages": [{"role": "user", "content": "Co polecasz?"},
                         {"role": "assistant", "content": "PROMOCJA!!! KUP TERAZ -70%!!! www.okazje24.pl "
                          "KLIKNIJ!!! kup kup tanio tanio tanio >>> bit.ly/x !!! PROMOCJA!!!"}]}  # fmt: skip
    src = tmp_path / "chats.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [*good, spam]), encoding="utf-8")
    r = cli("-q", "data", "quality", "score", src, "--model", out, "--out", tmp_path / "scored.jsonl")
    assert r.code == 0, r.err
    scored = [json.loads(x) for x in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert len(scored) == 7 and all(s["quality"] in ("high", "medium", "low") for s in scored)
    assert all(abs(sum(s["quality_p"].values()) - 1) < 1e-3 for s in scored)
    # Pure spam is not among the training degradations (spam there is interleaved with prose), so only
    # its ranking is asserted: it is the least likely HIGH and not labelled HIGH.
    assert scored[-1]["quality"] != "high"
    assert scored[-1]["quality_p"]["high"] == min(s["quality_p"]["high"] for s in scored)
    assert [s["messages"] for s in scored] == [x["messages"] for x in [*good, spam]]
    # The next stage reads the labels unchanged: SFT's sample weights come from them.
    loaded = chats.load_chats(tmp_path / "scored.jsonl")
    assert [c["weight"] for c in loaded] == [chats.QUALITY_WEIGHTS[s["quality"]] for s in scored]
    # A cut-off of 1.0 leaves no document HIGH; --only-high then writes nothing but still succeeds.
    r = cli("-q", "data", "quality", "score", src, "--model", out, "--out", tmp_path / "none.jsonl",
            "--high-cutoff", "1.0", "--only-high")  # fmt: skip
    assert r.code == 0 and (tmp_path / "none.jsonl").read_text() == ""


def test_bad_input_exit_2(model: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = model
    src = tmp_path / "w.jsonl"
    src.write_text(json.dumps({"text": "Tekst.", "weight": 2.0}) + "\n")
    for args, words in (([src, "--model", tmp_path], "no quality model"),
                        ([src, "--model", out], "'weight'"),
                        ([src, "--model", out, "--high-cutoff", "0"], "--high-cutoff")):  # fmt: skip
        r = cli("-q", "data", "quality", "score", *args, "--out", tmp_path / "o.jsonl")
        assert r.code == 2 and r.err.count("\n") == 1 and words in r.err, r.err
    assert not (tmp_path / "o.jsonl").exists()

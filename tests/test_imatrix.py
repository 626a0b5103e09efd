"""`orlik calibrate imatrix`: llama-imatrix's GGUF format with orlik's provenance, language
filtering, reuse on rerun, shape checks against a model, and bad input with exit code 2."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from orlik import gguf_read, llamacpp
from orlik.calibration import imatrix
from orlik.checkpoint import Checkpoint
from orlik.errors import InputError
from orlik.fsutil import sha256_file
from orlik.gguf_convert import f16_gguf

pytestmark = pytest.mark.usefixtures("gguf_cache")


def _records(calib: Path) -> list[dict]:
    return [json.loads(x) for x in (calib / "calibration.jsonl").read_text(encoding="utf-8").splitlines()]


def test_imatrix_is_llama_cpp_format_with_provenance(
    tiny_imatrix: Path, tiny_calibration: Path, tiny_checkpoint: Path
) -> None:
    import gguf

    r = gguf.GGUFReader(str(tiny_imatrix))
    assert r.fields["general.type"].contents() == "imatrix"
    assert r.fields["imatrix.chunk_size"].contents() == 128
    assert r.fields["imatrix.chunk_count"].contents() == 8
    calib_sha = sha256_file(tiny_calibration / "calibration.jsonl")
    assert r.fields[gguf_read.KEY_CALIB_SHA].contents() == calib_sha
    assert r.fields[gguf_read.KEY_CALIB_LANG].contents() == "mixed"
    assert r.fields[gguf_read.KEY_CALIB_TOKENS].contents() == sum(
        x["tokens"] for x in _records(tiny_calibration)
    )
    assert r.fields[gguf_read.KEY_BASE_SHA].contents() == Checkpoint.open(tiny_checkpoint).hash
    # Every weight matrix of every block has an entry of the right width.
    ckpt = Checkpoint.open(tiny_checkpoint)
    im = gguf_read.check_imatrix(tiny_imatrix, f16_gguf(ckpt))
    layers = ckpt.config["num_hidden_layers"]
    assert len(im.entries) == 7 * layers
    assert im.entries["blk.0.ffn_down.weight"] == (ckpt.config["intermediate_size"], 1)
    card = json.loads(imatrix.card_path(tiny_imatrix).read_text())
    assert card["sha256"] == sha256_file(tiny_imatrix) and card["calibration_sha256"] == calib_sha
    assert card["chunk_size"] == 128 and card["tokens_processed"] == 8 * 128
    assert card["perplexity_f16"] > 1


def test_rerun_reuses_and_force_recomputes(
    tiny_imatrix: Path, tiny_checkpoint: Path, tiny_calibration: Path
) -> None:
    mtime = tiny_imatrix.stat().st_mtime_ns
    card = imatrix.compute(tiny_checkpoint, tiny_calibration, lang="mixed", chunk=128, max_chunks=8)
    assert card.get("reused") and tiny_imatrix.stat().st_mtime_ns == mtime
    # A card that no longer matches the file (e.g. the file was replaced) is not trusted.
    cp = imatrix.card_path(tiny_imatrix)
    good = cp.read_text()
    bad = json.loads(good)
    bad["sha256"] = "0" * 64
    cp.write_text(json.dumps(bad))
    try:
        assert imatrix._reusable(tiny_imatrix, {k: bad[k] for k in ("lang", "chunk_size")}) is None
    finally:
        cp.write_text(good)


def test_language_filter(tiny_checkpoint: Path, tiny_calibration: Path, tmp_path: Path) -> None:
    out = tmp_path / "imatrix-pl.gguf"
    card = imatrix.compute(tiny_checkpoint, tiny_calibration, lang="pl", chunk=64, max_chunks=2, out=out)
    im = gguf_read.read_imatrix(out)
    assert im.orlik[gguf_read.KEY_CALIB_LANG] == "pl" and im.chunk_count == 2 and im.chunk_size == 64
    pl = [x for x in _records(tiny_calibration) if x["lang"] == "pl"]
    assert card["calibration"]["samples"] == len(pl)
    assert im.orlik[gguf_read.KEY_CALIB_TOKENS] == sum(x["tokens"] for x in pl)
    assert "lang:pl" in im.datasets[0]


def test_scratch_space_is_beside_the_output_and_a_killed_runs_is_removed(
    tiny_checkpoint: Path, tiny_calibration: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess
    import tempfile

    from orlik import owner

    tmp = tmp_path / "tmp"  # nothing may land in the system temp dir, where a kill -9 would leak it
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    out = tmp_path / "im" / "imatrix-en.gguf"
    out.parent.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = out.with_name(f".{out.name}.work-{gone.pid}.{owner.host_tag()}")  # as a kill -9 leaves it
    stale.mkdir()
    owner.write_marker(stale, "scratch", "partial")
    (stale / "imatrix-raw.gguf").write_bytes(b"half")
    (out.parent / f".{out.name}.partial-{gone.pid}.{owner.host_tag()}").write_bytes(b"half")
    imatrix.compute(tiny_checkpoint, tiny_calibration, lang="en", chunk=64, max_chunks=2, out=out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["imatrix-en.card.json", "imatrix-en.gguf"]
    assert list(tmp.iterdir()) == []


def test_legacy_dat_imatrix_reads_the_same(tiny_imatrix: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    dat = tmp_path / "imatrix.dat"
    f16 = f16_gguf(Checkpoint.open(tiny_checkpoint))
    rc, log = llamacpp.run_tool("llama-imatrix", ["-m", str(f16), "--in-file", str(tiny_imatrix),
                                                  "--output-format", "dat", "-o", str(dat)])  # fmt: skip
    assert rc == 0 and dat.is_file(), log[-400:]
    assert gguf_read.read_imatrix(dat).entries == gguf_read.read_imatrix(tiny_imatrix).entries


def test_imatrix_from_another_model_is_a_shape_mismatch(tiny_imatrix: Path, tmp_path: Path) -> None:
    """An imatrix whose widths differ from the model's: here the tiny model's, checked against a
    GGUF with every block matrix twice as wide (written with the gguf package)."""
    import gguf
    import numpy as np

    model = tmp_path / "wide.gguf"
    w = gguf.GGUFWriter(str(model), "llama")
    for name, (ne0, _) in gguf_read.read_imatrix(tiny_imatrix).entries.items():
        w.add_tensor(name, np.zeros((4, 2 * ne0), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(
        InputError, match=r"shape mismatch: blk\.\d+\.\w+\.weight has \d+x1 values, the model needs"
    ):
        gguf_read.check_imatrix(tiny_imatrix, model)


def test_bad_input(tiny_checkpoint: Path, tiny_calibration: Path, tmp_path: Path, orlik_cli: Any) -> None:
    r = orlik_cli("calibrate", "imatrix", tiny_checkpoint, "--calib", tmp_path / "none")
    assert r.code == 2 and "does not exist" in r.err
    small = tmp_path / "small"
    small.mkdir()
    (small / "calibration.jsonl").write_text(
        json.dumps({"text": "Ala ma kota.", "lang": "pl", "tokens": 5}) + "\n"
    )
    with pytest.raises(InputError, match=r"has 5 tokens .*at least 2 x --chunk = 1024"):
        imatrix.compute(tiny_checkpoint, small, chunk=512)
    with pytest.raises(InputError, match="no records with lang 'en'"):
        imatrix.compute(tiny_checkpoint, small, lang="en")
    (small / "calibration.jsonl").write_text("{not json\n")
    r = orlik_cli("calibrate", "imatrix", tiny_checkpoint, "--calib", small)
    assert r.code == 2 and "calibration.jsonl:1: invalid JSON" in r.err
    assert not any(p.suffix == ".gguf" for p in small.iterdir())
    (small / "calibration.jsonl").write_bytes(b"\xff\xfe")
    with pytest.raises(InputError, match="not UTF-8"):
        imatrix.load_text(small, "mixed")


def test_cli_writes_beside_the_calibration_set(tiny_checkpoint: Path, tiny_calibration: Path, tmp_path: Path,
                                               orlik_cli: Any) -> None:  # fmt: skip
    calib = tmp_path / "calib"
    calib.mkdir()
    os.link(tiny_calibration / "calibration.jsonl", calib / "calibration.jsonl")
    r = orlik_cli("--json", "calibrate", "imatrix", tiny_checkpoint, "--calib", calib, "--lang", "en",
                  "--chunk", "64", "--chunks", "2")  # fmt: skip
    assert r.code == 0, r.err
    res = json.loads(r.out)
    assert res["out"] == str(calib / "imatrix-en.gguf") and res["chunks"] == 2 and not res["reused"]
    assert (calib / "imatrix-en.card.json").is_file()
    assert sorted(p.name for p in calib.iterdir()) == [
        "calibration.jsonl",
        "imatrix-en.card.json",
        "imatrix-en.gguf",
    ]


def test_quantize_computes_a_missing_imatrix_from_calib(
    tiny_checkpoint: Path,
    tiny_calibration: Path,
    tiny_imatrix: Path,
    tmp_path: Path,
    monkeypatch,
    orlik_cli: Any,
) -> None:
    calib = tmp_path / "calib"
    calib.mkdir()
    os.link(tiny_calibration / "calibration.jsonl", calib / "calibration.jsonl")
    calls = []

    def compute(model, where, **kw):  # stands in for the slow full-set run; same output file
        calls.append((Path(where), kw))
        (Path(where) / "imatrix.gguf").write_bytes(tiny_imatrix.read_bytes())
        return {}

    monkeypatch.setattr(imatrix, "compute", compute)
    r = orlik_cli("--json", "quantize", tiny_checkpoint, "--recipe", "Q8_0-imat", "--calib", calib,
                  "--out", tmp_path / "v")  # fmt: skip
    assert r.code == 0 and calls == [(calib, {"lang": "mixed"})], r.err
    (row,) = json.loads(r.out)["variants"]
    v = json.loads((Path(row["path"]) / "variant.json").read_text())
    assert v["imatrix_hash"] == sha256_file(calib / "imatrix.gguf")
    assert v["calibration_hash"] == sha256_file(tiny_calibration / "calibration.jsonl")

"""`orlik pipeline CONFIG.toml`: calibrate -> imatrix -> quantize -> bench from one file, and a rerun
after an interrupted step redoes only what is missing."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orlik import corpus

CONFIG = """
model = "{model}"

[calibrate]
tokens = 3000
chat = false
parallel = false

[imatrix]
chunk = 128
chunks = 4

[quantize]
recipes = ["Q8_0", "Q4_K_M-imat"]

[bench]
texts = ["{text}"]
ctx = 128
threads = 1
cards = false
"""


def test_bad_configs_are_one_line_and_exit_2(tmp_path: Path, orlik_cli: Callable[..., Any]) -> None:
    cases = {
        'model = "m"\n[quantize]\nrecipes = ["Q8_0"]\nbogus = 1\n': "unknown key 'bogus'",
        'model = "m"\n[bench]\nctx = 64\n': "[quantize] recipes = [...] is required",
        '[quantize]\nrecipes = ["Q8_0"]\n': "`model` (the FP16 checkpoint folder) is required",
        'model = "m"\n[quantize\n': "is not valid TOML",
        'model = "m"\n[quantize]\nrecipes = ["Q8_0"]\n[eval]\nvariant = ["Q8_0"]\n': "[eval] has unknown key 'variant'",
    }
    for text, msg in cases.items():
        cfg = tmp_path / "p.toml"
        cfg.write_text(text, encoding="utf-8")
        r = orlik_cli("pipeline", cfg)
        assert r.code == 2 and msg in r.err and len(r.err.strip().splitlines()) == 1, (text, r.err)
    r = orlik_cli("pipeline", tmp_path / "none.toml")
    assert r.code == 2 and "cannot read the pipeline config" in r.err


@pytest.mark.usefixtures("gguf_cache")
def test_resumes_after_an_interrupted_step(
    tiny_checkpoint: Path, tmp_path: Path, orlik_cli: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "bielik"
    shutil.copytree(tiny_checkpoint, model)
    text = tmp_path / "eval.txt"
    text.write_text(corpus.heldout_text("pl")[:4000], encoding="utf-8")
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text(CONFIG.format(model=model, text=text), encoding="utf-8")
    work = tmp_path / "bielik-orlik"

    def interrupted(*args: Any, **kw: Any) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # Ctrl-C while bench runs
        m.setattr("orlik.benchmarks.run.bench", interrupted)
        r = orlik_cli("--json", "pipeline", cfg)
    assert r.code == 130 and "orlik: aborted" in r.err  # click turns Ctrl-C into Abort
    assert (work / "variants" / "Q4_K_M-imat" / "variant.json").is_file()
    assert not (work / "reports" / "results.json").exists()

    r = orlik_cli("--json", "pipeline", cfg)
    assert r.code == 0, r.err
    steps = json.loads(r.out)["steps"]
    assert {k: v["status"] for k, v in steps.items()} == {
        "calibrate": "skipped", "imatrix": "skipped", "quantize": "skipped", "bench": "done", "eval": "off"}  # fmt: skip
    table = (work / "reports" / "table.md").read_text()
    assert "| Q4_K_M-imat | gguf |" in table and "| Q8_0 | gguf |" in table

    # A change reruns only the steps it touches: a damaged variant is rebuilt, the report redone.
    (work / "variants" / "Q8_0" / "model.gguf").write_bytes(b"damaged")
    r = orlik_cli("--json", "pipeline", cfg)
    steps = json.loads(r.out)["steps"]
    assert r.code == 0 and [steps[k]["status"] for k in ("calibrate", "quantize", "bench")] == [
        "skipped",
        "done",
        "done",
    ]
    r = orlik_cli("--json", "pipeline", cfg, "--set", "bench.ctx=64")
    assert r.code == 0 and json.loads(r.out)["steps"]["bench"]["status"] == "done"
    r = orlik_cli("--json", "pipeline", cfg, "--set", "bench.ctx=64")
    assert r.code == 0 and {v["status"] for v in json.loads(r.out)["steps"].values()} == {"skipped", "off"}
    r = orlik_cli(
        "pipeline", cfg, "--set", "bench.ctx=64"
    )  # everything skipped: the kept table is still shown
    assert r.code == 0 and "bench      skipped" in r.out and "Q4_K_M-imat" in r.out and "KLD" in r.out

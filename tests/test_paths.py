"""Where a checkpoint's calibration set, variants and reports go when no --out is given: one rule
(orlik.paths) for every verb, so `orlik quantize M` then `orlik bench M` find each other's files."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from orlik import corpus, paths


def test_run_layout_and_any_other_folder(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "tiny" / "fp16"
    assert paths.variants_dir(run) == tmp_path / "runs" / "tiny" / "variants"
    assert paths.calib_dir(run) == tmp_path / "runs" / "tiny" / "calib"
    assert paths.model_name(run) == "tiny"
    own = tmp_path / "models" / "bielik"
    # Beside the user's folder, never inside it, and never shared with another model in models/.
    assert paths.work_dir(own) == tmp_path / "models" / "bielik-orlik"
    assert paths.reports_dir(own) == tmp_path / "models" / "bielik-orlik" / "reports"
    assert paths.model_name(own) == "bielik"
    assert paths.work_dir(Path(".")).name == f"{Path.cwd().name}-orlik"


def test_every_verb_help_names_the_same_default(orlik_cli: Callable[..., tuple[int, str, str]]) -> None:
    for verb, kind in (
        (("quantize",), "variants"),
        (("bench",), "reports"),
        (("calibrate", "build"), "calib"),
    ):
        code, out, _ = orlik_cli(*verb, "--help")
        assert code == 0 and f"MODEL-orlik/{kind}]" in "".join(out.split()), verb  # wrapped at any hyphen


@pytest.mark.usefixtures("gguf_cache")
def test_own_checkpoint_steps_without_out_flags(
    tiny_checkpoint: Path, tmp_path: Path, orlik_cli: Callable[..., tuple[int, str, str]]
) -> None:
    """The README's "your own checkpoint" steps, no --out/--calib/--variants-dir, on a folder not named fp16."""
    model = tmp_path / "models" / "bielik"
    shutil.copytree(tiny_checkpoint, model)
    before = sorted(p.name for p in model.iterdir())
    text = tmp_path / "eval.txt"
    text.write_text(corpus.heldout_text("pl")[:4000], encoding="utf-8")

    code, _, err = orlik_cli("calibrate", "build", model, "--tokens", "3000", "--no-chat", "--no-parallel")
    assert code == 0, err
    code, _, err = orlik_cli("calibrate", "imatrix", model, "--chunk", "128", "--chunks", "4")
    assert code == 0, err
    code, _, err = orlik_cli("quantize", model, "--recipe", "Q8_0", "--recipe", "Q4_K_M-imat")
    assert code == 0, err
    code, out, err = orlik_cli("--json", "bench", model, "--text", text, "--ctx", "128", "--threads", "1")
    assert code == 0, err

    work = tmp_path / "models" / "bielik-orlik"
    res = json.loads(out)
    assert Path(res["out"]) == work / "reports" and (work / "reports" / "table.md").is_file()
    assert [v["name"] for v in res["variants"]] == ["FP16", "Q8_0", "Q4_K_M-imat"]
    # quantize found calibrate's imatrix, and bench found quantize's variants and calibrate's set.
    imat = json.loads((work / "variants" / "Q4_K_M-imat" / "variant.json").read_text())
    assert imat["imatrix_hash"]
    assert json.loads((work / "reports" / "results.json").read_text())["overlap"] is not None
    assert sorted(p.name for p in model.iterdir()) == before  # nothing written into the user's folder

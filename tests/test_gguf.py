"""GGUF backend: F16 conversion, llama-quantize per recipe (with orlik's imatrix and overrides),
variants that llama-cpp-python runs, reruns that skip or redo, and bad input with exit code 2."""

from __future__ import annotations

import errno
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from orlik import fsutil, gguf_read, llamacpp
from orlik.checkpoint import Checkpoint
from orlik.errors import CheckpointError, InputError, OutputError, UnknownNameError
from orlik.gguf_convert import f16_gguf
from orlik.manifest import Variant
from orlik.quantize import run
from orlik.quantize.backends.gguf import LOG_FILE, MODEL_FILE, glob_to_regex
from orlik.quantize.recipe import GGUF_REQUIRES_IMATRIX, GGUF_TYPES, TABLE8, Recipe

pytestmark = pytest.mark.usefixtures("gguf_cache")


@pytest.fixture(scope="module")
def tiny_f16(gguf_cache: Path, tiny_checkpoint: Path) -> Path:
    return f16_gguf(Checkpoint.open(tiny_checkpoint))


@pytest.fixture(scope="module")
def table8(
    tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, tiny_imatrix: Path
) -> list[run.Outcome]:
    out = tmp_path_factory.mktemp("variants")
    calib = run.calibration_for(imatrix=tiny_imatrix)
    return run.quantize_all(tiny_checkpoint, ["bielik-table8"], out, calib=calib)


def test_f16_conversion_is_cached_by_checkpoint_hash(
    tiny_checkpoint: Path, tiny_f16: Path, monkeypatch
) -> None:
    ckpt = Checkpoint.open(tiny_checkpoint)
    assert tiny_f16.name == "model-f16.gguf" and tiny_f16.parent.name == ckpt.hash
    s = gguf_read.summarize(tiny_f16)
    assert {t.type for t in s.tensors} == {"F16", "F32"}
    assert s.n_params == pytest.approx(ckpt.weights_bytes / 2, rel=0.01)

    def no_converter(*a, **k):
        raise AssertionError("the converter ran again")

    monkeypatch.setattr(subprocess, "run", no_converter)
    assert f16_gguf(Checkpoint.open(tiny_checkpoint)) == tiny_f16


def test_unconvertible_architecture_names_it(checkpoint_copy: Path) -> None:
    cfg_path = checkpoint_copy / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(model_type="orlik_fake", architectures=["OrlikFakeForCausalLM"])
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError, match=r"cannot convert architecture OrlikFakeForCausalLM.*orlik_fake"
    ):
        f16_gguf(Checkpoint.open(checkpoint_copy))
    assert not list((fsutil.cache_root() / "gguf").glob(f"{Checkpoint.open(checkpoint_copy).hash}/*.gguf"))


def test_requires_imatrix_list_matches_llama_quantize(tiny_f16: Path) -> None:
    """GGUF_REQUIRES_IMATRIX is exactly the set llama-quantize --dry-run says needs an imatrix."""
    needs = set()
    for t in GGUF_TYPES:
        if t in ("F16", "BF16"):
            continue
        rc, log = llamacpp.run_tool("llama-quantize", ["--dry-run", str(tiny_f16), t])
        assert rc == 0, log[-500:]
        if "will require an imatrix" in log:
            needs.add(t)
    assert needs == set(GGUF_REQUIRES_IMATRIX)


def test_iq_type_without_imatrix_is_refused(tiny_checkpoint: Path, tmp_path: Path, orlik_cli: Any) -> None:
    out = tmp_path / "variants"
    r = orlik_cli("quantize", tiny_checkpoint, "--recipe", "IQ2_XXS", "--out", out)
    assert r.code == 2
    err = r.err
    assert "IQ2_XXS needs an importance matrix" in err and "IQ2_XXS-imat" in err
    assert not out.exists() or not any(out.iterdir())
    # An -imat recipe with no imatrix at all is refused the same way.
    r = orlik_cli("quantize", tiny_checkpoint, "--recipe", "Q4_K_M-imat", "--out", out)
    assert r.code == 2 and "none was given" in r.err


def test_unknown_types_list_the_valid_ones(tiny_checkpoint: Path, tmp_path: Path, orlik_cli: Any) -> None:
    with pytest.raises(UnknownNameError, match=r"unknown GGUF type 'Q4_K_X'.*Q4_K_M"):
        Recipe.from_name("Q4_K_X")
    r = orlik_cli("quantize", tiny_checkpoint, "--recipe", "Q4_K_M", "--out", tmp_path,
                  "--type-override", "blk.*.ffn_down.weight=Q4_K_M")  # fmt: skip
    err = r.err
    assert r.code == 2 and "unknown tensor type" in err and "valid:" in err and "Q6_K" in err
    assert err.count("\n") == 1


def test_glob_to_regex_matches_whole_names() -> None:
    rx = glob_to_regex("blk.*.ffn_down.weight")
    assert re.search(rx, "blk.11.ffn_down.weight") and not re.search(rx, "blk.1.ffn_down_exps.weight")
    assert not re.search(glob_to_regex("blk.1.*"), "blk.11.attn_q.weight")
    assert re.search(glob_to_regex("blk.[0-2].attn_?.weight"), "blk.2.attn_q.weight")
    assert rx == rx.lower()  # llama-quantize lower-cases patterns; no letter escapes allowed


def test_table8_variants_load_and_generate(table8: list[run.Outcome]) -> None:
    import llama_cpp

    names = [o.variant.name for o in table8]
    assert names == [n for t in TABLE8 for n in (t, f"{t}-imat")] + ["IQ2_XXS-imat"]
    by = {o.variant.name: o.variant for o in table8}
    for v in by.values():
        assert v.verify() == [] and v.bytes == (v.path / MODEL_FILE).stat().st_size
        # orlik's bpw (from the tensors gguf reads back) is llama-quantize's own reported BPW.
        assert v.bpw == pytest.approx(v.extra["llama_quantize_bpw"], abs=0.006)
        assert (v.imatrix_hash is not None) == v.name.endswith("-imat")
        assert (v.calibration_hash is not None) == v.name.endswith("-imat")
        llm = llama_cpp.Llama(str(v.main_file()), n_ctx=128, n_threads=2, verbose=False, seed=0)
        # EOS barred: a tiny model may end at once, and this checks that the variant generates.
        res = llm.create_completion("Dzień dobry,", max_tokens=6, temperature=0.0,
                                    logit_bias={llm.token_eos(): float("-inf")})  # fmt: skip
        assert res["usage"]["completion_tokens"] >= 1 and res["choices"][0]["text"], v.name
        del llm
    bpws = [by[t].bpw for t in TABLE8] + [by["IQ2_XXS-imat"].bpw]
    assert bpws == sorted(bpws, reverse=True), bpws
    assert by["IQ2_XXS-imat"].extra["tensor_types"].get("IQ2_XXS", 0) >= 12
    assert by["Q4_K_M"].extra["tensor_types"]["Q4_K"] > by["Q4_K_M"].extra["tensor_types"].get("Q6_K", 0)
    # The imatrix changes the weights llama-quantize picks, not the types.
    assert by["Q2_K"].extra["tensor_types"] == by["Q2_K-imat"].extra["tensor_types"]
    assert by["Q2_K"].files[MODEL_FILE] != by["Q2_K-imat"].files[MODEL_FILE]


def _log_types(log: str, source: gguf_read.GGUFSummary) -> dict[str, str]:
    """Per-tensor types as llama-quantize reports deciding them ("converting to q4_K")."""
    types = {}
    for m in re.finditer(r"\]\s+(\S+)\s+- \[[^\]]*\], type =\s+(\w+),(.*?)(?=\n\[|\Z)", log, re.S):
        name, src, rest = m.groups()
        conv = re.search(r"converting to (\w+)", rest)
        types[name] = (conv.group(1) if conv else src).upper()
    assert set(types) == {t.name for t in source.tensors}
    return types


def test_types_with_orlik_imatrix_and_overrides_match_gguf(
    tiny_checkpoint: Path, tiny_f16: Path, tiny_imatrix: Path, tmp_path: Path
) -> None:
    recipe = Recipe(name="mix", format="gguf", qtype="Q3_K_M", imatrix=True, calibration=True,
                    output_type="Q8_0", embedding_type="Q4_K",
                    overrides=(("blk.*.ffn_down.weight", "Q6_K"), ("blk.0.attn_?.weight", "Q5_K")))  # fmt: skip
    (v,) = run.quantize(tiny_checkpoint, [recipe], tmp_path, calib=run.calibration_for(imatrix=tiny_imatrix))
    got = gguf_read.summarize(
        v.main_file(), keys=("quantize.imatrix.dataset", "quantize.imatrix.entries_count")
    )
    logged = _log_types((v.path / LOG_FILE).read_text(), gguf_read.summarize(tiny_f16))
    assert got.types() == logged == v.extra["tensor_type_by_name"]
    assert got.types()["output.weight"] == "Q8_0" and got.types()["token_embd.weight"] == "Q4_K"
    assert all(t == "Q6_K" for n, t in got.types().items() if n.endswith("ffn_down.weight"))
    assert got.types()["blk.0.attn_q.weight"] == "Q5_K" and got.types()["blk.1.attn_q.weight"] != "Q5_K"
    # llama-quantize read orlik's imatrix: its provenance label travels into the variant.
    im = gguf_read.read_imatrix(tiny_imatrix)
    assert got.metadata["quantize.imatrix.dataset"] == im.datasets[0]
    assert im.calibration_hash and im.calibration_hash[:16] in im.datasets[0]
    assert got.metadata["quantize.imatrix.entries_count"] == len(im.entries)
    assert v.calibration_hash == im.calibration_hash


@pytest.mark.slow
def test_tied_embeddings_take_the_output_type(make_checkpoint, tmp_path: Path) -> None:
    import llama_cpp

    qwen = make_checkpoint("qwen2")
    (v,) = run.quantize(qwen, [Recipe.from_dict({"format": "gguf", "qtype": "Q4_K_M", "output_type": "Q8_0"})],
                        tmp_path)  # fmt: skip
    types = v.extra["tensor_type_by_name"]
    assert "output.weight" not in types and types["token_embd.weight"] == "Q8_0"
    llm = llama_cpp.Llama(str(v.main_file()), n_ctx=128, n_threads=2, verbose=False)
    assert llm.create_completion("Hej", max_tokens=4, temperature=0.0)["usage"]["completion_tokens"] >= 1


def test_rerun_skips_verified_and_redoes_tampered(
    tiny_checkpoint: Path, tiny_f16: Path, tmp_path: Path
) -> None:
    first = run.quantize_all(tiny_checkpoint, ["Q8_0", "Q4_0"], tmp_path)
    assert [o.status for o in first] == ["built", "built"]
    again = run.quantize_all(tiny_checkpoint, ["Q8_0", "Q4_0"], tmp_path)
    assert [o.status for o in again] == ["skipped", "skipped"]
    model = tmp_path / "Q4_0" / MODEL_FILE
    data = bytearray(model.read_bytes())
    data[-100] ^= 0xFF
    model.write_bytes(bytes(data))
    (tmp_path / "Q8_0.partial").mkdir()  # what a killed run leaves behind
    third = run.quantize_all(tiny_checkpoint, ["Q8_0", "Q4_0"], tmp_path)
    assert [o.status for o in third] == ["skipped", "rebuilt"]
    assert "model.gguf" in (third[1].reason or "")
    assert Variant.load(tmp_path / "Q4_0").verify() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Q4_0", "Q8_0", "Q8_0.partial"]
    # A changed recipe under the same name is rebuilt, not trusted.
    changed = Recipe.from_dict({"name": "Q4_0", "format": "gguf", "qtype": "Q4_0", "output_type": "Q8_0"})
    assert run.quantize_all(tiny_checkpoint, [changed], tmp_path)[0].reason == "the recipe changed"


def test_interrupted_variant_is_not_left_behind(
    tiny_checkpoint: Path, tiny_f16: Path, tmp_path: Path, monkeypatch
):
    def interrupted(tool: str, args: list[str], on_output=None):
        Path(args[-3]).write_bytes(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(llamacpp, "run_tool", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run.quantize(tiny_checkpoint, ["Q4_0"], tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_is_one_line_exit_2(tiny_checkpoint: Path, tmp_path: Path, orlik_cli: Any) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    r = orlik_cli("quantize", tiny_checkpoint, "--recipe", "Q8_0", "--out", blocker / "variants")
    assert r.code == 2
    err = r.err
    assert err.startswith("orlik: error: cannot write to") and err.count("\n") == 1


def test_full_disk_keeps_nothing(tiny_checkpoint: Path, tiny_f16: Path, tmp_path: Path, monkeypatch) -> None:
    import orlik.quantize.backends.gguf as backend

    real = shutil.disk_usage
    monkeypatch.setattr(backend.shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
    with pytest.raises(OutputError, match="not enough free space"):
        run.quantize(tiny_checkpoint, ["Q8_0"], tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(backend.shutil, "disk_usage", real)

    def enospc(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", enospc)  # the manifest cannot be written
    with pytest.raises(OutputError, match="disk full"):
        run.quantize(tiny_checkpoint, ["Q8_0"], tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_imatrix_of_another_model_is_refused_before_quantizing(
    tiny_checkpoint: Path,
    tiny_imatrix: Path,
    other_checkpoint: Path,
    tmp_path: Path,
    monkeypatch,
    orlik_cli: Any,
) -> None:
    f16_gguf(Checkpoint.open(other_checkpoint))

    def never(*a, **k):
        raise AssertionError("llama-quantize ran")

    monkeypatch.setattr(llamacpp, "run_tool", never)
    # Q8_0 needs no imatrix, but the run fails before building it: every input is checked first.
    r = orlik_cli("quantize", other_checkpoint, "--recipe", "Q8_0", "--recipe", "Q4_K_M-imat",
                  "--imatrix", tiny_imatrix, "--out", tmp_path)  # fmt: skip
    err = r.err
    assert r.code == 2 and "shape mismatch" in err and "another model" in err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def other_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A different (random, narrower, shallower) llama sharing the tiny model's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("other") / "fp16"
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    for k in ("architectures", "model_type", "transformers_version", "torch_dtype", "dtype"):
        cfg.pop(k, None)
    cfg.update(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, head_dim=64)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.float16).save_pretrained(out)
    for f in tiny_checkpoint.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


def test_bad_input_errors(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        run.calibration_for(imatrix=tmp_path / "nope.gguf")
    with pytest.raises(InputError, match="matches no tensor"):
        run.quantize(tiny_checkpoint, run.with_overrides([Recipe.from_name("Q8_0")], [("blk.*.nothing", "Q8_0")]),
                     tmp_path)  # fmt: skip

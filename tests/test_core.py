"""The core types: variant.json (strict schema, tamper detection), the name registry, atomic output
directories, and recipe names and presets."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from orlik.errors import ManifestError, OrlikError, OutputError, UnknownNameError
from orlik.fsutil import atomic_dir, sha256_file, sha256_file_remembered
from orlik.manifest import MANIFEST, SCHEMA_VERSION, Variant, hash_files
from orlik.quantize.recipe import GGUF_TYPES, PRESETS, Recipe, expand


# ---------------------------------------------------------------- variant.json
@pytest.fixture
def variant_dir(tmp_path: Path) -> tuple[Path, Variant]:
    d = tmp_path / "tiny-q4_k_m"
    d.mkdir()
    (d / "model.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 8)
    (d / "README.md").write_text("Zażółć gęślą jaźń\n", encoding="utf-8")
    v = Variant(name="tiny-q4_k_m", format="gguf", recipe=Recipe.from_name("Q4_K_M-imat").to_dict(),
                base_hash="ab" * 32, files=hash_files(d, ["model.gguf", "README.md"]), bytes=2052, bpw=4.85,
                tools={"llama.cpp": "b1 (0c1e570)"}, calibration_hash="cd" * 32, imatrix_hash="ef" * 32,
                extra={"ppl": 12.5})  # fmt: skip
    v.save(d)
    return d, v


def test_variant_round_trips_through_dict_and_file(variant_dir: tuple[Path, Variant]) -> None:
    d, v = variant_dir
    assert Variant.from_dict(v.to_dict()) == v
    loaded = Variant.load(d)
    assert loaded == v and loaded.path == d
    on_disk = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
    assert on_disk["schema_version"] == SCHEMA_VERSION
    assert "path" not in on_disk  # where a variant lives is not part of its identity
    assert set(on_disk["files"]) == {"model.gguf", "README.md"}  # the manifest does not hash itself
    assert on_disk["files"]["model.gguf"] == sha256_file(d / "model.gguf")
    assert hash_files(d) == on_disk["files"]  # listing the directory finds the same files and hashes
    assert loaded.main_file() == d / "model.gguf"  # the order written is the order read back


def _broken(v: Variant, **change: Any) -> dict[str, Any]:
    d = v.to_dict()
    for k, val in change.items():
        if val is _DROP:
            d.pop(k)
        else:
            d[k] = val
    return d


_DROP = object()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"schema_version": 2}, "schema_version 2 is not 1"),
        ({"schema_version": _DROP}, "schema_version None is not 1"),
        ({"colour": "blue"}, "unknown field.*colour"),
        ({"bytes": "2052"}, "'bytes' has the wrong type"),
        ({"bpw": True}, "'bpw' has the wrong type"),
        ({"recipe": "Q4_K_M"}, "'recipe' has the wrong type"),
        ({"format": _DROP}, "missing field.*format"),
        ({"files": {"model.gguf": "not-a-sha"}}, "'files' must map each file to its sha256"),
        ({"files": {}}, "'files' must map each file to its sha256"),
        ({"bytes": 0}, "implausible bytes/bpw"),
        ({"bpw": 64.0}, "implausible bytes/bpw"),
    ],
)
def test_variant_validation_is_strict(
    variant_dir: tuple[Path, Variant], change: dict[str, Any], message: str
) -> None:
    _, v = variant_dir
    with pytest.raises(ManifestError, match=message):
        Variant.from_dict(_broken(v, **change))


def test_variant_load_errors_are_one_line(tmp_path: Path, variant_dir: tuple[Path, Variant]) -> None:
    with pytest.raises(ManifestError, match=r"has no variant\.json"):
        Variant.load(tmp_path / "nowhere")
    d, _ = variant_dir
    (d / MANIFEST).write_text('{"name": "x",', encoding="utf-8")
    with pytest.raises(ManifestError, match="is corrupt") as e:
        Variant.load(d)
    assert "\n" not in str(e.value)
    (d / MANIFEST).write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ManifestError, match="expected a JSON object"):
        Variant.load(d)


def test_verify_detects_tampered_and_missing_files(variant_dir: tuple[Path, Variant]) -> None:
    d, _ = variant_dir
    assert Variant.load(d).verify() == []
    raw = bytearray((d / "model.gguf").read_bytes())
    raw[100] ^= 1  # one flipped bit
    (d / "model.gguf").write_bytes(bytes(raw))
    assert Variant.load(d).verify() == ["model.gguf"]
    (d / "README.md").unlink()
    assert sorted(Variant.load(d).verify()) == ["README.md", "model.gguf"]


# ---------------------------------------------------------------- registry
def test_registry_maps_formats_by_convention_and_lists_the_valid_ones() -> None:
    from orlik import registry

    assert registry.backend_class("gguf").__module__ == "orlik.quantize.backends.gguf"
    assert registry.runtime_class("hqq").__module__ == "orlik.serving.runtimes.hqq"
    # One runtime module may run several formats; the server runs GGUF in llama-server.
    assert registry.runtime_class("gptq") is registry.runtime_class("awq")
    assert registry.runtime_class("gguf").name == "llama.cpp"
    assert registry.runtime_class("gguf", serving=True).name == "llama-server"
    assert registry.runtime_class("fp16", serving=True) is registry.runtime_class("fp16")
    for bad in ("gptq2", "common", "llamaserver", "hf", "../x"):
        with pytest.raises(UnknownNameError) as e:
            registry.runtime_class(bad) if bad != "common" else registry.backend_class(bad)
        assert isinstance(e.value, OrlikError) and e.value.exit_code == 2
        assert "gguf" in e.value.valid and "hqq" in e.value.valid and bad not in e.value.valid
    with pytest.raises(UnknownNameError) as e:
        registry.backend_class("fp16")
    assert str(e.value) == "unknown format 'fp16'; valid: awq, gguf, gptq, hqq, mlx"


# ---------------------------------------------------------------- atomic_dir
def test_atomic_dir_leaves_nothing_on_failure(tmp_path: Path) -> None:
    final = tmp_path / "variant"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "half.bin").write_bytes(b"x" * 10)
        raise RuntimeError("quantizer crashed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_keeps_previous_result_on_failure_and_replaces_on_success(tmp_path: Path) -> None:
    final = tmp_path / "variant"
    with atomic_dir(final) as tmp:
        (tmp / "model.gguf").write_text("v1")
    assert (final / "model.gguf").read_text() == "v1"
    with pytest.raises(KeyboardInterrupt), atomic_dir(final) as tmp:
        (tmp / "model.gguf").write_text("v2-half")
        raise KeyboardInterrupt
    assert (final / "model.gguf").read_text() == "v1"
    with atomic_dir(final) as tmp:
        (tmp / "model.gguf").write_text("v2")
        (tmp / "variant.json").write_text("{}")
    assert sorted(p.name for p in final.iterdir()) == [".orlik", "model.gguf", "variant.json"]
    assert (final / "model.gguf").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["variant"]  # no .partial, no .old
    with pytest.raises(OutputError, match="already exists"), atomic_dir(final, replace=False) as tmp:
        (tmp / "model.gguf").write_text("v3")
    assert (final / "model.gguf").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["variant"]


def test_remembered_hash_follows_every_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORLIK_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    first = sha256_file_remembered(f)
    assert first == sha256_file(f) and list((tmp_path / "cache" / "sha256").rglob("*"))
    assert sha256_file_remembered(f) == first  # from the cache
    st = os.stat(f)
    f.write_bytes(b"b" * 1000)  # same size: the new mtime alone must change the key
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert sha256_file_remembered(f) == sha256_file(f) != first


def test_atomic_dir_under_a_file_is_an_output_error(tmp_path: Path) -> None:
    blocker = tmp_path / "runs"
    blocker.write_text("not a directory")
    with pytest.raises(OutputError, match="cannot write to"), atomic_dir(blocker / "variant"):
        pass


# ---------------------------------------------------------------- recipes
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Q4_K_M", {"format": "gguf", "qtype": "Q4_K_M", "imatrix": False, "calibration": False}),
        ("q4_k_m-imat", {"name": "Q4_K_M-imat", "format": "gguf", "qtype": "Q4_K_M", "imatrix": True,
                         "calibration": True}),
        ("IQ2_XXS-imat", {"format": "gguf", "qtype": "IQ2_XXS", "imatrix": True}),
        ("gptq-w4g128", {"format": "gptq", "bits": 4, "group_size": 128, "calibration": True}),
        ("gptq-w8", {"format": "gptq", "bits": 8, "group_size": None}),
        ("awq-w4g128", {"format": "awq", "bits": 4, "group_size": 128, "calibration": True}),
        ("hqq-3bit-g64", {"format": "hqq", "bits": 3, "group_size": 64, "calibration": False}),
        ("exl2-4.0bpw", {"format": "exl2", "bits": 4.0, "calibration": True, "options": {"head_bits": 6}}),
        ("exl2-2.5bpw-h8", {"format": "exl2", "bits": 2.5, "options": {"head_bits": 8}}),
        ("mlx-q4", {"format": "mlx", "bits": 4, "group_size": 64}),
        ("MLX-Q3-G32", {"name": "mlx-q3-g32", "format": "mlx", "bits": 3, "group_size": 32}),
    ],
)  # fmt: skip
def test_recipe_from_name(name: str, expected: dict[str, Any]) -> None:
    r = Recipe.from_name(name)
    for k, v in expected.items():
        assert getattr(r, k) == v, (k, getattr(r, k))
    assert Recipe.from_dict(r.to_dict()) == r
    assert Recipe.from_dict({"name": name}) == r


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("Q9_K", "unknown GGUF type 'Q9_K'; valid: .*Q4_K_M"),
        ("gptq-4bit", "unknown recipe 'gptq-4bit'; valid: .*bielik-table8.*gptq-w4g128"),
        ("", "unknown recipe ''"),
    ],
)
def test_unknown_recipe_lists_valid_names(name: str, message: str) -> None:
    with pytest.raises(UnknownNameError, match=message):
        Recipe.from_name(name)


def test_recipe_from_dict_validates() -> None:
    r = Recipe.from_dict({"format": "gguf", "qtype": "Q4_K_M", "imatrix": True,
                          "overrides": {"*attn_v*": "Q6_K", "output.weight": "Q8_0"}})  # fmt: skip
    assert r.name == "Q4_K_M-imat" and r.overrides == (("*attn_v*", "Q6_K"), ("output.weight", "Q8_0"))
    assert Recipe.from_dict(r.to_dict()) == r
    with pytest.raises(UnknownNameError, match="unknown format 'onnx'"):
        Recipe.from_dict({"format": "onnx"})
    with pytest.raises(OrlikError, match=r"unknown field.*bitz"):
        Recipe.from_dict({"format": "gptq", "bitz": 4})


def test_options_reach_only_the_recipes_whose_backend_reads_them() -> None:
    from orlik.quantize.run import with_options

    plan = expand(["gptq-w4g128-act", "hqq-4bit-g64", "Q4_K_M"])
    gptq, hqq, gguf = with_options(plan, [("damp", "0.05"), ("act_order", "false"), ("seed", "7")])
    assert gptq.options == {"act_order": False, "damp": 0.05, "seed": 7}  # the name's act_order overridden
    assert hqq.options == {"seed": 7} and gguf.options == {}
    assert (
        gptq.to_dict()["options"]["damp"] == 0.05
    )  # recorded in the manifest's recipe, so a change rebuilds
    assert with_options(plan, []) == plan
    with pytest.raises(OrlikError, match=r"no recipe here reads option 'dampp'.*damp"):
        with_options(plan, [("dampp", "0.05")])
    with pytest.raises(OrlikError, match="option damp takes a number, not 'high'"):
        with_options(plan, [("damp", "high")])
    with pytest.raises(OrlikError, match="option sym takes true or false"):
        with_options(plan, [("sym", "maybe")])
    with pytest.raises(OrlikError, match="gguf backend"):
        with_options(expand(["Q4_K_M"]), [("calib_samples", "64")])


def test_presets_cover_bielik_table8() -> None:
    recipes = expand(["bielik-table8"])
    names = [r.name for r in recipes]
    # Table 8: six K/legacy types, each without and with the importance matrix, plus IQ2_XXS.
    assert names[:4] == ["Q8_0", "Q8_0-imat", "Q6_K", "Q6_K-imat"]
    assert len(names) == 13 and names[-1] == "IQ2_XXS-imat"
    assert {r.qtype for r in recipes} == {"Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K", "IQ2_XXS"}
    assert all(r.imatrix == r.name.endswith("-imat") for r in recipes)
    # Duplicates collapse, order is kept, and every preset entry is a valid recipe name.
    assert expand(["Q4_K_M", "bielik-table8", "Q4_K_M"])[0].name == "Q4_K_M"
    assert len(expand(["Q4_K_M", "bielik-table8"])) == 13
    for preset in PRESETS:
        stock = [r for r in expand([preset]) if r.format == "gguf" and not r.options.get("auto")]
        assert all(r.qtype in GGUF_TYPES for r in stock)
        # auto recipes choose a type per tensor; theirs name the stock type whose size they target
        auto = [r for r in expand([preset]) if r.format == "gguf" and r.options.get("auto")]
        assert all(r.name.removeprefix("auto-like-") in GGUF_TYPES for r in auto)


def test_calibrated_variant_is_rebuilt_when_the_calibration_set_changes(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from orlik.quantize import run
    from orlik.quantize.backends import Calibration, backend_class

    recipe = Recipe.from_dict({"format": "gptq", "bits": 4, "group_size": 128})
    target = tmp_path / "v"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"weights")
    Variant(name="v", format="gptq", recipe=recipe.to_dict(), base_hash="b" * 64,
            files=hash_files(target), bytes=7, bpw=4.25, calibration_hash="c" * 64).save(target)  # fmt: skip
    ckpt = SimpleNamespace(hash="b" * 64)
    gptq = backend_class("gptq")()  # its stale() adds nothing: only the calibration decides here
    assert run._stale(target, recipe, ckpt, Calibration(hash="c" * 64), gptq) is None
    assert run._stale(target, recipe, ckpt, Calibration(hash="d" * 64), gptq) == "the calibration set changed"
    assert "no calibration set" in run._stale(target, recipe, ckpt, Calibration(), gptq)
    calib = tmp_path / "calibration.jsonl"
    calib.write_text('{"text": "x"}\n')  # hashed when the card gave no hash
    assert run._stale(target, recipe, ckpt, Calibration(jsonl=calib), gptq) == "the calibration set changed"


def test_packed_calibration_blocks_are_equal_length(tokenizer_dir: Path) -> None:
    """AWQ's calibration: texts joined with EOS and cut into equal blocks, so a library can stack
    the activations of every block (GPTQModel keeps only the last batch of unequal ones)."""
    from orlik import corpus
    from orlik.checkpoint import load_tokenizer
    from orlik.quantize.backends.common import calibration_batches

    tok = load_tokenizer(tokenizer_dir)
    texts = [d.text for d in corpus.documents(lang="pl", split="train")[:40]]
    recipe = Recipe.from_dict(
        {"format": "awq", "bits": 4, "group_size": 128, "options": {"calib_seq_len": 128}}
    )
    blocks = calibration_batches(texts, tok, recipe, pack=True, samples=8)
    assert len(blocks) == 8 and {len(b["input_ids"]) for b in blocks} == {128}
    assert tok.eos_token_id in [t for b in blocks for t in b["input_ids"]]  # texts are separated
    assert all(b["attention_mask"] == [1] * 128 for b in blocks)
    long = Recipe.from_dict({**recipe.to_dict(), "options": {"calib_seq_len": 4096}})
    loose = calibration_batches(texts, tok, long, samples=8)
    assert len({len(b["input_ids"]) for b in loose}) > 1  # the unpacked samples vary in length
    with pytest.raises(OrlikError, match="fewer than one block"):
        calibration_batches(["krótko"], tok, recipe, pack=True)


def test_logs_are_hashed_but_not_counted_and_old_gguf_manifests_still_read(
    variant_dir: tuple[Path, Variant],
) -> None:
    """`bytes` counts `files` only; a log is checked like a file. A GGUF manifest written before `logs`
    existed (its llama-quantize log under `files`, `bytes` the model file alone) reads as the same."""
    d, v = variant_dir
    (d / "llama-quantize.log").write_text("[ 1/ 1] token_embd.weight - [ 8, 8], type = f16\n")
    v.files, v.logs = hash_files(d, ["model.gguf"]), hash_files(d, ["llama-quantize.log"])  # as GGUF writes
    v.save(d)
    Variant.load(d).check()
    (d / "llama-quantize.log").write_text("edited\n")
    with pytest.raises(ManifestError, match=r"differ from variant.json: llama-quantize.log"):
        Variant.load(d).check()
    v.save(d)
    with pytest.raises(ManifestError, match=r"files hold 2052 bytes, variant.json records 2053"):
        Variant.from_dict({**v.to_dict(), "bytes": 2053}).check(directory=d)
    old = v.to_dict()
    old.pop("logs")
    old["files"] = {**old["files"], "llama-quantize.log": sha256_file(d / "llama-quantize.log")}
    read = Variant.from_dict(old)
    assert read.files == v.files and read.logs == {
        "llama-quantize.log": sha256_file(d / "llama-quantize.log")
    }
    read.check(directory=d)
    with pytest.raises(ManifestError, match="files hold 2052 bytes"):  # the old rule's other total is gone
        Variant.from_dict({**old, "bytes": 2052 + len("edited\n")}).check(directory=d)

"""`orlik serve` checks a variant against its manifest before serving it, manifests cannot point
outside their directory, quantized runtimes load safetensors only, and an API key that no HTTP
client can send is refused at start-up."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orlik.errors import InputError, ManifestError
from orlik.manifest import MANIFEST, Variant


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("orlik: error: "), err
    return lines[0]


@pytest.mark.parametrize("name", ["/etc/passwd", "../model.gguf", "sub/../../x", "..", "C:\\x.gguf", ""])
def test_manifest_file_names_outside_the_variant_are_refused(name: str, tmp_path: Path) -> None:
    d = {"schema_version": 1, "name": "v", "format": "gguf", "recipe": {}, "base_hash": "0" * 64,
         "files": {name: "a" * 64}, "bytes": 10, "bpw": 4.0}  # fmt: skip
    (tmp_path / MANIFEST).write_text(json.dumps(d))
    with pytest.raises(ManifestError, match="is absolute or leaves the variant directory"):
        Variant.load(tmp_path)
    d["files"] = {"sub/model.gguf": "a" * 64}
    assert Variant.from_dict(d).files == {"sub/model.gguf": "a" * 64}


@pytest.fixture
def variant_copy(serving_gguf: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "tiny-q8_0"
    shutil.copytree(serving_gguf, dst)
    return dst


def _build(path: Path, **kw: Any) -> None:
    from orlik.serving import server

    app = server.build([str(path)], **kw)
    app.state.orlik.registry.close()


def test_serve_refuses_a_tampered_variant_unless_no_verify(
    variant_copy: Path, orlik_cli: Callable[..., Any]
) -> None:
    _build(variant_copy)  # intact: served
    model = variant_copy / "model.gguf"
    data = bytearray(model.read_bytes())
    data[-7] ^= 0xFF  # same size, other bytes
    model.write_bytes(bytes(data))
    res = orlik_cli("serve", variant_copy, "--port", "1")
    assert res.code == 2
    assert re.search(r"files differ from variant\.json: model\.gguf .*--no-verify", one_error_line(res.err))
    _build(variant_copy, verify=False)  # the user's choice: sizes match, hashes not read


def test_serve_checks_sizes_even_with_no_verify(variant_copy: Path, orlik_cli: Callable[..., Any]) -> None:
    model = variant_copy / "model.gguf"
    model.write_bytes(model.read_bytes()[:-1000])  # truncated, as by a full disk or a partial copy
    res = orlik_cli("serve", variant_copy, "--no-verify", "--port", "1")
    assert res.code == 2
    assert re.search(r"files hold \d+ bytes, variant\.json records \d+", one_error_line(res.err))
    model.unlink()
    with pytest.raises(ManifestError, match=r"missing: model\.gguf"):
        _build(variant_copy, verify=False)


@pytest.mark.parametrize("key", ["zażółć-gęślą-jaźń", "klucz ze spacją", "tab\tkey"])
def test_an_api_key_no_client_can_send_is_refused_at_start_up(
    key: str, tmp_path: Path, orlik_cli: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Refused before any model is looked at: the path does not even exist.
    res = orlik_cli("serve", tmp_path / "no-model", "--api-key", key, "--port", "1")
    assert res.code == 2 and "API key must be printable ASCII" in one_error_line(res.err)
    monkeypatch.setenv("ORLIK_API_KEY", key)
    res = orlik_cli("serve", tmp_path / "no-model", "--port", "1")
    assert res.code == 2 and "API key must be printable ASCII" in one_error_line(res.err)


def test_an_ascii_api_key_still_works(variant_copy: Path) -> None:
    from starlette.testclient import TestClient

    from orlik.serving import server

    app = server.build([str(variant_copy)], api_key="sk-orlik_0123~!")
    try:
        with TestClient(app) as client:
            assert client.get("/v1/models").status_code == 401
            ok = client.get("/v1/models", headers={"Authorization": "Bearer sk-orlik_0123~!"})
            assert ok.status_code == 200
    finally:
        app.state.orlik.registry.close()


def test_quantized_runtime_never_unpickles(tmp_path: Path) -> None:
    """A GPTQ-labelled variant whose weights exist only as a pickle (pytorch_model.bin) is refused,
    not loaded through torch.load."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from orlik.manifest import hash_files
    from orlik.serving.runtimes.hfquant import TransformersQuantRuntime

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    cfg.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    files = hash_files(tmp_path)
    v = Variant(name="pickled", format="gptq", recipe={}, base_hash="0" * 64, files=files,
                bytes=sum((tmp_path / f).stat().st_size for f in files), bpw=16.0, path=tmp_path)  # fmt: skip
    with pytest.raises(InputError, match=r"cannot load .*model\.safetensors"):
        TransformersQuantRuntime.load(v)

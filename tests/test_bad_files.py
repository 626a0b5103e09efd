"""Every bad file gives one line and exit 2: a table of the cases review found, a full disk under a
real backend, and a fuzz test that mutates safetensors headers and config.json."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orlik.checkpoint import Checkpoint
from orlik.errors import OrlikError

WEIGHTS = {"model.embed_tokens.weight": np.arange(24, dtype=np.float16).reshape(6, 4),
           "model.norm.weight": np.ones(4, dtype=np.float32)}  # fmt: skip


def safetensors_bytes(header: Any, data: bytes) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw)) + raw + data


def valid_header() -> tuple[dict[str, Any], bytes]:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    data, pos = b"", 0
    for name, arr in WEIGHTS.items():
        dtype = {"float16": "F16", "float32": "F32"}[str(arr.dtype)]
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [pos, pos + arr.nbytes]}
        data += arr.tobytes()
        pos += arr.nbytes
    return header, data


def synthetic_checkpoint(d: Path) -> Path:
    """A checkpoint directory that Checkpoint.open accepts, built without any training."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float16"}))
    header, data = valid_header()
    (d / "model.safetensors").write_bytes(safetensors_bytes(header, data))
    (d / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}}}))
    return d


def test_the_synthetic_checkpoint_is_valid(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    ckpt = Checkpoint.open(synthetic_checkpoint(tmp_path / "ckpt"))
    loaded = load_file(str(ckpt.weight_files[0]))  # the safetensors library agrees with the header
    assert all(np.array_equal(loaded[k], v) for k, v in WEIGHTS.items())


# ---------------------------------------------------------------- the table
def _header_list(d: Path) -> None:
    (d / "model.safetensors").write_bytes(safetensors_bytes([1, 2, 3], b""))


def _offsets_length(d: Path) -> None:
    header, data = valid_header()
    header["model.norm.weight"]["data_offsets"] = [48]
    (d / "model.safetensors").write_bytes(safetensors_bytes(header, data))


def _index(content: bytes) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        (d / "model.safetensors.index.json").write_bytes(content)

    return setup


def _file(name: str, content: bytes) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        (d / name).write_bytes(content)

    return setup


def _unreadable_config(d: Path) -> None:
    (d / "config.json").chmod(0)


CASES = [
    ("header-not-object", _header_list, ["inspect", "{ckpt}"],
     r"corrupt safetensors file .*model\.safetensors: the header is a JSON list, not an object"),
    ("data-offsets-length", _offsets_length, ["inspect", "{ckpt}"],
     r"tensor 'model\.norm\.weight': data_offsets must be two byte offsets, not \[48\]"),
    ("index-weight-map-list", _index(b'{"weight_map": ["model.safetensors"]}'), ["inspect", "{ckpt}"],
     r"index\.json is corrupt: 'weight_map' must map tensor names to shard files"),
    ("index-not-utf8", _index(b'{"weight_map": {"a": "\xff\xfe.safetensors"}}'), ["inspect", "{ckpt}"],
     r"index\.json is not valid UTF-8 JSON"),
    ("index-shard-outside", _index(b'{"weight_map": {"a": "../x.safetensors"}}'), ["inspect", "{ckpt}"],
     r"names a shard outside .*'\.\./x\.safetensors'"),
    ("calibrate-out-dot", None, ["calibrate", "build", "{ckpt}", "--out", "."],
     r"\. \(= .*\) is a directory that orlik did not make .*--force"),
    ("calibrate-out-root", None, ["calibrate", "build", "{ckpt}", "--out", "/", "--force"],
     r"--out / is the filesystem root"),
    ("tokenizer-json-truncated", _file("tokenizer.json", b'{"version": "1.0", "model": {'), ["inspect", "{ckpt}"],
     r"tokenizer\.json is not valid UTF-8 JSON"),
    ("tokenizer-json-not-a-tokenizer", _file("tokenizer.json", b'{"model": {"type": "Nope"}}'),
     ["calibrate", "build", "{ckpt}", "--out", "{tmp}/calib", "--tokens", "300"],
     r"cannot load the tokenizer in .*ckpt: "),
    ("config-unreadable", _unreadable_config, ["inspect", "{ckpt}"],
     r"cannot read .*config\.json: Permission denied"),
    ("config-empty-model-type", _file("config.json", b'{"model_type": ""}'), ["inspect", "{ckpt}"],
     r"config\.json has no model_type"),
]  # fmt: skip


def run_cli_unprivileged(args: list[str]) -> tuple[int, str]:
    """The CLI in a forked child that, when this is root, first becomes `nobody`, so that file
    permissions apply to it as they do to a user."""
    from orlik.cli import main

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(r)
            sys.stderr = os.fdopen(w, "w")  # pytest's capture object stays with the parent
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            try:
                main(args)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        err = f.read().decode("utf-8", "replace")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err


@pytest.mark.parametrize(("case", "setup", "args", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_file_is_one_line_and_exit_2(
    case: str,
    setup: Callable[[Path], None] | None,
    args: list[str],
    message: str,
    tmp_path: Path,
    orlik_cli: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    if case == "config-unreadable":  # `nobody` must reach the checkpoint: not under pytest-of-root (0700)
        tmp_path = Path(tempfile.mkdtemp(prefix="orlik-perm-"))
        tmp_path.chmod(0o755)
        request.addfinalizer(lambda: shutil.rmtree(tmp_path))
    ckpt = synthetic_checkpoint(tmp_path / "ckpt")
    if setup is not None:
        setup(ckpt)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    monkeypatch.chdir(tmp_path / "mine")
    argv = [a.format(ckpt=ckpt, tmp=tmp_path) for a in args]
    if case == "config-unreadable":
        code, err = run_cli_unprivileged(argv)
    else:
        res = orlik_cli(*argv)
        code, err = res.code, res.err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and re.search(message, lines[0]), err
    assert lines[0].startswith("orlik: error: ")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


def test_full_disk_under_hqq_is_one_line(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """HQQ writes its weights with safetensors, whose SafetensorError is no OSError. The output root
    is a 256 KiB tmpfs mounted in a private mount namespace, so the disk is really full."""
    pytest.importorskip("hqq")
    probe = subprocess.run(["unshare", "--mount", "--map-root-user", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here: {probe.stderr.decode().strip()}")
    out = tmp_path / "variants"
    out.mkdir()
    script = 'mount -t tmpfs -o size=256k tmpfs "$1" && shift && exec "$@"'
    cmd = ["unshare", "--mount", "--map-root-user", "sh", "-c", script, "sh", str(out),
           sys.executable, "-m", "orlik", "-q", "quantize", str(tiny_checkpoint), "--recipe", "hqq-4bit-g64",
           "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and re.search(
        r"disk full while writing .*hqq-4bit-g64; nothing was kept", lines[0]
    )
    assert list(out.iterdir()) == []  # the mount is gone with its namespace; nothing leaked beneath


# ---------------------------------------------------------------- fuzz
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**66), 2**66)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def mutated_header(draw: st.DrawFn) -> bytes:
    header, data = valid_header()
    kind = draw(st.sampled_from(["value", "entry", "whole", "bytes", "length", "data"]))
    if kind == "value":
        name = draw(st.sampled_from(sorted(WEIGHTS)))
        key = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
        header[name][key] = draw(JSON)
    elif kind == "entry":
        header[draw(st.sampled_from([*WEIGHTS, "__metadata__", "new"]))] = draw(JSON)
    elif kind == "whole":
        return safetensors_bytes(draw(JSON), data)
    raw = bytearray(safetensors_bytes(header, data))
    if kind == "bytes":
        for _ in range(draw(st.integers(1, 4))):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    elif kind == "length":
        raw[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
    elif kind == "data":
        cut = draw(st.integers(0, len(raw) + 8))
        raw = raw[:cut] if cut <= len(raw) else raw + b"\0" * (cut - len(raw))
    return bytes(raw)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_checkpoint(tmp_path_factory.mktemp("fuzz") / "ckpt")


def _open_only_orlik_errors(d: Path) -> None:
    try:
        from orlik.gguf_convert import outtype_for

        ckpt = Checkpoint.open(d)
        assert ckpt.arch and ckpt.weights_bytes > 0 and outtype_for(ckpt) in ("f16", "bf16")
    except OrlikError as e:
        assert "\n" not in str(e)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=mutated_header())
def test_fuzzed_safetensors_header_raises_only_orlik_errors(fuzz_dir: Path, blob: bytes) -> None:
    (fuzz_dir / "model.safetensors").write_bytes(blob)
    _open_only_orlik_errors(fuzz_dir)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(JSON.map(lambda v: json.dumps(v).encode()), st.binary(max_size=64),
                         st.dictionaries(st.sampled_from(["model_type", "torch_dtype", "dtype"]), JSON)
                         .map(lambda v: json.dumps(v).encode())))  # fmt: skip
def test_fuzzed_config_json_raises_only_orlik_errors(fuzz_dir: Path, content: bytes) -> None:
    header, data = valid_header()
    (fuzz_dir / "model.safetensors").write_bytes(safetensors_bytes(header, data))
    (fuzz_dir / "config.json").write_bytes(content)
    _open_only_orlik_errors(fuzz_dir)

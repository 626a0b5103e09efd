"""orlik never replaces or deletes what it did not make, and a rerun removes only its own leftovers
(marked, their writer gone): atomic_dir, the temporary files beside outputs, and every verb with --out."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orlik import owner
from orlik.errors import OutputError
from orlik.fsutil import atomic_dir, atomic_write_text


def snapshot(root: Path) -> dict[str, Any]:
    """Every entry under `root`, links not followed: kind, bytes or link target, mode, inode."""
    out: dict[str, Any] = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            out[rel] = ("dir", st.st_mode)
        else:
            out[rel] = ("file", p.read_bytes(), st.st_mode, st.st_ino)
    return out


def user_folder(path: Path, outside: Path | None = None) -> Path:
    """A folder of the user's: files, a subfolder, and a link to something outside it."""
    (path / "notes").mkdir(parents=True)
    (path / "calibration.jsonl").write_text('{"text": "moje własne dane"}\n', encoding="utf-8")
    (path / "notes" / "todo.md").write_bytes(b"nie usuwac\n" * 100)
    (path / "weights.bin").write_bytes(os.urandom(4096))
    if outside is not None:
        (path / "elsewhere").symlink_to(outside)
    return path


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def fake_mark(d: Path, state: str, pid: int, started: str | None = None) -> None:
    d.mkdir(parents=True, exist_ok=True)
    mark = {"made_by": "orlik", "kind": "variant", "state": state, "pid": pid,
            "host": owner.me()["host"], "started": started}  # fmt: skip
    (d / owner.MARKER).write_text(json.dumps(mark))


def write(final: Path, text: str = "new", **kw: Any) -> None:
    """One atomic_dir run that writes model.gguf."""
    with atomic_dir(final, **kw) as tmp:
        (tmp / "model.gguf").write_text(text)


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("orlik: error: "), err
    return lines[0]


# ---------------------------------------------------------------- atomic_dir
def test_atomic_dir_refuses_a_folder_it_did_not_make_and_force_replaces_it(tmp_path: Path) -> None:
    final = user_folder(tmp_path / "variant")
    before = snapshot(tmp_path)
    with pytest.raises(OutputError, match=r"variant is a directory that orlik did not make.*--force"):
        write(final)
    assert snapshot(tmp_path) == before
    with atomic_dir(final, force=True) as tmp:
        (tmp / "model.gguf").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == [owner.MARKER, "model.gguf"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["variant"]
    # What orlik wrote is orlik's: replaced without --force.
    with atomic_dir(final) as tmp:
        (tmp / "model.gguf").write_text("newer")
    assert (final / "model.gguf").read_text() == "newer"


def test_atomic_dir_takes_an_empty_folder_and_one_with_the_callers_mark(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with atomic_dir(tmp_path / "empty") as tmp:
        (tmp / "a").write_text("1")
    legacy = tmp_path / "old-variant"  # made by an orlik older than the .orlik mark
    legacy.mkdir()
    (legacy / "variant.json").write_text("{}")
    with atomic_dir(legacy, marks=("variant.json",)) as tmp:
        (tmp / "a").write_text("2")
    assert (legacy / "a").read_text() == "2" and not (legacy / "variant.json").exists()


def test_force_never_follows_a_symlink_out_of_the_output_root(tmp_path: Path) -> None:
    precious = user_folder(tmp_path / "elsewhere")
    root = tmp_path / "variants"
    root.mkdir()
    (root / "Q4_K_M").symlink_to(precious)
    (root / "Q4_K_M.partial").symlink_to(precious)  # even where a leftover would be
    before = snapshot(precious)
    with pytest.raises(OutputError, match=r"Q4_K_M is a symlink that orlik did not make.*--force"):
        write(root / "Q4_K_M")
    with atomic_dir(root / "Q4_K_M", force=True) as tmp:
        (tmp / "model.gguf").write_text("new")
    assert snapshot(precious) == before
    assert not (root / "Q4_K_M").is_symlink() and (root / "Q4_K_M" / "model.gguf").read_text() == "new"
    assert sorted(p.name for p in root.iterdir()) == ["Q4_K_M"]


@pytest.mark.parametrize("name", [".", "/"])
def test_atomic_dir_refuses_a_root_or_dot(name: str) -> None:
    with pytest.raises(OutputError, match="cannot be an output directory"):
        write(Path(name))


# ---------------------------------------------------------------- leftovers of a kill -9
def test_rerun_removes_its_own_stale_partial_and_old_only(tmp_path: Path) -> None:
    final = tmp_path / "Q8_0"
    fake_mark(tmp_path / "Q8_0.partial", "partial", dead_pid())
    (tmp_path / "Q8_0.partial" / "model.gguf").write_bytes(b"half")
    fake_mark(tmp_path / "Q8_0.old", "old", dead_pid())
    with atomic_dir(final) as tmp:
        (tmp / "model.gguf").write_text("whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Q8_0"]
    # An unmarked folder under the leftover's name is the user's: refused, kept.
    user_folder(tmp_path / "Q8_0.old")
    before = snapshot(tmp_path)
    with pytest.raises(OutputError, match=r"Q8_0.old is in the way and orlik did not make it.*--force"):
        write(final)
    assert snapshot(tmp_path) == before


def test_a_live_writer_is_never_interrupted(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        started = owner._start_time(sleeper.pid)
        fake_mark(tmp_path / "Q8_0.partial", "partial", sleeper.pid, started)
        for force in (False, True):
            with pytest.raises(OutputError, match=rf"being written by orlik process {sleeper.pid}"):
                write(tmp_path / "Q8_0", force=force)
        assert (tmp_path / "Q8_0.partial" / owner.MARKER).is_file()
        # The same PID with another start time is a recycled PID: the writer is gone.
        fake_mark(tmp_path / "Q8_0.partial", "partial", sleeper.pid, "1")
        with atomic_dir(tmp_path / "Q8_0") as tmp:
            (tmp / "x").write_text("1")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Q8_0"]


def test_stale_temporary_files_are_removed_by_their_pattern_and_pid_only(tmp_path: Path) -> None:
    final = tmp_path / "model-f16.gguf"
    gone, here = dead_pid(), os.getpid()
    names = {
        f".model-f16.gguf.partial-{gone}": False,  # an older orlik's name, writer gone
        f".model-f16.gguf.partial-{gone}.{owner.host_tag()}": False,
        f".model-f16.gguf.partial-{gone}.{owner.host_tag()}.card.json": False,
        f".model-f16.gguf.partial-{here}.{owner.host_tag()}": True,  # alive (this process)
        f".model-f16.gguf.partial-{gone}.0badc0de": True,  # another machine's
        "model-f16.gguf.partial-1": True,  # not orlik's pattern
        f".other.gguf.partial-{gone}": True,
    }
    for n in names:
        (tmp_path / n).write_text("x")
    owner.clean_stale_files(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, kept in names.items() if kept)
    (tmp_path / f".card.json.tmp-{gone}.{owner.host_tag()}").write_text("{")
    atomic_write_text(tmp_path / "card.json", "{}")
    assert not list(tmp_path.glob(".card.json.tmp-*"))


def test_a_scratch_directory_left_by_kill_9_is_removed_by_the_next_run(tmp_path: Path) -> None:
    """owner.work_dir (the imatrix step's scratch space): a SIGKILLed writer leaves it marked; the
    next clean_stale_files removes it, but not a live writer's nor an unmarked one of the same name."""
    import signal
    import sys

    final = tmp_path / "imatrix.gguf"
    code = ("import sys, time; from pathlib import Path; from orlik import owner\n"
            "with owner.work_dir(Path(sys.argv[1])) as d:\n"
            "    (d / 'calibration.txt').write_text('x' * 4096); print(d, flush=True); time.sleep(60)")  # fmt: skip
    child = subprocess.Popen([sys.executable, "-c", code, str(final)], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    left = Path(child.stdout.readline().strip())
    live = subprocess.Popen([sys.executable, "-c", code, str(final)], stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout is not None
        busy = Path(live.stdout.readline().strip())
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        assert owner.read_marker(left) is not None and (left / "calibration.txt").is_file()
        users = tmp_path / f".imatrix.gguf.work-{dead_pid()}.{owner.host_tag()}"
        user_folder(users)  # the pattern alone, without orlik's mark, is not enough
        kept = snapshot(users)
        assert owner.clean_stale_files(final, "work") == [left]
        assert not left.exists() and busy.is_dir() and snapshot(users) == kept
    finally:
        live.kill()
        live.wait()
        child.stdout.close()
        if live.stdout is not None:
            live.stdout.close()
    # A normal exit removes it at once.
    with owner.work_dir(final) as d:
        assert owner.read_marker(d) is not None
    assert not d.exists()


# ---------------------------------------------------------------- every verb with --out
@pytest.fixture
def precious(tmp_path: Path) -> Path:
    return user_folder(tmp_path / "precious")


def test_quantize_refuses_a_user_folder_under_out_before_any_work(
    tmp_path: Path, precious: Path, tiny_checkpoint: Path, gguf_cache: Path, orlik_cli: Callable[..., Any]
) -> None:
    root = tmp_path / "variants"
    # ROOT/Q8_0 is the user's own folder: no variant.json, no mark.
    mine = user_folder(root / "Q8_0", outside=precious)

    def converted() -> dict[str, Any]:  # the cache less its remembered input hashes
        return {k: v for k, v in snapshot(gguf_cache).items() if not k.startswith("sha256")}

    before, cached = snapshot(tmp_path), converted()
    res = orlik_cli("quantize", tiny_checkpoint, "--recipe", "Q4_K_M", "--recipe", "Q8_0", "--out", root)
    assert res.code == 2
    assert re.search(rf"{re.escape(str(mine))} is a directory that orlik did not make.*--force",
                     one_error_line(res.err))  # fmt: skip
    # Nothing was built, not even the first recipe, and nothing was converted.
    assert snapshot(tmp_path) == before and converted() == cached


@pytest.mark.slow  # a full quantize; atomic_dir's own symlink test above runs by default
def test_quantize_force_replaces_a_symlink_never_its_target(
    tmp_path: Path, precious: Path, tiny_checkpoint: Path, gguf_cache: Path, orlik_cli: Callable[..., Any]
) -> None:
    root = tmp_path / "variants"
    root.mkdir()
    (root / "Q8_0").symlink_to(precious, target_is_directory=True)
    kept = snapshot(precious)
    res = orlik_cli("quantize", tiny_checkpoint, "--recipe", "Q8_0", "--out", root)
    assert res.code == 2 and "is a symlink that orlik did not make" in one_error_line(res.err)
    res = orlik_cli("quantize", tiny_checkpoint, "--recipe", "Q8_0", "--out", root, "--force")
    assert res.code == 0, res.err
    v = root / "Q8_0"
    assert not v.is_symlink() and (v / "variant.json").is_file() and (v / owner.MARKER).is_file()
    assert snapshot(precious) == kept
    assert sorted(p.name for p in root.iterdir()) == ["Q8_0"]


def test_train_tokenizer_refuses_a_user_folder(
    tmp_path: Path, precious: Path, orlik_cli: Callable[..., Any]
) -> None:
    out = user_folder(tmp_path / "tok", outside=precious)
    before = snapshot(tmp_path)
    res = orlik_cli("train", "tokenizer", "--out", out, "--vocab-size", "400")
    assert res.code == 2
    assert re.search(
        rf"{re.escape(str(out))} is a directory that orlik did not make.*--force", one_error_line(res.err)
    )
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("which", ["out", "tokenizer"])
def test_train_pretrain_refuses_a_user_folder_as_out_or_tokenizer(
    which: str, tmp_path: Path, precious: Path, orlik_cli: Callable[..., Any]
) -> None:
    out = tmp_path / "m" / "fp16"
    # `--out` itself, or the <out>/../tokenizer it would train when that has no tokenizer.model.
    target = out if which == "out" else out.parent / "tokenizer"
    user_folder(target, outside=precious)
    before = snapshot(tmp_path)
    res = orlik_cli("train", "pretrain", "--out", out, "--steps", "1")
    assert res.code == 2
    assert re.search(
        rf"{re.escape(str(target))} is a directory that orlik did not make.*--force", one_error_line(res.err)
    )
    assert snapshot(tmp_path) == before


def test_calibrate_build_refuses_a_user_folder_before_any_work(
    tmp_path: Path,
    precious: Path,
    tiny_checkpoint: Path,
    orlik_cli: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = user_folder(tmp_path / "calib", outside=precious)
    before = snapshot(tmp_path)
    # Refused before the checkpoint is even opened: a missing MODEL would be the other error.
    for model in (tiny_checkpoint, tmp_path / "no-such-model"):
        res = orlik_cli("calibrate", "build", model, "--out", out, "--tokens", "300")
        assert res.code == 2
        assert re.search(
            rf"{re.escape(str(out))} is a directory that orlik did not make.*--force", one_error_line(res.err)
        )
    monkeypatch.chdir(out)
    res = orlik_cli("calibrate", "build", tmp_path / "no-such-model", "--out", ".")
    assert res.code == 2 and "orlik did not make" in one_error_line(res.err)
    res = orlik_cli("calibrate", "build", tmp_path / "no-such-model", "--out", "/", "--force")
    assert res.code == 2 and "is the filesystem root" in one_error_line(res.err)
    assert snapshot(tmp_path) == before


def test_calibrate_build_rewrites_its_three_files_and_touches_nothing_else(
    tmp_path: Path, precious: Path, tiny_checkpoint: Path, orlik_cli: Callable[..., Any]
) -> None:
    out = tmp_path / "calib"
    args = ["calibrate", "build", tiny_checkpoint, "--out", out, "--tokens", "300", "--lang", "pl",
            "--no-chat", "--no-parallel"]  # fmt: skip
    assert orlik_cli(*args).code == 0
    assert (out / owner.MARKER).is_file()
    # Beside orlik's files: an imatrix, the user's own notes, a link out of the folder.
    (out / "imatrix.gguf").write_bytes(os.urandom(1000))
    (out / "mine").mkdir()
    (out / "mine" / "notes.txt").write_text("zostaw to")
    (out / "link").symlink_to(precious)
    keep = {k: v for k, v in snapshot(out).items() if k.split("/")[0] in ("imatrix.gguf", "mine", "link")}
    res = orlik_cli(*args, "--seed", "1")
    assert res.code == 0, res.err
    after = snapshot(out)
    assert {k: after[k] for k in keep} == keep  # same bytes, same inodes, the link still a link
    assert sorted(after) == sorted([*keep, "calibration.jsonl", "card.json", "card.md", owner.MARKER])
    assert not [p for p in tmp_path.rglob("*") if "partial" in p.name]


@pytest.mark.parametrize("verb", ["merge", "upscale", "quality"])
def test_merge_upscale_and_quality_refuse_a_user_folder_and_take_force(
    verb: str, tmp_path: Path, precious: Path, tokenizer_dir: Path, orlik_cli: Callable[..., Any]
) -> None:
    """The verbs whose error names --force have it; without it the user's folder is untouched."""
    from data_helpers import random_checkpoint

    out = user_folder(tmp_path / "out", outside=precious)
    if verb == "quality":  # refused before the (slow) fit, so no model is trained here
        args: tuple[Any, ...] = ("data", "quality", "train", "--out", out, "--rounds", "1")
    else:
        src = random_checkpoint(tokenizer_dir, tmp_path / "src", seed=0)
        args = (
            ("train", "merge", src, src)
            if verb == "merge"
            else ("train", "upscale", src, "--layers", "0-1,1-2")
        )
        args = (*args, "--out", out)
    kept = snapshot(precious)
    before = snapshot(tmp_path)
    res = orlik_cli(*args)
    assert res.code == 2
    assert re.search(
        rf"{re.escape(str(out))} is a directory that orlik did not make.*--force", one_error_line(res.err)
    )
    assert snapshot(tmp_path) == before
    if verb == "quality":
        return
    res = orlik_cli(*args, "--force")
    assert res.code == 0, res.err
    assert (out / "config.json").is_file() and not (out / "notes").exists()
    assert snapshot(precious) == kept  # the link inside the replaced folder was not followed


def test_a_verb_replaces_only_its_own_kind_of_output(
    tmp_path: Path, orlik_cli: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """orlik's mark names the kind of folder (variant, calibration, checkpoint, ...): one verb's output
    is not replaced by another verb without --force, as a user folder is not; its own kind is."""
    variant = tmp_path / "variants" / "Q4_K_M"
    with atomic_dir(variant, kind="variant") as tmp:
        (tmp / "model.gguf").write_bytes(b"GGUF" + bytes(64))
    before = snapshot(tmp_path)
    cases = [  # each refused before it opens the (missing) model: the other error would be that
        ("calibrate", "build", tmp_path / "no-model", "--out", variant),
        ("train", "sft", tmp_path / "no-model", "--out", variant),
        ("train", "pretrain", "--out", variant, "--steps", "1"),
        ("train", "tokenizer", "--out", variant, "--vocab-size", "400"),
    ]
    for args in cases:
        res = orlik_cli(*args)
        assert res.code == 2, args
        kind = {"build": "calibration", "sft": "checkpoint", "pretrain": "checkpoint"}.get(
            str(args[1]), "tokenizer"
        )
        assert re.search(rf"{re.escape(str(variant))} is orlik's variant output, not a {kind}.*--force",
                         one_error_line(res.err)), args  # fmt: skip
    assert snapshot(tmp_path) == before
    # The same kind is replaced as before; a mark of the old default kind counts as any kind.
    with atomic_dir(variant, kind="variant") as tmp:
        (tmp / "model.gguf").write_bytes(b"GGUF" + bytes(32))
    assert owner.read_marker(variant)["kind"] == "variant"  # type: ignore[index]
    owner.write_marker(variant, owner.ANY_KIND, "complete")
    owner.check_replaceable(variant, kind="calibration")
    owner.write_marker(variant, "variant", "complete")
    with pytest.raises(OutputError, match="is orlik's variant output, not a checkpoint"):
        owner.check_replaceable(variant, kind="checkpoint")
    owner.check_replaceable(variant, kind="checkpoint", force=True)
    with (
        pytest.raises(OutputError, match="is orlik's variant output, not a checkpoint"),
        atomic_dir(variant, kind="checkpoint"),
    ):
        pass
    assert (variant / "model.gguf").read_bytes() == b"GGUF" + bytes(32)

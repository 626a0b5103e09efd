"""`orlik data clean` on a dirty corpus with known damage (training/data/synth.py): each injected
kind of damage is repaired or dropped and counted; bad input is one line and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from data_helpers import cli


@pytest.fixture(scope="module")
def dirty(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    from orlik.training.data import synth

    path = tmp_path_factory.mktemp("clean") / "web.jsonl"
    return path, synth.write(path, n=1500, seed=3)


@pytest.fixture(scope="module")
def cleaned(dirty: tuple[Path, dict[str, int]]) -> tuple[Path, dict]:
    path, _ = dirty
    out = path.with_name("clean.jsonl")
    r = cli("-q", "--json", "data", "clean", path, "--out", out)
    assert r.code == 0, r.err
    return out, json.loads(path.with_name("clean.report.json").read_text())


def test_every_damage_is_counted(dirty: tuple[Path, dict[str, int]], cleaned: tuple[Path, dict]) -> None:
    _, injected = dirty
    out, rep = cleaned
    dropped = rep["dropped"]
    assert dropped["exact_duplicate"] == injected["exact_duplicate"]
    # LSH is probabilistic: near duplicates at Jaccard ~0.85-0.95 are found with probability ~0.9+.
    assert 0.75 * injected["near_duplicate"] <= dropped["near_duplicate"] <= injected["near_duplicate"] + 3
    assert dropped["too_short"] >= injected["fragment"]
    assert dropped.get("low_letter_ratio", 0) + dropped.get("high_digit_ratio", 0) == injected["digits"]
    assert rep["changed_docs"]["control_chars_removed"] == injected["control"]
    assert rep["changed_docs"]["mojibake_repaired"] >= 0.5 * injected["mojibake"]
    assert rep["lines_removed"]["repeated_across_documents"] >= injected["boilerplate"]
    records = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert len(records) == rep["docs_out"] == rep["docs_in"] - sum(dropped.values())
    text = "\n".join(r["text"] for r in records)
    for junk in (
        "Akceptuję",
        "Wszelkie prawa zastrzeżone",
        "Portal Informacyjny",
        "\u200b",
        "\x07",
        "Ĺ‚",
        "Ä™",
    ):
        assert junk not in text, junk
    assert {"id", "lang", "domain", "text"} <= set(records[0])
    assert out.with_name("clean.report.md").read_text().startswith("# orlik data clean")


def test_clean_output_is_a_fixed_point(cleaned: tuple[Path, dict], tmp_path: Path) -> None:
    """The next stage (or clean again) accepts clean's output unchanged: nothing left to drop."""
    out, rep = cleaned
    r = cli("-q", "data", "clean", out, "--out", tmp_path / "again.jsonl")
    assert r.code == 0, r.err
    again = json.loads((tmp_path / "again.report.json").read_text())
    assert again["dropped"] == {} and again["docs_out"] == rep["docs_out"]
    assert (tmp_path / "again.jsonl").read_bytes() == out.read_bytes()


def test_text_input_and_threshold(tmp_path: Path) -> None:
    from orlik import corpus

    docs = [" ".join(d.text.split()) for d in corpus.documents(lang="pl", domain="history")[:6]]
    near = docs[0].replace(" ", "  ", 3).split(" ")
    near[10] = "inaczej"
    (tmp_path / "a.txt").write_text("\n\n".join([*docs, " ".join(near)]) + "\n", encoding="utf-8")
    r = cli("-q", "data", "clean", tmp_path / "a.txt", "--out", tmp_path / "a.jsonl")
    assert r.code == 0, r.err
    recs = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(recs) == 6 and recs[0]["source"] == "a.txt:1"
    r = cli("-q", "data", "clean", tmp_path / "a.txt", "--out", tmp_path / "b.jsonl", "--threshold", "0.98")
    assert r.code == 0 and len((tmp_path / "b.jsonl").read_text().splitlines()) == 7
    r = cli("-q", "data", "clean", tmp_path / "a.txt", "--out", tmp_path / "c.jsonl", "--threshold", "0.995")
    assert r.code == 2 and "--num-perm" in r.err and not (tmp_path / "c.jsonl").exists()


@pytest.mark.parametrize(
    ("content", "args", "words"),
    [
        (b'{"text": "za\xbf\xf3\xb3\xe6 g\xea\xb6l\xb1"}\n', [], "not UTF-8"),
        (b"", [], "no documents"),
        (b'{"tekst": "x"}\n', [], "'text'"),
        (b'{"text": "x"}\n', ["--threshold", "1.5"], "--threshold"),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path: Path, content: bytes, args: list[str], words: str) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(content)
    r = cli("-q", "data", "clean", src, "--out", tmp_path / "out.jsonl", *args)
    assert r.code == 2 and r.err.count("\n") == 1 and words in r.err, r.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


@pytest.mark.slow
def test_memory_is_flat(tmp_path: Path) -> None:
    """Peak RSS on 8 MB of input stays within 25 MB of the peak on 2 MB."""
    from orlik.training.data import synth

    peaks = []
    for mb in (2, 8):
        src = tmp_path / f"in{mb}.jsonl"
        synth.write(src, megabytes=mb, seed=mb)
        code = ("import resource, sys; from orlik.cli import main\n"
                "try: main(['-q', 'data', 'clean', sys.argv[1], '--out', sys.argv[2]])\n"
                "except SystemExit: pass\n"
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")  # fmt: skip
        p = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / f"o{mb}.jsonl")],
                           capture_output=True, text=True, check=True)  # fmt: skip
        peaks.append(int(p.stdout.split()[-1]) / 1024)
    assert peaks[1] - peaks[0] < 25, peaks

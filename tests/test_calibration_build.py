"""`orlik calibrate build`: token budget and Polish share, language id, dedup, held-out refusal,
chat rendering, determinism, atomic output and the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from orlik import corpus, paths
from orlik.calibration import build as calib
from orlik.calibration import dedup, langid
from orlik.errors import InputError
from orlik.fsutil import sha256_file

MIN_TOKENS = calib.MIN_TOKENS


def read(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "calibration.jsonl").read_text(encoding="utf-8").splitlines()]


def heldout_sentence(lang: str = "pl") -> str:
    """A long sentence of a held-out document (so it holds several word 8-grams)."""
    doc = corpus.documents(lang=lang, split="heldout")[0]
    sentence = max(corpus.sentences(doc.text), key=lambda s: len(s.split()))
    assert len(sentence.split()) >= 2 * dedup.HELDOUT_NGRAM
    return sentence


def train_paragraphs(lang: str, n: int) -> list[str]:
    """Train-split paragraphs that share no 8-gram with held-out text, so a filter cannot drop them."""
    index = dedup.HeldoutIndex(d.text for d in corpus.documents(split="heldout"))
    paras = [p for d in corpus.documents(lang=lang, split="train") for p in d.text.split("\n\n")]
    paras = [p for p in paras if len(p.split()) >= 30 and not index.overlaps(p)]
    return paras[:n]


@pytest.fixture(scope="module")
def mixed(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("calib") / "calib"
    card = calib.build(tiny_checkpoint, out, tokens=6000, pl_ratio=0.7, seed=0)
    return out, card


# ------------------------------------------------------------------ the built set


def test_mixed_set_meets_budget_and_polish_share(
    mixed: tuple[Path, dict[str, Any]], tiny_checkpoint: Path
) -> None:
    out, card = mixed
    recs = read(out)
    total = sum(r["tokens"] for r in recs)
    pl = sum(r["tokens"] for r in recs if r["lang"] == "pl")
    assert 6000 - MIN_TOKENS <= total <= 6000
    assert 4200 - MIN_TOKENS <= pl <= 4200  # round(6000 * 0.7)
    assert abs(card["result"]["pl_ratio"] - 0.7) < 0.005
    assert card["result"]["tokens"] == total and card["result"]["samples"] == len(recs)
    assert {r["lang"] for r in recs} == {"pl", "en"}
    assert set(card["result"]["tokens_by_source"]) >= {"corpus", "parallel"}
    assert len(card["result"]["tokens_by_domain"]) == len(corpus.DOMAINS)
    assert all(set(r) == {"text", "lang", "domain", "source", "tokens"} for r in recs)
    # the recorded counts are the model tokenizer's, without BOS/EOS
    from orlik.checkpoint import Checkpoint

    tok = Checkpoint.open(tiny_checkpoint).load_tokenizer()
    for r in recs[:20]:
        assert len(tok(r["text"], add_special_tokens=False)["input_ids"]) == r["tokens"]


def test_only_train_split_and_card_matches_files(mixed: tuple[Path, dict[str, Any]]) -> None:
    out, card = mixed
    recs = read(out)
    heldout_ids = {d.id for d in corpus.documents(split="heldout")}
    heldout_ids |= {p["id"] for p in corpus.parallel(split="heldout")}
    heldout_ids |= {c["id"] for c in corpus.chats(split="heldout")}
    used = {r["source"].split(":")[1].split("#")[0].split(" ")[0] for r in recs}
    assert not used & heldout_ids
    assert card["calibration_sha256"] == sha256_file(out / "calibration.jsonl")
    assert json.loads((out / "card.json").read_text()) == {k: v for k, v in card.items() if k != "out"}
    md = (out / "card.md").read_text()
    assert card["calibration_sha256"] in md and "| pl |" in md and "seed: 0" in md
    assert card["filters"]["langid"]["paragraphs"]["accuracy"] >= 0.99
    assert not list(out.parent.glob("*.partial"))


def test_same_seed_same_bytes_other_seed_differs(
    mixed: tuple[Path, dict[str, Any]], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    out, _ = mixed
    again = calib.build(tiny_checkpoint, tmp_path / "a", tokens=6000, pl_ratio=0.7, seed=0)
    assert (tmp_path / "a" / "calibration.jsonl").read_bytes() == (out / "calibration.jsonl").read_bytes()
    assert (tmp_path / "a" / "card.md").read_bytes() == (out / "card.md").read_bytes()
    other = calib.build(tiny_checkpoint, tmp_path / "b", tokens=6000, pl_ratio=0.7, seed=1)
    assert other["calibration_sha256"] != again["calibration_sha256"]


@pytest.mark.parametrize("lang", ["pl", "en"])
def test_single_language_sets_have_equal_token_counts(
    lang: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    card = calib.build(tiny_checkpoint, tmp_path / lang, tokens=3000, lang=lang, seed=0)
    recs = read(tmp_path / lang)
    assert {r["lang"] for r in recs} == {lang}
    assert 3000 - MIN_TOKENS <= card["result"]["tokens"] <= 3000
    assert card["result"]["pl_ratio"] == (1.0 if lang == "pl" else 0.0)


# ------------------------------------------------------------------ filters


def test_heldout_sentence_planted_in_user_file_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    planted = heldout_sentence("pl")
    clean = train_paragraphs("pl", 4)
    f = tmp_path / "mine.txt"
    f.write_text(
        "\n\n".join([clean[0], clean[1], f"Wstęp do akapitu. {planted} Koniec.", clean[2], clean[3]])
    )
    card = calib.build(tiny_checkpoint, tmp_path / "out", tokens=200, lang="pl", user_files=[f],
                       include_corpus=False, include_chat=False, include_parallel=False,
                       max_sample_tokens=64)  # fmt: skip
    assert card["drops"].get("heldout_overlap", 0) >= 1
    assert any(src.startswith(f"file:{f}") for src in card["drop_examples"]["heldout_overlap"])
    text = (tmp_path / "out" / "calibration.jsonl").read_text()
    words = planted.split()
    assert " ".join(words[:8]) not in text  # not even a fragment of it
    assert card["sources"][0]["sha256"] == sha256_file(f)


def test_user_file_with_only_heldout_text_is_an_empty_result(tiny_checkpoint: Path, tmp_path: Path) -> None:
    f = tmp_path / "leak.jsonl"
    f.write_text(json.dumps({"text": heldout_sentence("en"), "lang": "en"}) + "\n")
    with pytest.raises(InputError, match=r"no calibration samples left.*heldout_overlap 1"):
        calib.build(tiny_checkpoint, tmp_path / "out", tokens=100, user_files=[f], include_corpus=False,
                    include_chat=False, include_parallel=False)  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_duplicates_and_language_checks_are_counted(tiny_checkpoint: Path, tmp_path: Path) -> None:
    pl, en = train_paragraphs("pl", 3), train_paragraphs("en", 2)
    near = pl[1].rsplit(" ", 1)[0] + " inaczej."  # the same paragraph with its last word changed
    german = ("Die Stadtverwaltung hat am Dienstag beschlossen, die Straßenbahnlinie in die südlichen "
              "Bezirke zu verlängern, nachdem der Streit fast drei Jahre gedauert hatte.")  # fmt: skip
    rows = [
        {"text": pl[0], "domain": "mine"},
        {"text": pl[0].upper()},  # exact duplicate up to case
        {"text": pl[1]},
        {"text": near},  # near duplicate
        {"text": en[0], "lang": "pl"},  # declared Polish, is English
        {"text": german},  # neither Polish nor English
        {"text": en[1]},  # undeclared English: takes the detected language
        {"text": pl[2], "lang": "pl"},
    ]
    f = tmp_path / "mine.jsonl"
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    card = calib.build(tiny_checkpoint, tmp_path / "out", tokens=100, pl_ratio=0.5, user_files=[f],
                       include_corpus=False, include_chat=False, include_parallel=False)  # fmt: skip
    assert card["drops"] == {"duplicate_exact": 1, "duplicate_near": 1, "lang_mismatch": 1, "lang_other": 1}
    assert card["drop_examples"]["lang_mismatch"] == [f"file:{f}:5 (detected en)"]
    assert card["available_tokens"]["en"] > 0 and card["available_tokens"]["pl"] > 0
    assert any("took the detected language" in n for n in card["notes"])
    recs = read(tmp_path / "out")
    assert {r["domain"] for r in recs} <= {"mine", "user"}


def test_directory_of_user_files(tiny_checkpoint: Path, tmp_path: Path) -> None:
    pl, en = train_paragraphs("pl", 2), train_paragraphs("en", 1)
    d = tmp_path / "texts"
    (d / "sub").mkdir(parents=True)
    (d / ".git").mkdir()
    (d / "a.txt").write_text(pl[0], encoding="utf-8-sig")  # a BOM is not part of the text
    (d / "sub" / "b.jsonl").write_text(
        json.dumps({"text": pl[1], "lang": "pl-PL", "domain": "notes"}) + "\n\n"
        + json.dumps({"text": en[0]}) + "\n"
    )  # fmt: skip
    (d / ".git" / "c.txt").write_text("ignored")
    (d / "d.bin").write_bytes(b"\x00")
    card = calib.build(tiny_checkpoint, tmp_path / "out", tokens=60, lang="pl", user_files=[d],
                       include_corpus=False, include_chat=False, include_parallel=False)  # fmt: skip
    assert [s["path"] for s in card["sources"]] == [str(d / "a.txt"), str(d / "sub" / "b.jsonl")]
    assert card["drops"] == {} and any("1 user samples in the other language" in n for n in card["notes"])
    recs = read(tmp_path / "out")
    assert {r["domain"] for r in recs} <= {"user", "notes"} and all(r["lang"] == "pl" for r in recs)
    assert not any(r["text"].startswith("\ufeff") for r in recs)


def test_near_duplicate_index() -> None:
    text = " ".join(f"słowo{i}" for i in range(60))
    idx = dedup.NearDuplicates(0.8)
    assert not idx.seen(text)
    assert idx.seen(text.replace("słowo59", "inne"))  # Jaccard 55/57
    assert not idx.seen(" ".join(f"inny{i}" for i in range(60)))
    half = " ".join(f"słowo{i}" for i in range(30)) + " " + " ".join(f"x{i}" for i in range(30))
    assert not idx.seen(half)  # Jaccard 26/86: related, not a duplicate


def test_langid_accuracy_on_heldout_corpus() -> None:
    # Measured with lingua 2.1: 1.0 of 206 paragraphs, 0.9985 of 683 sentences (one short English
    # sentence mistaken). The bounds leave room for the corpus to grow, not for a broken detector.
    acc = langid.accuracy()
    assert acc["paragraphs"]["n"] >= 100 and acc["paragraphs"]["accuracy"] >= 0.99
    assert acc["sentences"]["n"] >= 300 and acc["sentences"]["accuracy"] >= 0.98
    assert langid.detect(
        ["Zażółć gęślą jaźń, powiedział wczoraj dyrektor szkoły.", "The cat sat on the mat."]
    ) == [
        "pl",
        "en",
    ]


# ------------------------------------------------------------------ chats


def test_chats_are_rendered_through_the_checkpoint_template(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from orlik.checkpoint import Checkpoint

    root = tmp_path / "corpus"
    root.mkdir()
    for name in ("pl", "en"):
        (root / name).symlink_to(corpus.DATA_DIR / name)
    paras = train_paragraphs("pl", 6)
    system = [{"role": "system", "content": "Jesteś uprzejmym przewodnikiem po mieście."}]
    chats = [
        {"id": f"c{i}", "lang": "pl", "domain": "dialogue", "split": "train", "messages": [
            *(system if i == 0 else []),
            {"role": "user", "content": f"Jak dojechać na dworzec numer {i}? {p[:200]}"},
            {"role": "assistant", "content": f"Proszę jechać tramwajem. {q[:200]}"}]}
        for i, (p, q) in enumerate(zip(paras[:3], paras[3:], strict=True))
    ]  # fmt: skip
    (root / "chat.jsonl").write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chats))
    tok = Checkpoint.open(tiny_checkpoint).load_tokenizer()
    card = calib.build(tiny_checkpoint, tmp_path / "out", tokens=200, lang="pl", corpus_root=root,
                       include_corpus=False, include_parallel=False)  # fmt: skip
    recs = [r for r in read(tmp_path / "out") if r["source"].startswith("chat:")]
    assert card["result"]["samples_by_source"].get("chat") == len(recs) >= 1
    for r in recs:
        c = next(c for c in chats if f"chat:{c['id']}" == r["source"])
        rendered = tok.apply_chat_template(c["messages"], tokenize=False)
        assert r["text"] == rendered.removeprefix(tok.bos_token or "")  # BOS is the runtime's to add
        assert r["tokens"] == len(tok(r["text"], add_special_tokens=False)["input_ids"])
        assert r["text"] != "\n".join(m["content"] for m in c["messages"])  # the template added markup


# ------------------------------------------------------------------ output and CLI


def test_cli_default_out_and_rebuild_keeps_other_files(checkpoint_copy: Path, orlik_cli: Any) -> None:
    build = ["--json", "calibrate", "build", str(checkpoint_copy), "--lang", "en"]
    code, out, err = orlik_cli(*[*build, "--tokens", "800", "--no-chat", "--no-parallel"])
    assert code == 0, err
    res = json.loads(out)
    calib_dir = paths.calib_dir(checkpoint_copy)  # the one rule: <ckpt>-orlik/calib for this folder
    assert calib_dir == checkpoint_copy.parent / f"{checkpoint_copy.name}-orlik" / "calib"
    assert Path(res["out"]) == calib_dir.resolve() and res["tokens_by_source"] == {"corpus": res["tokens"]}
    (calib_dir / "imatrix.gguf").write_bytes(b"not ours")
    code, out, err = orlik_cli(*[*build, "--tokens", "900"])
    assert code == 0, err
    assert (calib_dir / "imatrix.gguf").read_bytes() == b"not ours"
    assert json.loads((calib_dir / "card.json").read_text())["request"]["tokens"] == 900


def _bad_files(tmp: Path) -> dict[str, Path]:
    (tmp / "cp1250.txt").write_bytes("Zażółć gęślą jaźń".encode("cp1250"))
    (tmp / "empty.txt").write_text("  \n")
    (tmp / "nofield.jsonl").write_text('{"body": "x"}\n')
    (tmp / "doc.pdf").write_bytes(b"%PDF")
    return {p.stem: p for p in tmp.iterdir()}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tokens", "0"], "--tokens must be a positive"),
        (["--pl-ratio", "1.5"], "--pl-ratio must be between 0 and 1"),
        (["--pl-ratio", "-0.1"], "--pl-ratio must be between 0 and 1"),
        (["--file", "{tmp}/missing.txt"], "missing.txt does not exist"),
        (["--file", "{cp1250}"], "is not UTF-8"),
        (["--file", "{empty}"], "is empty"),
        (["--file", "{nofield}"], 'nofield.jsonl:1: expected an object with a "text" string'),
        (["--file", "{doc}"], "unsupported file type .pdf"),
        (["--no-corpus", "--no-chat", "--no-parallel"], "nothing to calibrate on"),
        (
            ["--tokens", "10000000"],
            r"needs 7000000 pl \+ 3000000 en tokens but the sources hold \d+ pl and \d+ en",
        ),
        (["--lang", "en", "--tokens", "10000000"], r"of --lang en: needs 10000000 en tokens .* hold \d+ en"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    args: list[str], message: str, tiny_checkpoint: Path, tmp_path: Path, orlik_cli: Any
) -> None:
    import re

    files = _bad_files(tmp_path)
    args = [a.format(tmp=tmp_path, **files) for a in args]
    out = tmp_path / "out"
    code, _, err = orlik_cli(*["calibrate", "build", str(tiny_checkpoint), "--out", str(out), *args])
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("orlik: error:")]
    assert len(lines) == 1 and re.search(message, lines[0]), err
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_failed_rebuild_leaves_previous_set_intact(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "calib"
    card = calib.build(
        tiny_checkpoint, out, tokens=500, lang="pl", include_parallel=False, include_chat=False
    )
    with pytest.raises(InputError):
        calib.build(tiny_checkpoint, out, tokens=10_000_000, lang="pl")
    assert sha256_file(out / "calibration.jsonl") == card["calibration_sha256"]
    assert not list(tmp_path.glob("*.partial"))

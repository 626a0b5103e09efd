"""The built-in Polish-English corpus (issue 3 §3): its size, domains, record kinds and fields, and a
held-out split that is large enough and never leaks into the train split."""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path
from typing import Any

import pytest

from orlik import corpus
from orlik.errors import InputError

NAMED_DOMAINS = {"news", "science", "law", "medicine", "history", "technology", "cooking", "travel",
                 "dialogue", "literature"}  # fmt: skip
POLISH_LETTERS = set("ąćęłńóśźżĄĆĘŁŃÓŚŹŻ")


def raw_records() -> list[tuple[str, dict[str, Any]]]:
    """Every JSONL record under the data dir, as written, with its file name."""
    out = []
    for f in sorted(corpus.DATA_DIR.rglob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                out.append((str(f.relative_to(corpus.DATA_DIR)), json.loads(line)))
    return out


def texts(split: str) -> list[str]:
    """All prose of one split: documents, both sides of parallel pairs, chat turns, preference texts."""
    out = [d.text for d in corpus.documents(split=split)]
    out += [p[k] for p in corpus.parallel(split=split) for k in ("pl", "en")]
    out += [m["content"] for c in corpus.chats(split=split) for m in c["messages"]]
    out += [p[k] for p in corpus.preferences(split=split) for k in ("prompt", "chosen", "rejected")]
    return out


def norm(s: str) -> str:
    return " ".join(s.split())


def test_size_per_language() -> None:
    size = {
        lang: sum(len(d.text.encode("utf-8")) for d in corpus.documents(lang=lang)) for lang in corpus.LANGS
    }
    assert size["pl"] >= 150_000, size
    assert size["en"] >= 60_000, size


@pytest.mark.parametrize("lang", corpus.LANGS)
def test_domains_per_language(lang: str) -> None:
    by_domain = collections.Counter()
    for d in corpus.documents(lang=lang):
        by_domain[d.domain] += len(d.text.encode("utf-8"))
    assert len(by_domain) >= 10 and set(by_domain) >= NAMED_DOMAINS, sorted(by_domain)
    # Every domain is substantial, not a token paragraph: at least 3% of the language's text.
    total = sum(by_domain.values())
    assert min(by_domain.values()) >= 0.03 * total, by_domain


def test_polish_uses_full_diacritics() -> None:
    docs = corpus.documents(lang="pl")
    assert all(POLISH_LETTERS & set(d.text) for d in docs)
    used = set("".join(d.text for d in docs)) & POLISH_LETTERS
    assert set("ąćęłńóśźż") <= used, sorted(POLISH_LETTERS - used)


def test_record_counts_and_shapes() -> None:
    par, chats, prefs = corpus.parallel(), corpus.chats(), corpus.preferences()
    assert len(par) >= 300
    assert all(p["pl"].strip() and p["en"].strip() and p["pl"] != p["en"] for p in par)
    assert len(chats) >= 200
    for c in chats:
        roles = [m["role"] for m in c["messages"]]
        body = roles[1:] if roles[0] == "system" else roles
        # user/assistant alternate, starting with the user and ending with the assistant
        assert body[0::2] == ["user"] * len(body[0::2]) and body[1::2] == ["assistant"] * len(body[1::2]), c[
            "id"
        ]
        assert body[-1] == "assistant" and all(m["content"].strip() for m in c["messages"]), c["id"]
    multi_turn = sum(sum(m["role"] == "user" for m in c["messages"]) >= 2 for c in chats)
    with_system = sum(c["messages"][0]["role"] == "system" for c in chats)
    assert multi_turn >= 20 and with_system >= 20, (multi_turn, with_system)
    assert sum(c["lang"] == "pl" for c in chats) >= 200
    assert len(prefs) >= 100
    assert all(p["chosen"].strip() and p["rejected"].strip() and p["chosen"] != p["rejected"] for p in prefs)


def test_every_record_has_lang_domain_split_and_a_unique_id() -> None:
    recs = raw_records()
    assert len(recs) > 600
    for f, r in recs:
        assert isinstance(r.get("lang"), str) and r["lang"], (f, r.get("id"))
        assert isinstance(r.get("domain"), str) and r["domain"], (f, r.get("id"))
        assert r.get("split") in corpus.SPLITS, (f, r.get("id"))
    ids = collections.Counter(r["id"] for _, r in recs)
    assert [i for i, n in ids.items() if n > 1] == []
    for f, r in recs:
        if f.startswith(("pl/", "en/")):
            assert r["lang"] == f[:2] and r["domain"] == Path(f).stem, (f, r["id"])


@pytest.mark.parametrize("lang", corpus.LANGS)
def test_heldout_share_per_language(lang: str) -> None:
    docs = corpus.documents(lang=lang)
    total = sum(len(d.text) for d in docs)
    held = sum(len(d.text) for d in docs if d.split == "heldout")
    assert held / total >= 0.15, held / total
    # Held out across the domains, so the evaluation text is not one topic.
    assert len({d.domain for d in docs if d.split == "heldout"}) >= 8


def test_other_record_kinds_have_a_heldout_share() -> None:
    for name, recs in (
        ("parallel", corpus.parallel()),
        ("chats", corpus.chats()),
        ("prefs", corpus.preferences()),
    ):
        share = sum(r["split"] == "heldout" for r in recs) / len(recs)
        assert share >= 0.15, (name, share)


def test_no_heldout_sentence_appears_in_train_split() -> None:
    """Sentences of 4+ words: shorter ones ("Tak.", "– Dzień dobry.", list numbers "2.") repeat in any
    language and identify nothing."""
    train = {norm(s) for t in texts("train") for s in corpus.sentences(t)}
    held = {norm(s) for t in texts("heldout") for s in corpus.sentences(t) if len(s.split()) >= 4}
    assert len(held) > 500
    leaked = sorted(held & train)
    assert leaked == []
    # Nor does a whole held-out paragraph hide inside a train text with other sentence breaks.
    train_blob = norm("\n".join(texts("train")))
    paragraphs = [norm(p) for d in corpus.documents(split="heldout") for p in d.text.split("\n\n")]
    assert [p[:60] for p in paragraphs if len(p) > 80 and p in train_blob] == []


def test_duplicate_sentences_under_one_percent() -> None:
    counts = collections.Counter(
        norm(s) for split in corpus.SPLITS for t in texts(split) for s in corpus.sentences(t)
    )
    total = sum(counts.values())
    duplicates = total - len(counts)
    assert total > 5000
    assert duplicates / total < 0.01, counts.most_common(10)


def test_heldout_text_is_fixed_and_in_corpus_order() -> None:
    a, b = corpus.heldout_text("pl"), corpus.heldout_text("pl")
    assert a == b and len(a) > 30_000
    first = corpus.documents(lang="pl", split="heldout")[0]
    assert a.startswith(first.text)


def test_bad_corpus_files_are_one_line_input_errors(tmp_path: Path) -> None:
    (tmp_path / "pl").mkdir()
    (tmp_path / "pl" / "news.jsonl").write_text('{"id": "x", "lang": "pl"\n', encoding="utf-8")
    with pytest.raises(InputError, match=re.escape("news.jsonl:1: invalid JSON")):
        corpus.documents(root=tmp_path)
    (tmp_path / "pl" / "news.jsonl").write_text(
        '{"id": "x", "lang": "pl", "domain": "news", "split": "test", "text": "Ala ma kota."}\n',
        encoding="utf-8",
    )
    with pytest.raises(InputError, match="record x has split 'test'"):
        corpus.documents(root=tmp_path)
    (tmp_path / "pl" / "news.jsonl").write_text('{"id": "x", "lang": "pl", "split": "train", "text": "t"}\n')
    with pytest.raises(InputError, match="record x has no 'domain'"):
        corpus.documents(root=tmp_path)
    (tmp_path / "pl" / "news.jsonl").write_bytes("Zażółć".encode("cp1250"))
    with pytest.raises(InputError, match="is not UTF-8"):
        corpus.documents(root=tmp_path)


def test_jsonl_records_end_only_at_newlines(tmp_path: Path) -> None:
    """JSON written with ensure_ascii=False keeps U+2028, U+0085 and form feeds raw inside strings;
    they are not record ends (str.splitlines() would cut such a record in two)."""
    import json

    texts = ["Ala ma kota\u2028i psa.", "Zdanie\u0085drugie", "strona\x0cdruga"]
    f = tmp_path / "calibration.jsonl"
    f.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    assert [r["text"] for r in corpus.read_jsonl(f)] == texts
    f.write_text('{"text": "a"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(InputError, match=re.escape("calibration.jsonl:2: expected a JSON object")):
        corpus.read_jsonl(f)

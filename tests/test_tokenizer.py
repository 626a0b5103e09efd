"""The SentencePiece tokenizer: its Table-2 style efficiency report, exact round trips of Polish text,
single-token ChatML markers, and the same tokens whichever way a checkpoint is loaded."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from orlik.errors import InputError
from orlik.training import tokenizer

POLISH = "Zażółć gęślą jaźń. ŹDŹBŁO, Łódź i Ćmielów — żółw źle śpi; ĄĘ ńó."
UNSEEN = "漢字 🙂 ŉ ß Ω"  # characters the corpus never shows: byte fallback, never <unk>


def test_report_has_cpt_and_tpw_for_each_tokenizer(tokenizer_dir: Path) -> None:
    rep = json.loads((tokenizer_dir / "report.json").read_text())
    assert rep["vocab_size"] == 2000 and rep["english_only_vocab_size"] <= 2000
    assert set(rep["heldout"]) == {"pl", "en"}
    for lang, rows in rep["heldout"].items():
        assert set(rows) == {"orlik pl-en", "English-only", "bytes (UTF-8)"}, lang
        for name, m in rows.items():
            assert m["tokens"] > 1000 and m["chars_per_token"] > 0 and m["tokens_per_word"] > 0, (lang, name)
            assert m["chars_per_token"] * m["tokens_per_word"] == pytest.approx(
                rows["bytes (UTF-8)"]["chars_per_token"] * rows["bytes (UTF-8)"]["tokens_per_word"], rel=1e-9
            )  # both are ratios of the same characters and words
        assert rows["bytes (UTF-8)"]["chars_per_token"] <= 1.0
    md = (tokenizer_dir / "report.md").read_text()
    assert "| pl | orlik pl-en |" in md and "| en | English-only |" in md


def test_polish_english_tokenizer_beats_english_only_on_polish(tokenizer_dir: Path) -> None:
    pl = json.loads((tokenizer_dir / "report.json").read_text())["heldout"]["pl"]
    en = json.loads((tokenizer_dir / "report.json").read_text())["heldout"]["en"]
    # Measured (vocab 2000): 2.64 vs 1.52 chars/token on Polish; English-only wins on English.
    assert pl["orlik pl-en"]["chars_per_token"] > 1.3 * pl["English-only"]["chars_per_token"]
    assert pl["orlik pl-en"]["tokens_per_word"] < pl["English-only"]["tokens_per_word"]
    assert en["English-only"]["chars_per_token"] > en["orlik pl-en"]["chars_per_token"]
    for lang in (pl, en):
        assert lang["orlik pl-en"]["chars_per_token"] > 2 * lang["bytes (UTF-8)"]["chars_per_token"]


@pytest.mark.parametrize(
    "text", [POLISH, UNSEEN, "dwie  spacje\n\ttab\n\nakapit  ", "Cena: 12 345,67 zł (23% VAT)"]
)
def test_text_round_trips_exactly(text: str, tokenizer_dir: Path) -> None:
    """Internal and trailing whitespace included. (A *leading* space is the one thing transformers'
    SentencePiece decoding drops: it strips what it takes for the dummy prefix.)"""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    assert sp.decode(sp.encode(text)) == text


def test_polish_letters_are_pieces_not_bytes(tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    pieces = tok.convert_ids_to_tokens(tok.encode("ą ć ę ł ń ó ś ź ż Ł Ś Ż", add_special_tokens=False))
    assert not [p for p in pieces if p.startswith("<0x")], pieces


def test_chatml_markers_are_single_tokens(tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    for marker in tokenizer.CHAT_TOKENS:
        (i,) = tok.encode(marker, add_special_tokens=False)
        assert tok.convert_ids_to_tokens(i) == marker
    ids = tok.encode("<|im_start|>user\nCześć<|im_end|>", add_special_tokens=False)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[-1] == tok.convert_tokens_to_ids(
        "<|im_end|>"
    )
    # convert_hf_to_gguf.py reads this to mark them as control tokens for llama.cpp.
    decoder = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert {v["content"] for v in decoder.values()} >= {"<s>", "</s>", *tokenizer.CHAT_TOKENS}


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_checkpoint_tokenizer_matches_sentencepiece(
    arch: str, tiny_checkpoint: Path, family_checkpoint: Callable[[str], Path]
) -> None:
    """Regression: transformers 5 loads a qwen2 directory's tokenizer as its byte-level Qwen2Tokenizer,
    which dropped every Polish letter; Checkpoint.load_tokenizer must give SentencePiece's tokens."""
    import sentencepiece as spm

    from orlik.checkpoint import Checkpoint

    path = tiny_checkpoint if arch == "llama" else family_checkpoint(arch)
    tok = Checkpoint.open(path).load_tokenizer()
    sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    assert tok.encode(POLISH, add_special_tokens=False) == sp.encode(POLISH)
    assert tok.decode(tok.encode(POLISH, add_special_tokens=False)) == POLISH


def test_bad_vocab_size_and_empty_corpus(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="vocab size must be at least 300"):
        tokenizer.build(tmp_path / "t", vocab_size=100)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no corpus documents"):
        tokenizer.build(tmp_path / "t", corpus_dir=tmp_path / "empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]

"""SentencePiece BPE tokenizer for the corpus, exported as Hugging Face files, and its
token-efficiency report (characters per token, tokens per word), as in Bielik 7B's Table 2."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from orlik import corpus, owner
from orlik.errors import InputError
from orlik.fsutil import atomic_dir

SPECIAL = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]  # ChatML markers, single tokens for the qwen2 family
HF_FILES = ("tokenizer.json", "tokenizer.model")


def training_lines(corpus_dir: Path | None = None, langs: Iterable[str] = corpus.LANGS) -> list[str]:
    """Train-split text: paragraphs of documents, parallel sentences and chat turns."""
    root = Path(corpus_dir or corpus.DATA_DIR)
    langs = tuple(langs)
    lines: list[str] = []
    for d in corpus.documents(split="train", root=root):
        if d.lang in langs:
            lines += [p for p in d.text.split("\n\n") if p.strip()]
    if (root / "parallel.jsonl").is_file():
        for p in corpus.parallel(split="train", root=root):
            lines += [p[lang] for lang in langs]
    if "pl" in langs and (root / "chat.jsonl").is_file():
        for c in corpus.chats(split="train", root=root):
            lines += [m["content"] for m in c["messages"]]
    if not lines:
        raise InputError(f"the corpus under {root} has no training text for {', '.join(langs)}")
    return lines


def train_spm(lines: list[str], vocab_size: int, *, exact: bool = True) -> bytes:
    """Train a byte-fallback BPE model; returns the serialized tokenizer.model."""
    import sentencepiece as spm

    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=buf,
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,  # no <unk> on unseen characters: every byte is representable
            character_coverage=0.9999,
            split_digits=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            user_defined_symbols=CHAT_TOKENS,
            normalization_rule_name="identity",  # keep text byte-exact, as llama.cpp expects
            remove_extra_whitespaces=False,
            max_sentence_length=16384,
            num_threads=1,  # deterministic merges
            hard_vocab_limit=exact,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise InputError(f"tokenizer training failed: {e}") from None
    return buf.getvalue()


def export_hf(model_bytes: bytes, out: Path) -> None:
    """Write tokenizer.model plus tokenizer.json/tokenizer_config.json (transformers' conversion)."""
    from transformers import AutoTokenizer

    (out / "tokenizer.model").write_bytes(model_bytes)
    cfg = {
        "tokenizer_class": "LlamaTokenizer",
        **{f"{k}_token": v for k, v in SPECIAL.items()},
        "add_bos_token": True,
        "add_eos_token": False,
        # Legacy SentencePiece spacing (Llama 2, Mistral): a "▁" starts the text after every special
        # token. llama.cpp always tokenizes that way, so HF and GGUF runtimes see the same chat prompt.
        "legacy": True,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    tok = AutoTokenizer.from_pretrained(str(out))
    tok.save_pretrained(str(out))
    # convert_hf_to_gguf.py marks control tokens from added_tokens_decoder, which transformers 5 no
    # longer writes; without it llama.cpp spells "<|im_start|>" out of ordinary pieces.
    saved = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    saved["legacy"] = True  # save_pretrained drops it, and LlamaTokenizer then rebuilds with "first"
    saved["added_tokens_decoder"] = {
        str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                 "single_word": t.single_word, "special": t.special}
        for i, t in sorted(tok.added_tokens_decoder.items())
    }  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(saved, indent=2, ensure_ascii=False))


def efficiency(encode: Any, text: str) -> dict[str, float]:
    """Characters per token and tokens per word of one text."""
    n_tok = len(encode(text))
    words = len(text.split())
    return {"chars_per_token": len(text) / n_tok, "tokens_per_word": n_tok / words, "tokens": n_tok}


def report(model_bytes: bytes, corpus_dir: Path | None = None, vocab_size: int = 8000) -> dict[str, Any]:
    """Compare the Polish-English tokenizer with an English-only one trained the same way, and bytes."""
    import sentencepiece as spm

    root = Path(corpus_dir or corpus.DATA_DIR)
    ours = spm.SentencePieceProcessor(model_proto=model_bytes)
    en_only = spm.SentencePieceProcessor(
        model_proto=train_spm(training_lines(root, langs=("en",)), vocab_size, exact=False)
    )
    rows: dict[str, Any] = {}
    for lang in corpus.LANGS:
        text = corpus.heldout_text(lang, root=root)
        if not text:
            continue
        rows[lang] = {
            "orlik pl-en": efficiency(ours.encode, text),
            "English-only": efficiency(en_only.encode, text),
            "bytes (UTF-8)": efficiency(lambda s: s.encode("utf-8"), text),
        }
    return {
        "vocab_size": ours.get_piece_size(),
        "english_only_vocab_size": en_only.get_piece_size(),
        "heldout": rows,
    }


def report_markdown(rep: dict[str, Any]) -> str:
    lines = [
        "# Tokenizer efficiency on held-out text",
        "",
        f"orlik pl-en: SentencePiece BPE, byte fallback, vocab {rep['vocab_size']}. "
        f"English-only: the same recipe on the English train text (vocab {rep['english_only_vocab_size']}).",
        "",
        "| text | tokenizer | chars/token | tokens/word | tokens |",
        "|---|---|---:|---:|---:|",
    ]
    for lang, by_tok in rep["heldout"].items():
        for name, m in by_tok.items():
            lines.append(
                f"| {lang} | {name} | {m['chars_per_token']:.2f} | {m['tokens_per_word']:.2f} | {m['tokens']} |"
            )
    return "\n".join(lines) + "\n"


def build(
    out: Path, *, vocab_size: int = 8000, corpus_dir: Path | None = None, seed: int = 0, force: bool = False
) -> dict[str, Any]:
    """Train, export and report. `seed` is recorded; BPE training itself is deterministic.

    An existing `out` is replaced only if orlik made it, or with `force`."""
    if vocab_size < 300:
        raise InputError("vocab size must be at least 300 (256 byte pieces + specials + merges)")
    owner.check_replaceable(Path(out), force=force, kind="tokenizer")  # before the training, not after it
    lines = training_lines(corpus_dir)
    model_bytes = train_spm(lines, vocab_size)
    rep = report(model_bytes, corpus_dir, vocab_size)
    rep["seed"] = seed
    out = Path(out)
    with atomic_dir(out, force=force, kind="tokenizer") as tmp:
        export_hf(model_bytes, tmp)
        (tmp / "report.json").write_text(json.dumps(rep, indent=2))
        (tmp / "report.md").write_text(report_markdown(rep))
    return rep


def copy_into(tokenizer_dir: Path, dest: Path) -> None:
    """Copy the tokenizer files (not the report) into a checkpoint directory."""
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        src = Path(tokenizer_dir) / name
        if src.is_file():
            shutil.copy2(src, Path(dest) / name)

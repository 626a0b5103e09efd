"""The calibration card: card.json for tools, card.md for people, both from one dict."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orlik import __version__
from orlik.fsutil import sha256_bytes, sha256_file

if TYPE_CHECKING:
    from .sources import Sample

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def tokenizer_hash(path: Path) -> str:
    """One sha256 over the files that decide tokenization and the chat template (not the weights)."""
    parts = [f"{n}:{sha256_file(path / n)}" for n in TOKENIZER_FILES if (path / n).is_file()]
    return sha256_bytes("\n".join(parts).encode())


def _tally(chosen: list[Sample], key: str) -> dict[str, int]:
    t: Counter[str] = Counter()
    for s in chosen:
        t[getattr(s, key)] += s.tokens
    return dict(sorted(t.items(), key=lambda kv: (-kv[1], kv[0])))


def make(
    chosen: list[Sample],
    data: bytes,
    *,
    model: dict[str, Any],
    request: dict[str, Any],
    sources: list[dict[str, Any]],
    available: dict[str, int],
    filters: dict[str, Any],
    drops: dict[str, int],
    drop_examples: dict[str, list[str]],
    notes: list[str],
) -> dict[str, Any]:
    """The card of a built set: what was asked, what came out, what was dropped, and its hash."""
    by_lang = _tally(chosen, "lang")
    total = sum(s.tokens for s in chosen)
    return {
        "schema": 1,
        "orlik_version": __version__,
        "model": model,
        "request": request,
        "result": {
            "samples": len(chosen),
            "tokens": total,
            "tokens_by_lang": by_lang,
            "pl_ratio": round(by_lang.get("pl", 0) / total, 4) if total else 0.0,
            "tokens_by_domain": _tally(chosen, "domain"),
            "tokens_by_source": _tally(chosen, "kind"),
            "samples_by_source": dict(sorted(Counter(s.kind for s in chosen).items())),
        },
        "sources": sources,
        "available_tokens": available,
        "filters": filters,
        "drops": drops,
        "drop_examples": drop_examples,
        "notes": notes,
        "calibration_sha256": sha256_bytes(data),
    }


def _table(rows: list[tuple[Any, ...]], head: tuple[str, ...]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def _share(n: int, total: int) -> str:
    return f"{100 * n / total:.1f}%" if total else "-"


def to_markdown(card: dict[str, Any]) -> str:
    """card.md: what the set holds, where it came from, what was filtered out and why."""
    lines = [*_summary_lines(card), *_source_lines(card), *_filter_lines(card), *_drop_lines(card)]
    return "\n".join(lines) + "\n"


def _summary_lines(card: dict[str, Any]) -> list[str]:
    req, res = card["request"], card["result"]
    total = res["tokens"]
    return [
        "# Calibration set",
        "",
        f"`calibration.jsonl`: {res['samples']} samples, **{total} tokens** "
        f"(requested {req['tokens']}), counted with the tokenizer of `{card['model']['path']}`.",
        "",
        f"- language: {req['lang']}; Polish share {res['pl_ratio']:.4f} (requested {req['pl_ratio']})",
        f"- seed: {req['seed']}; text cut into samples of at most {req['max_sample_tokens']} tokens "
        "(chats are kept whole)",
        f"- sha256 of calibration.jsonl: `{card['calibration_sha256']}`",
        f"- tokenizer sha256: `{card['model']['tokenizer_sha256']}`",
        "",
        "## Tokens per language",
        "",
        *_table(
            [(k, v, _share(v, total)) for k, v in res["tokens_by_lang"].items()], ("lang", "tokens", "share")
        ),
        "",
        "## Tokens per domain",
        "",
        *_table(
            [(k, v, _share(v, total)) for k, v in res["tokens_by_domain"].items()],
            ("domain", "tokens", "share"),
        ),
        "",
        "## Sources",
        "",
        *_table(
            [
                (k, res["samples_by_source"].get(k, 0), v, _share(v, total))
                for k, v in res["tokens_by_source"].items()
            ],
            ("source", "samples", "tokens", "share"),
        ),
        "",
    ]


def _source_lines(card: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for s in card["sources"]:
        desc = ", ".join(f"{k}={v}" for k, v in s.items() if k != "kind")
        lines.append(f"- {s['kind']}: {desc}")
    avail = card["available_tokens"]
    lines += [
        "",
        "Tokens available after filtering: " + ", ".join(f"{k} {v}" for k, v in avail.items()) + ".",
        "",
    ]
    return lines


def _filter_lines(card: dict[str, Any]) -> list[str]:
    f = card["filters"]
    lid, near = f["langid"], f["near_duplicates"]
    return [
        "## Filters",
        "",
        f"- language id: {lid['method']} (lingua {lid['lingua_version']}). Accuracy on the held-out "
        f"corpus: {lid['paragraphs']['accuracy']:.4f} of {lid['paragraphs']['n']} paragraphs, "
        f"{lid['sentences']['accuracy']:.4f} of {lid['sentences']['n']} sentences.",
        f"- duplicates: exact (normalised text) and near (MinHash over word {near['shingle']}-grams, "
        f"Jaccard >= {near['threshold']}).",
        f"- held-out overlap: any shared word {f['heldout']['ngram']}-gram with the held-out split "
        f"({f['heldout']['ngrams']} n-grams) refuses a sample.",
        "",
    ]


def _drop_lines(card: dict[str, Any]) -> list[str]:
    lines = ["## Dropped candidates", ""]
    drops = card["drops"]
    if drops:
        lines += _table(
            [(k, v, ", ".join(card["drop_examples"].get(k, []))) for k, v in drops.items()],
            ("reason", "samples", "examples"),
        )
    else:
        lines.append("None.")
    if card["notes"]:
        lines += ["", "## Notes", "", *(f"- {n}" for n in card["notes"])]
    return lines

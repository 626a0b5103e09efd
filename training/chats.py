"""Chat and preference data for post-training: reading and checking JSONL, sample weights, and the
assistant-token label mask for any chat template.

A chat record is `{"messages": [{"role": ..., "content": ...}, ...]}` with an optional `quality`
(high | medium | low) or `weight` (a positive number). A preference record is
`{"prompt": ..., "chosen": ..., "rejected": ...}` (the prompt a string or a list of messages).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orlik import corpus
from orlik.errors import InputError

# WICEL's per-sample weights by quality label (Bielik 7B v0.1, section 3.3).
QUALITY_WEIGHTS = {"high": 1.0, "medium": 0.7, "low": 0.5}
ROLES = ("system", "user", "assistant")
IGNORE = -100  # the label of a token that carries no loss


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) for every non-blank line (orlik.corpus's reader: a line that is not a
    JSON object, or a file that is not UTF-8, is a one-line error); a file with no record is one too."""
    out = corpus.read_jsonl_lines(Path(path))
    if not out:
        raise InputError(f"{path} holds no records")
    return out


def check_chat(rec: dict[str, Any], where: str) -> dict[str, Any]:
    """The record as {"messages", "weight"}; a one-line InputError naming `where` otherwise."""
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise InputError(f"{where}: missing 'messages' (a list of {{role, content}})")
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise InputError(f"{where}: each message needs a role ({', '.join(ROLES)}) and a string content")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
        raise InputError(f"{where}: the chat has no assistant turn to learn from")
    if "quality" in rec and "weight" in rec:
        raise InputError(f"{where}: give 'quality' or 'weight', not both")
    weight = 1.0
    if "quality" in rec:
        if rec["quality"] not in QUALITY_WEIGHTS:
            raise InputError(
                f"{where}: unknown quality {rec['quality']!r}; valid: {', '.join(QUALITY_WEIGHTS)}"
            )
        weight = QUALITY_WEIGHTS[rec["quality"]]
    elif "weight" in rec:
        w = rec["weight"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
            raise InputError(f"{where}: weight must be a positive number, not {w!r}")
        weight = float(w)
    return {"messages": msgs, "weight": weight}


def load_chats(path: Path | None, split: str = "train") -> list[dict[str, Any]]:
    """Checked chats from `path`, or the built-in Polish chats of `split`."""
    if path is None:
        return [check_chat(r, f"built-in chat {r['id']}") for r in corpus.chats(split=split)]
    return [check_chat(r, f"{path}:{n}") for n, r in read_jsonl(path)]


def check_preference(rec: dict[str, Any], where: str) -> dict[str, Any]:
    """The record in TRL's conversational preference format (prompt / chosen / rejected messages)."""
    prompt = rec.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise InputError(f"{where}: missing 'prompt' (a string or a list of messages)")
    for side in ("chosen", "rejected"):
        v = rec.get(side)
        text = v if isinstance(v, str) else (v[-1].get("content") if isinstance(v, list) and v else None)
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{where}: the preference pair has an empty '{side}' side")
    as_msgs = {s: rec[s] if isinstance(rec[s], list) else [{"role": "assistant", "content": rec[s]}]
               for s in ("chosen", "rejected")}  # fmt: skip
    return {"prompt": prompt, **as_msgs}


def load_preferences(path: Path | None, split: str = "train") -> list[dict[str, Any]]:
    if path is None:
        return [check_preference(r, f"built-in pair {r['id']}") for r in corpus.preferences(split=split)]
    return [check_preference(r, f"{path}:{n}") for n, r in read_jsonl(path)]


def _render(tok: Any, messages: list[dict[str, Any]], gen: bool, where: str) -> str:
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    except Exception as e:  # jinja's TemplateError, or a template's raise_exception
        raise InputError(f"{where}: the chat template refuses this chat ({e})") from None


def assistant_spans(
    tok: Any, messages: list[dict[str, Any]], where: str = "chat"
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans the loss is taken on.

    Each assistant turn's span runs from the end of the template's prompt for it (the text rendered
    with `add_generation_prompt` up to that turn: system, user, [INST]...[/INST] or
    <|im_start|>assistant) to the end of the turn, including the token that closes it (</s> or
    <|im_end|>: the model must learn to stop) but not the template's trailing whitespace. Works for
    any template that renders a conversation's prefix as a prefix of the whole.
    """
    text = _render(tok, messages, False, where)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tok, messages[:i], True, where) if i else ""
        upto = _render(tok, messages[: i + 1], False, where)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise InputError(f"{where}: the chat template does not render a conversation's prefix as its "
                             "prefix, so assistant tokens cannot be told apart")  # fmt: skip
        spans.append((len(before), len(upto.rstrip())))
    return text, spans


def encode_chat(
    tok: Any, messages: list[dict[str, Any]], max_len: int, where: str = "chat"
) -> dict[str, list[int]]:
    """input_ids and labels (the token itself inside an assistant span, IGNORE elsewhere)."""
    text, spans = assistant_spans(tok, messages, where)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = enc["input_ids"], []
    for tid, (s, e) in zip(ids, enc["offset_mapping"], strict=True):
        inside = any(s < b and e > a for a, b in spans) if e > s else False
        labels.append(tid if inside else IGNORE)
    return {"input_ids": ids[:max_len], "labels": labels[:max_len]}

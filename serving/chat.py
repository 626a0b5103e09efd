"""`orlik chat MODEL`: a terminal chat that streams replies and keeps the conversation.

It uses the server's own pieces (registry, chat template, runtime, stop/UTF-8-safe streaming), so a
model answers here exactly as it does over HTTP. Commands: /reset, /system TEXT, /exit.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from orlik import progress
from orlik.errors import InputError
from orlik.serving.engine import GenRequest, events
from orlik.serving.models import ModelRegistry
from orlik.serving.prompts import budget, chat_tokens, check_text
from orlik.serving.runtimes.base import Sampling

HELP = "commands: /reset (forget the conversation), /system TEXT, /exit"
TEMPERATURE, TOP_P, MAX_TOKENS = 0.7, 0.95, 512  # `orlik chat`'s sampling defaults (max_tokens per reply)


def run(model: str, *, system: str | None = None, temperature: float = TEMPERATURE, top_p: float = TOP_P,
        max_tokens: int = MAX_TOKENS, seed: int | None = None, parallel: int = 1, threads: int | None = None,
        ctx_size: int | None = None, chat_template: Path | None = None,
        stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:  # fmt: skip
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if max_tokens < 1 or not 0 <= temperature <= 2:
        raise InputError("--max-tokens must be >= 1 and --temperature within 0..2")
    registry = ModelRegistry(
        [model], parallel=1, chat_template=chat_template, threads=threads, n_ctx=ctx_size
    )
    try:
        served = next(iter(registry.models.values()))
        progress.info(f"loading {served.name} ({served.format}, template from {served.template.origin})")
        rt = registry.load_blocking(served)
        n_ctx = min(rt.n_ctx, ctx_size) if ctx_size else rt.n_ctx
        interactive = stdin.isatty()
        if interactive:
            progress.info(f"[dim]{HELP}[/]")
        head: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        turns: list[dict[str, Any]] = []
        if interactive:
            import readline  # noqa: F401 - line editing and history for input()
        while True:
            if interactive:
                try:
                    line = input("\n\033[1myou>\033[0m ") + "\n"
                except EOFError:
                    break
            else:
                line = stdin.readline()
            if not line:
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                turns = []
                progress.info("[dim]conversation cleared[/]")
                continue
            if text.startswith("/system"):
                head = [{"role": "system", "content": text[len("/system") :].strip()}]
                progress.info("[dim]system prompt set[/]")
                continue
            turns.append({"role": "user", "content": check_text(text, "input")})
            try:
                prompt = _fit(served, rt, head, turns, n_ctx)
            except InputError as e:
                turns.pop()
                progress.info(f"[red]{e}[/]")
                continue
            room = budget(len(prompt), n_ctx, None, max_tokens)
            sampling = Sampling(max_tokens=room, temperature=temperature, top_p=top_p, seed=seed)
            reply = _stream(rt, GenRequest(prompt=prompt, sampling=sampling), stdout, interactive)
            turns.append({"role": "assistant", "content": reply})
    finally:
        registry.close()


def _fit(
    served: Any, rt: Any, head: list[dict[str, Any]], turns: list[dict[str, Any]], n_ctx: int
) -> list[int]:
    """The prompt for the conversation, dropping the oldest exchanges (and saying so) if it is too long."""
    while True:
        prompt: list[int] = chat_tokens(served, rt, head + turns)
        if len(prompt) < n_ctx or len(turns) <= 1:
            break
        del turns[:2]
        progress.info("[yellow]the conversation outgrew the context: the oldest exchange was dropped[/]")
    if len(prompt) >= n_ctx:
        raise InputError(
            f"this message is {len(prompt) - n_ctx + 1} tokens too long for the {n_ctx}-token context"
        )
    return prompt


def _stream(rt: Any, req: GenRequest, out: TextIO, interactive: bool) -> str:
    cancel = threading.Event()
    parts: list[str] = []
    t0, n, finish = time.monotonic(), 0, "stopped"
    if interactive:
        out.write("\033[1mbot>\033[0m ")
    try:
        for ev in events(rt, req, cancel):
            out.write(ev.text)
            out.flush()
            parts.append(ev.text)
            n = ev.completion_tokens
            finish = ev.finish_reason or finish
    except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
        cancel.set()
        finish = "interrupted"
    out.write("\n")
    out.flush()
    dt = time.monotonic() - t0
    progress.info(f"[dim]{n} tokens, {n / dt if dt > 0 else 0:.1f} tok/s, {finish}[/]")
    return "".join(parts)

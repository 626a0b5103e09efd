"""Chat templates: found in the checkpoint or the GGUF metadata, rendered in a sandboxed Jinja2.

A served model without a template fails when the server starts, with the places looked in and the
override (--chat-template FILE); never at the first request, and never by guessing a format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from orlik.errors import InputError


class TemplateRenderError(InputError):
    """The template refused the conversation (e.g. roles that do not alternate): the client's to fix."""


def _raise(message: str) -> None:
    raise TemplateRenderError(f"chat template: {message}")


def _tojson(value: Any, indent: int | None = None) -> str:
    # HF's tojson: no HTML escaping (jinja2's built-in escapes <, > and &, which changes prompts).
    return json.dumps(value, ensure_ascii=False, indent=indent)


@dataclass
class ChatTemplate:
    text: str
    bos_token: str = ""
    eos_token: str = ""
    origin: str = ""  # where it came from, shown in /v1/models and errors

    @cached_property
    def _compiled(self) -> Any:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        # The sandbox matters: templates ship inside downloaded models and must not reach Python.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = _tojson
        try:
            return env.from_string(self.text)
        except TemplateError as e:
            raise InputError(f"chat template from {self.origin} does not compile: {e}") from None

    def check(self) -> None:
        """Compile now and render a one-turn conversation, so a broken template fails at load."""
        self.render([{"role": "user", "content": "test"}])

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        from jinja2 import TemplateError
        from jinja2.exceptions import SecurityError

        try:
            return str(
                self._compiled.render(
                    messages=messages,
                    add_generation_prompt=add_generation_prompt,
                    bos_token=self.bos_token,
                    eos_token=self.eos_token,
                )
            )
        except TemplateRenderError:
            raise
        except (TemplateError, SecurityError, TypeError, KeyError, IndexError) as e:
            raise TemplateRenderError(
                f"chat template from {self.origin} cannot render these messages: {e}"
            ) from None


def _token_text(value: Any) -> str:
    if isinstance(value, dict):  # tokenizer_config.json's AddedToken form
        value = value.get("content", "")
    return value if isinstance(value, str) else ""


def from_hf_dir(path: Path) -> ChatTemplate | None:
    """The template of a Hugging Face style directory (FP16 checkpoint or a transformers variant)."""
    cfg: dict[str, Any] = {}
    cfg_file = path / "tokenizer_config.json"
    if cfg_file.is_file():
        try:
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{cfg_file} is not valid JSON: {e}") from None
    bos, eos = _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return ChatTemplate(jinja.read_text(encoding="utf-8"), bos, eos, str(jinja))
    tpl = cfg.get("chat_template")
    if isinstance(tpl, list):  # the named-templates form: take "default"
        tpl = next(
            (t.get("template") for t in tpl if isinstance(t, dict) and t.get("name") == "default"), None
        )
    if isinstance(tpl, str) and tpl.strip():
        return ChatTemplate(tpl, bos, eos, str(cfg_file))
    return None


def from_gguf(path: Path) -> ChatTemplate | None:
    """tokenizer.chat_template from a GGUF file's metadata, with its BOS/EOS token texts."""
    from orlik.gguf_read import GGUFMeta

    meta = GGUFMeta.read(path)
    if not meta.chat_template:
        return None
    return ChatTemplate(meta.chat_template, meta.bos_token, meta.eos_token, f"{path.name} (GGUF metadata)")


def from_file(path: Path, bos_token: str = "", eos_token: str = "") -> ChatTemplate:
    """An explicit --chat-template override: a .jinja file, or a tokenizer_config.json holding one."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--chat-template {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            text = json.loads(text).get("chat_template")
        except (json.JSONDecodeError, AttributeError) as e:
            raise InputError(f"--chat-template {path} is not a tokenizer_config.json: {e}") from None
        if not isinstance(text, str):
            raise InputError(f"--chat-template {path} has no chat_template string")
    tpl = ChatTemplate(text, bos_token, eos_token, f"{path} (--chat-template)")
    tpl.check()
    return tpl

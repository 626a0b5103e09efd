"""From an OpenAI request to token ids and decoding settings, with every check that is a 400.

The prompt is rendered with the model's chat template and tokenized by the model's own runtime;
its length is checked against the context with the exact shortfall in the message, never
truncated.
"""

from __future__ import annotations

from typing import Any

from orlik.errors import InputError
from orlik.serving.engine import GenRequest
from orlik.serving.models import ServedModel
from orlik.serving.runtimes.base import Runtime, Sampling
from orlik.serving.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingParams


class BadRequest(InputError):
    """A request the client must change; `param` names the field in the OpenAI error."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def check_text(value: str, param: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{param} is not valid Unicode (it holds a lone surrogate)", param) from None
    return value


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        role = "system" if m.role == "developer" else m.role
        out.append({"role": role, "content": check_text(content or "", f"messages[{i}].content")})
    return out


def chat_prompt(
    model: ServedModel, runtime: Runtime, messages: list[ChatMessage], add_generation_prompt: bool = True
) -> list[int]:
    return chat_tokens(model, runtime, message_dicts(messages), add_generation_prompt)


def chat_tokens(
    model: ServedModel, runtime: Runtime, messages: list[dict[str, Any]], add_generation_prompt: bool = True
) -> list[int]:
    """The conversation through the model's chat template, tokenized with special tokens parsed."""
    text = model.template.render(messages, add_generation_prompt=add_generation_prompt)
    bos = model.template.bos_token
    # Templates that write the BOS text themselves must not get a second BOS from the tokenizer.
    return runtime.tokenize(text, add_bos=not (bos and text.startswith(bos)), special=True)


def completion_prompt(runtime: Runtime, prompt: Any) -> list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise BadRequest("one prompt per request: a list of several prompts is not supported", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise BadRequest("prompt is empty", "prompt")
        return runtime.tokenize(check_text(prompt, "prompt"), add_bos=True, special=True)
    ids = [int(t) for t in prompt]
    if not ids:
        raise BadRequest("prompt is empty", "prompt")
    bad = [t for t in ids if not 0 <= t < runtime.n_vocab]
    if bad:
        raise BadRequest(
            f"prompt token {bad[0]} is outside the vocabulary (0..{runtime.n_vocab - 1})", "prompt"
        )
    return ids


def context_length(model: ServedModel, runtime: Runtime, limit: int | None) -> int:
    return min(runtime.n_ctx, limit) if limit else runtime.n_ctx


def budget(
    n_prompt: int, n_ctx: int, requested: int | None, default: int | None, prompt_param: str = "messages"
) -> int:
    """max_tokens for the request, or a 400 that says by how many tokens it does not fit."""
    if n_prompt >= n_ctx:
        raise BadRequest(
            f"the prompt is {n_prompt} tokens, {n_prompt - n_ctx + 1} too many for this model's context of "
            f"{n_ctx} tokens (which must leave room for at least one generated token); shorten the prompt",
            prompt_param,
        )
    room = n_ctx - n_prompt
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise BadRequest(
            f"this model's context is {n_ctx} tokens, but the request needs {n_prompt + requested} "
            f"({n_prompt} in the prompt + max_tokens {requested}), {requested - room} too many; "
            "shorten the prompt or lower max_tokens",
            "max_tokens",
        )
    return requested


def stop_list(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 16:
        raise BadRequest("at most 16 stop strings", "stop")
    for s in stops:
        if not s:
            raise BadRequest("stop strings must not be empty", "stop")
        check_text(s, "stop")
    return stops


def json_schema_of(req: SamplingParams, model: ServedModel, runtime: Runtime) -> dict[str, Any] | None:
    rf = req.response_format
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_schema":
        if rf.json_schema is None:
            raise BadRequest("response_format type json_schema needs a json_schema object", "response_format")
        schema: dict[str, Any] = rf.json_schema.schema_
    else:
        schema = {"type": "object"}
    if not runtime.supports_json_schema:
        raise BadRequest(
            f"{model.name} ({model.format}) cannot constrain output to a JSON schema", "response_format"
        )
    if model.format != "gguf":
        from orlik.serving.constrained import compile_schema

        compile_schema(schema)  # an unusable schema is a 400 now, not an error mid-stream
    return schema


def unsupported(req: SamplingParams) -> None:
    if req.logit_bias:
        raise BadRequest("logit_bias is not supported", "logit_bias")
    tools = getattr(req, "tools", None)
    if tools:
        raise BadRequest("tools / function calling is not supported", "tools")
    if isinstance(req, CompletionRequest) and req.suffix:
        raise BadRequest("suffix (fill-in-the-middle) is not supported", "suffix")


def gen_request(req: ChatCompletionRequest | CompletionRequest, model: ServedModel, runtime: Runtime,
                prompt: list[int], n_ctx: int) -> GenRequest:  # fmt: skip
    unsupported(req)
    if isinstance(req, ChatCompletionRequest):
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        default = None
        if req.top_logprobs is not None and not req.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        requested, default = req.max_tokens, 16  # OpenAI's default for text completions
        logprobs = req.logprobs
    param = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
    max_tokens = budget(len(prompt), n_ctx, requested, default, param)
    sampling = Sampling(
        max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=max(req.top_k, 0),
        min_p=req.min_p, repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, seed=req.seed, logprobs=logprobs, ignore_eos=req.ignore_eos,
        json_schema=json_schema_of(req, model, runtime),
    )  # fmt: skip
    return GenRequest(prompt=prompt, sampling=sampling, stop=stop_list(req.stop), logprobs=logprobs)

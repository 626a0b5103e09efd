"""Request and response models of the OpenAI-compatible API; they are also the published OpenAPI.

Requests validate strictly (a string is not a number), so a bad type or range is a 400 naming the
parameter. Fields orlik does not implement are declared only to be refused with a clear message.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

StopStr = Annotated[str, Field(min_length=1, max_length=512)]
TokenId = Annotated[int, Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingParams(_Strict):
    """Decoding parameters shared by chat and text completions."""

    model: str = Field(min_length=1, max_length=256, description="A model id from GET /v1/models.")
    max_tokens: int | None = Field(
        None, ge=1, description="Default: the rest of the context (16 for /v1/completions)."
    )
    temperature: float = Field(1.0, ge=0, le=2, description="0 is greedy.")
    top_p: float = Field(1.0, ge=0, le=1)
    top_k: int = Field(0, ge=-1, le=1_000_000, description="0 or -1 disables top-k.")
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, ge=0.01, le=10)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: StopStr | Annotated[list[StopStr], Field(max_length=16)] | None = Field(
        None, description="Up to 16 stop strings; never part of the output."
    )
    n: int = Field(1, ge=1, le=1, description="Only 1 is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: str | None = Field(None, max_length=256)
    logit_bias: dict[str, float] | None = Field(None, description="Not supported; must be empty.")
    ignore_eos: bool = Field(
        False, description="Extension (as in vLLM and llama.cpp): generate max_tokens tokens."
    )


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=256)


class ChatCompletionRequest(SamplingParams):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens.")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = Field(None, description="Not supported; must be absent or empty.")
    tool_choice: str | dict[str, Any] | None = None


class CompletionRequest(SamplingParams):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]] = Field(
        description="One prompt: a string, or token ids. Lists of several prompts are not supported."
    )
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = Field(None, description="Not supported.")
    best_of: int | None = Field(None, ge=1, le=1)


class TokenizeRequest(_Strict):
    model: str | None = Field(None, description="Optional when the server serves one model.")
    prompt: str | None = Field(None, validation_alias=AliasChoices("prompt", "content"))
    messages: list[ChatMessage] | None = Field(
        None, description="Tokenize a conversation through the chat template."
    )
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[TokenId] = Field(max_length=1_000_000)


# ---------------------------------------------------------------- responses (documentation)
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobItem(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobItem] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"]


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow")  # orlik adds format, state, context_length, chat_template

    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The documented error statuses of a route, all in OpenAI's error shape."""
    what = {400: "Invalid request", 401: "Missing or wrong API key", 404: "Unknown model",
            413: "Request body too large", 429: "Queue full; see Retry-After",
            503: "Model cannot be loaded now", 504: "Timed out"}  # fmt: skip
    return {c: {"model": ErrorResponse, "description": what.get(c, "Error")} for c in codes}

"""The request bodies `serve` accepts, as strict pydantic models, and the OpenAI-style error object.

Fields follow the OpenAI API. A field this server does not implement is refused, never silently
ignored (OpenAI itself answers an unrecognized argument with a 400): a client must not believe a
setting took effect. Types are strict (`"max_tokens": "5"` is refused, not coerced). Limits that
depend on the deployment (`max_tokens` against `prefill.max_context`) are checked in `app`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_CHARS = 256
MAX_MESSAGES = 1024


class ApiError(Exception):
    """An HTTP error answered with an OpenAI-style error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """`{"error": {"message", "type", "param", "code"}}` (what the openai client parses)."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, use_attribute_docstrings=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    """Send a last chunk with the usage (and no choices) before `[DONE]`."""


class TextPart(_Strict):
    type: Literal["text"]
    """Only text parts: this server runs a text-only model."""
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    """`developer` is treated as `system` (OpenAI's newer name for it)."""
    content: str | list[TextPart]
    """A string, or a list of text parts joined in order."""

    def as_template_message(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


Stop = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class _Sampling(_Strict):
    """What both endpoints share. Omitted sampling fields take the profile's `[decode]` values."""

    model: str
    """The served model's id (as `/v1/models` lists it)."""
    max_tokens: int | None = Field(default=None, ge=1)
    """Tokens to generate at most (default: the profile's decode.max_new_tokens); at most the context."""
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    """0 is greedy (default: the profile's decode.temperature)."""
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    """Nucleus sampling (default: the profile's decode.top_p)."""
    stop: Stop | list[Stop] | None = None
    """Up to 4 strings; generation stops before the first one (added to the profile's decode.stop)."""
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    """Seed of the sampler (default: the profile's decode.seed): the same seed, the same tokens."""
    stream: bool = False
    """Server-sent events in the OpenAI chunk format, ending with `data: [DONE]`."""
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    """Only one choice per request."""
    user: str | None = Field(default=None, max_length=256)
    """Who is asking: the fair queue takes turns between users (default: the client's address)."""

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if len(stops) > MAX_STOP_STRINGS:
            raise ApiError(400, f"'stop' holds {len(stops)} strings; at most {MAX_STOP_STRINGS}", param="stop")
        return tuple(stops)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    """The conversation; rendered with the model's own chat template."""
    max_completion_tokens: int | None = Field(default=None, ge=1)
    """OpenAI's newer name for max_tokens (give one of them)."""

    def token_limit(self) -> int | None:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ApiError(400, "give one of 'max_tokens' and 'max_completion_tokens'", param="max_completion_tokens")
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    """Raw text continued without the chat template (a list must hold exactly one string)."""

    def token_limit(self) -> int | None:
        return self.max_tokens

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ApiError(400, f"'prompt' holds {len(self.prompt)} strings; this server takes one", param="prompt")
        return self.prompt[0]


def decode_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body: ApiError 400 for invalid UTF-8, malformed JSON, a body
    that is not an object, or strings that are no valid Unicode (lone surrogates)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {exc.start})") from None
    if not text.strip():
        raise ApiError(400, "the request body is empty: send a JSON object")
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise ApiError(400, "malformed JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(body).__name__}")
    _check_unicode(body, "")
    return body


def _check_unicode(value: Any, where: str) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, f"'{where}' holds an invalid Unicode escape (a lone surrogate)", param=where) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_unicode(item, f"{where}[{i}]")


def parse_request(model: type[RequestT], body: dict[str, Any]) -> RequestT:
    """`body` as `model`; ApiError 400 naming the first offending field and what it must be."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        error = max(errors, key=lambda e: len(e["loc"]))  # of a union's branches, the one that got furthest
        param = ".".join(str(part) for part in error["loc"] if not _is_type_tag(part)) or None
        if error["type"] == "extra_forbidden":
            message = (
                f"unrecognized request argument supplied: {param} (this server refuses fields it does not implement)"
            )
        elif error["type"] == "missing":
            message = f"missing required argument: {param}"
        else:
            message = f"'{param}': {error['msg']} (got {_short(error.get('input'))})"
        raise ApiError(400, message, param=param) from None


def _is_type_tag(part: int | str) -> bool:
    """A union branch pydantic puts in an error's location (`str`, `list[TextPart]`), not a field."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part or part[:1].isupper())


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, BaseModel) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


RequestT = TypeVar("RequestT", ChatCompletionRequest, CompletionRequest)

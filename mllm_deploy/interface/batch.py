"""The JSONL batch format of `mllm-deploy run --batch`: one request per line in, one result per line out.

`parse_batch_line` checks a line against :class:`BatchRequest` and reports what is wrong as a
`UserError` ("line N: ..."); a result line is a :class:`BatchResult` or a :class:`BatchError`.
Their JSON Schemas are generated from these models; the committed copies are
`mllm_deploy/schema/batch-request.schema.json` and `batch-result.schema.json` (also printed by
`mllm-deploy schema batch-request|batch-result`). Regenerate them after changing a model:

    python -m mllm_deploy.interface.batch --write

`--check` exits 1 when a committed copy is stale (the tests do the same).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

from mllm_deploy.errors import UserError, user_error
from mllm_deploy.events import FinishReason
from mllm_deploy.paths import atomic_write_text

REGENERATE_COMMAND = "python -m mllm_deploy.interface.batch --write"
SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schema"
REQUEST_SCHEMA_PATH = SCHEMA_DIR / "batch-request.schema.json"
RESULT_SCHEMA_PATH = SCHEMA_DIR / "batch-result.schema.json"
SCHEMA_ID_BASE = "https://github.com/mllm-deploy/mllm-deploy/"

_STRICT = ConfigDict(extra="forbid", frozen=True, strict=True, use_attribute_docstrings=True)


class ChatMessage(BaseModel):
    """One message of a conversation."""

    model_config = _STRICT

    role: Literal["system", "user", "assistant"]
    """Who speaks: `system` (only as the first message), `user` or `assistant`."""
    content: str
    """The message text."""


# The rules between keys of a request, as JSON Schema for editors and other validators;
# `BatchRequest`'s validators check the same rules (with the command line's `--raw` too).
_REQUEST_RULES: dict[str, JsonValue] = {
    "oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}],
    "dependentSchemas": {
        "messages": {"properties": {"raw": {"const": False}}},
        "system": {"not": {"required": ["prompt", "raw"], "properties": {"raw": {"const": True}}}},
    },
}


class BatchRequest(BaseModel):
    """One line of a batch file: a prompt or a conversation to answer. A key that is not given
    takes its default; null is not a value."""

    model_config = ConfigDict(**_STRICT, json_schema_extra=_REQUEST_RULES)

    prompt: str | None = Field(default=None, min_length=1)
    """The user's message (through the chat template), or with `raw` the text to continue.
    Give exactly one of `prompt` and `messages`."""
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    """A whole conversation to reply to, oldest first; a leading system message replaces the
    profile's system prompt. Give exactly one of `prompt` and `messages`."""
    raw: bool | None = None
    """Feed `prompt` as is, without the chat template. Default: the command line's `--raw`.
    Cannot be true with `messages`."""
    max_new_tokens: int | None = Field(default=None, ge=1)
    """Most tokens to generate. Default: the command line's `--max-new-tokens`, else the profile's."""
    system: str | None = None
    """System prompt for this request instead of the profile's. Needs the chat template, so
    not with a raw prompt."""
    id: str | int | None = None
    """Any string or integer of yours, echoed in the result line."""

    @model_validator(mode="before")
    @classmethod
    def _not_both_sources(cls, data: Any) -> Any:
        # before the keys' own checks, so that `"messages": []` beside a prompt is told the real problem
        if isinstance(data, dict) and "prompt" in data and "messages" in data:
            raise _rule("one_source")
        return data

    @field_validator("*", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        # a default (None) is not validated: only a null written in the line gets here
        if value is None:
            raise PydanticCustomError("null", "null is not a value")
        return value

    @model_validator(mode="after")
    def _combinations(self, info: ValidationInfo) -> Self:
        raw_default = bool((info.context or {}).get("raw_default", False))
        if self.prompt is None and self.messages is None:
            raise _rule("one_source")
        if self.raw and self.messages is not None:
            raise _rule("raw_with_messages")
        if self.system is not None and self.prompt is not None and self.is_raw(raw_default):
            raise _rule("system_with_raw_prompt")
        return self

    def is_raw(self, raw_default: bool) -> bool:
        """Whether `prompt` goes in without the chat template (`raw`, else the command line's)."""
        return self.raw if self.raw is not None else raw_default

    def conversation(self) -> list[dict[str, str]]:
        """The messages to reply to: `messages`, or `prompt` as the one user message."""
        if self.messages is not None:
            return [message.model_dump() for message in self.messages]
        assert self.prompt is not None  # exactly one of prompt and messages
        return [{"role": "user", "content": self.prompt}]


class BatchMetrics(BaseModel):
    """Measurements of one request (null where nothing was measured, e.g. no token generated)."""

    model_config = _STRICT

    load_s: float
    """Seconds it took to load the model (once per batch; the same on every line)."""
    ttft_ms: float | None
    """Milliseconds from the request's start to its first generated token."""
    prefill_tokens_per_s: float | None
    """Prompt tokens prefilled per second."""
    decode_tokens_per_s: float | None
    """Generated tokens per second after the first."""
    peak_rss_mb: float
    """Peak resident memory of the process so far, in MB."""


class BatchResult(BaseModel):
    """The result line of a request that ran."""

    model_config = _STRICT

    line: int = Field(ge=1)
    """The request's line number in the batch file (1-based)."""
    id: str | int | None = Field(default=None, exclude_if=lambda value: value is None)
    """The request's `id`; absent when the request had none."""
    text: str
    """The generated text."""
    prompt_tokens: int
    """Tokens of the prompt after the chat template (and after truncation)."""
    generated_tokens: int
    """Tokens generated."""
    finish_reason: FinishReason
    """Why generation stopped: a stop string, end of sequence, `max_new_tokens`, Ctrl-C, or the
    context was full."""
    backend: str
    """The NPU backend that ran the prefill (`none`: the float32 CPU baseline)."""
    reused_tokens: int
    """Prompt tokens whose KV cache was reused from the previous request."""
    prefilled_tokens: int
    """Prompt tokens prefilled for this request."""
    truncated_tokens: int
    """Prompt tokens dropped from the left to fit the context (`prefill.overflow`)."""
    metrics: BatchMetrics
    """Timing and memory of this request."""


class BatchError(BaseModel):
    """The result line of a request that could not run."""

    model_config = _STRICT

    line: int = Field(ge=1)
    """The request's line number in the batch file (1-based)."""
    error: str
    """What is wrong with the line, each problem prefixed "line N: "."""


# What a line is told when pydantic refuses it: by the rule (error type) that failed, else by the
# top-level key. Unknown keys are listed together with the allowed ones.
_MESSAGES = {
    "one_source": "give exactly one of 'prompt' or 'messages'",
    "raw_with_messages": "'raw' cannot be combined with 'messages'",
    "system_with_raw_prompt": "'system' needs the chat template; it cannot be combined with a raw prompt",
    "prompt": "'prompt' must be a non-empty string",
    "messages": '\'messages\' must be a non-empty list of {"role": system|user|assistant, "content": string}',
    "raw": "'raw' must be true or false",
    "max_new_tokens": "'max_new_tokens' must be an integer >= 1",
    "system": "'system' must be a string",
    "id": "'id' must be a string or an integer",
}


def _rule(name: str) -> PydanticCustomError:
    return PydanticCustomError(name, _MESSAGES[name])


def _messages(exc: ValidationError) -> list[str]:
    """One message per rule or key that failed, in pydantic's order; unknown keys first."""
    unknown = [str(e["loc"][0]) for e in exc.errors() if e["type"] == "extra_forbidden" and len(e["loc"]) == 1]
    out = []
    if unknown:
        allowed = ", ".join(sorted(BatchRequest.model_fields))
        out.append(f"unknown key(s) {', '.join(sorted(unknown))} (allowed: {allowed})")
    for error in exc.errors():
        key = str(error["loc"][0]) if error["loc"] else ""
        if error["type"] == "extra_forbidden" and len(error["loc"]) == 1:
            continue
        message = _MESSAGES.get(error["type"]) or _MESSAGES.get(key) or f"{key}: {error['msg']}"
        if message not in out:
            out.append(message)
    return out


def parse_batch_line(line: str, number: int, *, raw_default: bool = False) -> BatchRequest:
    """One batch request, checked; the UserError names everything wrong with line `number`.
    `raw_default` is the command line's `--raw` (a line without `raw` takes it)."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise user_error(f"line {number}: not valid JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(data, dict):
        raise user_error(f"line {number}: expected a JSON object, got {type(data).__name__}")
    try:
        return BatchRequest.model_validate(data, context={"raw_default": raw_default})
    except ValidationError as exc:
        errors = [user_error(f"line {number}: {message}").diagnostics[0] for message in _messages(exc)]
        raise UserError(errors) from None


def error_line(number: int, err: UserError) -> BatchError:
    """The result line of a request refused with `err`."""
    return BatchError(line=number, error="; ".join(d.message for d in err.diagnostics))


def output_json(result: BatchResult | BatchError) -> str:
    """One line of `run --batch` output (no newline)."""
    return json.dumps(result.model_dump(mode="json"), ensure_ascii=False)


class _AbsentNotNull(GenerateJsonSchema):
    """An optional key (default None) is absent, never null: its schema is the value's type
    alone, without a null branch or a null default. Nullable required keys keep their null."""

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        json_schema = super().default_schema(schema)
        if schema.get("default", ...) is not None or "anyOf" not in json_schema:
            return json_schema
        del json_schema["default"]
        branches = [branch for branch in json_schema.pop("anyOf") if branch != {"type": "null"}]
        return json_schema | (branches[0] if len(branches) == 1 else {"anyOf": branches})


def _with_header(schema: dict[str, Any], name: str, title: str) -> dict[str, Any]:
    schema.pop("title", None)
    header = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"{SCHEMA_ID_BASE}{name}.schema.json",
        "title": title,
    }
    return header | schema


def build_request_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of one line of a batch file. The rules between keys (exactly
    one of prompt and messages, raw, system) are in the descriptions; `parse_batch_line` checks them."""
    schema = BatchRequest.model_json_schema(mode="validation", schema_generator=_AbsentNotNull)
    return _with_header(schema, "batch-request", "mllm-deploy run --batch: one request line")


def build_result_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of one line of `run --batch` output: a result or an error."""
    adapter: TypeAdapter[BatchResult | BatchError] = TypeAdapter(BatchResult | BatchError)
    schema = adapter.json_schema(mode="serialization", schema_generator=_AbsentNotNull)
    return _with_header(schema, "batch-result", "mllm-deploy run --batch: one result line")


def request_schema_text() -> str:
    return json.dumps(build_request_schema(), indent=2, ensure_ascii=False) + "\n"


def result_schema_text() -> str:
    return json.dumps(build_result_schema(), indent=2, ensure_ascii=False) + "\n"


def _generated() -> dict[Path, str]:
    return {REQUEST_SCHEMA_PATH: request_schema_text(), RESULT_SCHEMA_PATH: result_schema_text()}


def stale_files() -> list[Path]:
    """Committed schemas whose content differs from what the models generate now."""
    return [
        path for path, text in _generated().items() if not path.is_file() or path.read_text(encoding="utf-8") != text
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mllm_deploy.interface.batch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", action="store_true", help="regenerate the batch schemas")
    group.add_argument("--check", action="store_true", help="exit 1 if a committed copy is stale")
    args = parser.parse_args(argv)
    if args.write:
        for path, text in _generated().items():
            atomic_write_text(path, text)
            print(f"wrote {path}")
        return 0
    stale = stale_files()
    for path in stale:
        print(f"stale: {path}; run `{REGENERATE_COMMAND}`", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())

"""The OpenAI response objects (`chat.completion`, `text_completion`, their stream chunks) and the
server-sent-event framing of a stream (`data: {...}` lines, ending with `data: [DONE]`).

What ran is added under one namespaced key, `x_mllm_deploy`: backend, the engine's parts, the
request's measured NPU/CPU busy time, prefill and decode rates, TTFT, queue wait, reused and
dropped prompt tokens. `usage.prompt_tokens_details.cached_tokens` is the reused count too (the
OpenAI field for it).
"""

from __future__ import annotations

import json
from typing import Any

from mllm_deploy.events import FinishReason
from mllm_deploy.serve.worker import JobFinished

EXTRA_KEY = "x_mllm_deploy"

FINISH_REASONS: dict[FinishReason, str] = {
    "eos": "stop",
    "stop": "stop",
    "length": "length",
    "context": "length",  # the KV cache is full: no room for another token
    "cancelled": "cancelled",  # only seen by a request the server's shutdown stopped
}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event (`data: ...` and a blank line)."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


DONE = sse("[DONE]")


def usage(finished: JobFinished) -> dict[str, Any]:
    done = finished.done
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.generated_tokens,
        "total_tokens": done.prompt_tokens + done.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": done.reused_tokens},
    }


def what_ran(finished: JobFinished, backend: str, engine: dict[str, str]) -> dict[str, Any]:
    """The namespaced extra field: what ran for this request, measured."""
    done, m = finished.done, finished.done.metrics
    r = lambda value, digits: None if value is None else round(value, digits)
    return {
        "backend": backend,
        "engine": engine,
        "npu_busy_s": round(finished.busy_seconds.get("npu", 0.0), 4),
        "cpu_busy_s": round(finished.busy_seconds.get("cpu", 0.0), 4),
        "queue_wait_ms": round(finished.queue_seconds * 1000.0, 1),
        "ttft_ms": r(m.ttft_ms if m else None, 1),
        "prefill_tokens_per_s": r(m.prefill_tokens_per_s if m else None, 1),
        "decode_tokens_per_s": r(m.decode_tokens_per_s if m else None, 1),
        "reused_tokens": done.reused_tokens,
        "prefilled_tokens": done.prefilled_tokens,
        "truncated_tokens": done.truncated_tokens,
        "finish_reason": done.finish_reason,
    }


class ResponseBuilder:
    """The objects of one response: `chat` (chat.completion) or not (text_completion)."""

    def __init__(self, request_id: str, model: str, created: int, *, chat: bool, backend: str, engine: dict):
        self.id = request_id
        self.model = model
        self.created = created
        self.chat = chat
        self.backend = backend
        self.engine = engine

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def complete(self, finished: JobFinished) -> dict[str, Any]:
        """The whole (non-streamed) response."""
        done = finished.done
        reason = FINISH_REASONS[done.finish_reason]
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": done.text}, "finish_reason": reason}
            head = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": done.text, "finish_reason": reason, "logprobs": None}
            head = self._head("text_completion")
        return {**head, "choices": [choice], "usage": usage(finished),
                EXTRA_KEY: what_ran(finished, self.backend, self.engine)}  # fmt: skip

    def chunk(self, text: str | None = None, *, role: bool = False, finish: JobFinished | None = None) -> dict:
        """One stream chunk: the role (chat's first), a piece of text, or the finish reason."""
        reason = FINISH_REASONS[finish.done.finish_reason] if finish is not None else None
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": reason}
            out = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
            out = {**self._head("text_completion"), "choices": [choice]}
        if finish is not None:
            out[EXTRA_KEY] = what_ran(finish, self.backend, self.engine)
        return out

    def usage_chunk(self, finished: JobFinished) -> dict[str, Any]:
        """The last chunk when `stream_options.include_usage`: no choices, the usage."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage(finished)}

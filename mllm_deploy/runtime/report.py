"""Result records and metric lines for front ends: what `run --json` prints, what goes to stderr."""

from __future__ import annotations

import resource
import sys

from mllm_deploy.events import GenerationDone


def peak_rss_mb() -> float:
    """Peak resident set size of this process (ru_maxrss; KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def metrics_record(done: GenerationDone, load_s: float) -> dict:
    m = done.metrics
    return {
        "load_s": round(load_s, 3),
        "ttft_ms": _round(m.ttft_ms if m else None, 1),
        "prefill_tokens_per_s": _round(m.prefill_tokens_per_s if m else None, 1),
        "decode_tokens_per_s": _round(m.decode_tokens_per_s if m else None, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def result_record(done: GenerationDone, *, load_s: float, backend: str) -> dict:
    """The JSON object of one generation (`run --json`, one line of `run --batch`)."""
    return {
        "text": done.text,
        "prompt_tokens": done.prompt_tokens,
        "generated_tokens": done.generated_tokens,
        "finish_reason": done.finish_reason,
        "backend": backend,
        "reused_tokens": done.reused_tokens,
        "prefilled_tokens": done.prefilled_tokens,
        "truncated_tokens": done.truncated_tokens,
        "metrics": metrics_record(done, load_s),
    }


def metrics_line(done: GenerationDone, *, load_s: float | None, backend: str) -> str:
    """One human-readable line for stderr."""
    m = done.metrics
    parts = [
        f"prompt {done.prompt_tokens} tokens ({done.reused_tokens} reused, {done.prefilled_tokens} prefilled"
        + (f", {done.truncated_tokens} dropped" if done.truncated_tokens else "")
        + ")",
        f"generated {done.generated_tokens} ({done.finish_reason})",
    ]
    if load_s is not None:
        parts.append(f"load {load_s:.2f} s")
    if m and m.ttft_ms is not None:
        parts.append(f"TTFT {m.ttft_ms:.0f} ms")
    if m and m.prefill_tokens_per_s is not None:
        parts.append(f"prefill {m.prefill_tokens_per_s:.1f} tok/s")
    if m and m.decode_tokens_per_s is not None:
        parts.append(f"decode {m.decode_tokens_per_s:.1f} tok/s")
    parts.append(f"peak RSS {peak_rss_mb():.0f} MB")
    parts.append(f"backend {backend}")
    return "[" + " | ".join(parts) + "]"

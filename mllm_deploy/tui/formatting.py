"""Text for the UI from measured values: bars, sparklines, lanes, metric lines. No textual here."""

from __future__ import annotations

from mllm_deploy.events import GenerationDone
from mllm_deploy.runtime.telemetry import PrefillProgress, ProcessSample, SessionMetrics

EIGHTHS = " ▏▎▍▌▋▊▉█"
SPARK = "▁▂▃▄▅▆▇█"
LANE_SHADES = " ░▒▓█"


def bar(fraction: float, width: int) -> str:
    """A horizontal bar `width` cells wide, filled to `fraction` in eighths of a cell."""
    fraction = min(1.0, max(0.0, fraction))
    eighths = round(fraction * width * 8)
    full, part = divmod(eighths, 8)
    text = "█" * full + (EIGHTHS[part] if part else "")
    return text.ljust(width)


def sparkline(values: list[float]) -> str:
    """One character per value in 0..1 (values beyond are clipped)."""
    return "".join(SPARK[min(len(SPARK) - 1, max(0, round(v * (len(SPARK) - 1))))] for v in values)


def lane(cells: list[float]) -> str:
    """A processor's recent timeline: one shade per time slice, darker = busier."""
    top = len(LANE_SHADES) - 1
    return "".join(LANE_SHADES[0 if v <= 0 else max(1, min(top, round(v * top)))] for v in cells)


def megabytes(n_bytes: int) -> str:
    return f"{n_bytes / 1024**2:,.0f} MB"


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} tok/s"


def process_line(sample: ProcessSample | None) -> str:
    if sample is None:
        return "process CPU - · RSS -"
    return f"process CPU {sample.cpu_percent:.0f}% of {sample.cores * 100}% · RSS {megabytes(sample.rss_bytes)}"


def prefill_line(progress: PrefillProgress, total_tokens: int | None = None) -> str:
    """`prefill chunk 3/16 · 768/4,000 tokens · 640 tok/s · ETA 4.1 s`."""
    if progress.n_chunks == 0:
        return "prefill starting…"
    tokens = f"{progress.tokens_done:,}" + (f"/{total_tokens:,}" if total_tokens else "")
    return (
        f"prefill chunk {progress.chunks_done}/{progress.n_chunks} · {tokens} tokens · "
        f"{rate(progress.tokens_per_s)} · ETA {seconds(progress.eta_seconds)}"
    )


def turn_metrics_line(done: GenerationDone, context_used: int, context_max: int) -> str:
    """TTFT, prefill and decode rates and the context after one turn."""
    m = done.metrics
    ttft = f"{m.ttft_ms:,.0f} ms" if m and m.ttft_ms is not None else "-"
    prefill = rate(m.prefill_tokens_per_s if m else None)
    decode = rate(m.decode_tokens_per_s if m else None)
    return (
        f"TTFT {ttft} · prefill {prefill} ({done.prefilled_tokens:,} new, {done.reused_tokens:,} reused) · "
        f"decode {decode} ({done.generated_tokens:,} tokens, {done.finish_reason}) · "
        f"context {context_used:,}/{context_max:,}"
    )


def turn_summary_line(done: GenerationDone, context_used: int, context_max: int) -> str:
    """The panel's short form: `TTFT 120 ms · prefill 640 tok/s · decode 58 tok/s · ctx 44/4,096`."""
    m = done.metrics
    ttft = f"{m.ttft_ms:,.0f} ms" if m and m.ttft_ms is not None else "-"
    return (
        f"last turn: TTFT {ttft} · prefill {rate(m.prefill_tokens_per_s if m else None)} · "
        f"decode {rate(m.decode_tokens_per_s if m else None)} · ctx {context_used:,}/{context_max:,}"
    )


def stats_text(metrics: SessionMetrics, *, load_seconds: float | None, peak_rss_mb: float, backend_label: str) -> str:
    ttft = metrics.mean_ttft_ms
    return "\n".join([
        f"Session: {metrics.turns} turn(s), {metrics.cancelled_turns} cancelled · backend: {backend_label}",
        f"  model load      {seconds(load_seconds)}",
        f"  mean TTFT       {'-' if ttft is None else f'{ttft:,.0f} ms'}",
        f"  prefill         {metrics.prefilled_tokens:,} tokens in {seconds(metrics.prefill_seconds)} = "
        f"{rate(metrics.prefill_tokens_per_s)} ({metrics.reused_tokens:,} reused from the KV cache)",
        f"  decode          {metrics.generated_tokens:,} tokens = {rate(metrics.decode_tokens_per_s)}",
        f"  peak RSS        {peak_rss_mb:,.0f} MB",
    ])  # fmt: skip


def document_message(name: str, text: str) -> str:
    """The user-message prefix that carries a loaded document; the question follows it."""
    return f"Here is a document ({name}):\n\n{text.strip()}\n\n"


def loading_line(elapsed: float, stage: str, done: int, total: int, stage_seconds: float, units: int) -> str:
    """`loading model… 41.2 s · building graphs 12/30 · ETA 18.0 s`: the stage's ETA is its mean
    rate so far (`units` done in `stage_seconds` since the stage began) over what is left."""
    head = f"loading model… {elapsed:.1f} s"
    if not stage:
        return head
    left = max(0, total - done)
    eta = seconds(left * stage_seconds / units) if units > 0 and stage_seconds > 0 else "-"
    return f"{head} · {stage} {done}/{total} · ETA {eta}"

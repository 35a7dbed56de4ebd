"""Estimate rows as a table, CSV, JSON, and the predicted schedule as a Chrome trace.

The trace is written by the runtime's own `TraceRecorder` from the simulated intervals (as
`SubgraphFinished` events), so a predicted and a measured timeline (`bench --trace`) have the same
lanes and names and open side by side in Perfetto.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from mllm_deploy.errors import UserError
from mllm_deploy.estimate.predict import Estimated, EstimateRow, estimate_configuration
from mllm_deploy.events import SubgraphFinished
from mllm_deploy.profile import LoadedProfile
from mllm_deploy.runtime.trace import TraceRecorder


def rows_json(rows: list[EstimateRow]) -> str:
    return json.dumps([r.model_dump() for r in rows], indent=1) + "\n"


def flat_row(row: EstimateRow) -> dict[str, object]:
    """One level of keys, for CSV."""
    out: dict[str, object] = {f"settings.{k}": v for k, v in row.settings.items()}
    data = row.model_dump()
    for key, value in data.items():
        if key == "settings":
            continue
        if isinstance(value, dict):
            for sub, inner in value.items():
                if isinstance(inner, dict):
                    out.update({f"{key}.{sub}.{k}": v for k, v in inner.items()})
                else:
                    out[f"{key}.{sub}"] = inner
        else:
            out[key] = value
    return out


def rows_csv(rows: list[EstimateRow]) -> str:
    flat = [flat_row(r) for r in rows]
    keys: list[str] = []
    for f in flat:
        keys += [k for k in f if k not in keys]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    return buffer.getvalue()


def rows_table(rows: list[EstimateRow]) -> str:
    """Devices side by side: one line per (device, model, setting, prompt length)."""
    headers = ("DEVICE", "MODEL", "SETTINGS", "PROMPT", "TTFT ms", "PREFILL tok/s", "DECODE tok/s", "PEAK MB",
               "FITS", "BUSY npu/cpu", "BOUND BY")  # fmt: skip
    table = [
        (
            r.device,
            r.model.split(" (")[0],
            ",".join(f"{k}={v}" for k, v in r.settings.items()) or "-",
            str(r.prompt_tokens),
            f"{r.ttft_ms:.0f}",
            f"{r.prefill_tokens_per_s:.0f}",
            f"{r.decode_tokens_per_s:.1f}",
            f"{r.peak_memory_mb['total']:.0f}",
            "yes" if r.fits else "NO",
            f"{r.busy.get('npu', 0):.2f}/{r.busy.get('cpu', 0):.2f}",
            r.bound_by,
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *table, strict=True)]
    lines = [
        "  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip() for line in (headers, *table)
    ]
    notes = []
    for r in rows:
        note = f"{r.device} / {r.model}: {r.calibration}"
        if note not in notes:
            notes.append(note)
        if not r.fits and f"  does not fit: {r.fits_note}" not in notes:
            notes.append(f"  does not fit: {r.fits_note}")
    lines += ["", "predicted, not measured (docs/estimate.md); priced by:", *notes]
    return "\n".join(lines) + "\n"


def write_trace(estimated: Estimated, path: str | Path) -> Path:
    """The simulated prefill of one row as a Chrome trace, in `bench --trace`'s format."""
    recorder = TraceRecorder(npu_label=f"{estimated.npu_label}, predicted on {estimated.row.device}")
    tasks = {s.id: s for s in estimated.plan.subgraphs}
    for tid, (start, end) in sorted(estimated.prediction.run.intervals.items(), key=lambda item: item[1]):
        sub = tasks[tid]
        event = SubgraphFinished(tid, sub.processor, sub.chunk, sub.layer, sub.kind, start, end)
        recorder.observe(event, now=end)
    return recorder.write(path)


def trace_paths(base: str, estimated: list[Estimated]) -> list[Path]:
    """One trace per row: `FILE` for a single row, else `FILE-stem-<device>-<model>-p<N>[-i].json`."""
    if len(estimated) == 1:
        return [Path(base)]
    path = Path(base)
    stem, suffix = path.stem, path.suffix or ".json"
    out = []
    for i, e in enumerate(estimated):
        model = e.row.model.split(" (")[0].lower().replace(" ", "-")
        name = f"{stem}-{e.row.device}-{model}-p{e.row.prompt_tokens}" + (f"-{i}" if e.row.settings else "")
        out.append(path.with_name(name + suffix))
    return out


def estimate_text(loaded: LoadedProfile, prompt_tokens: tuple[int, ...] = (256, 1024)) -> str:
    """A few lines for the TUI's plan view: the loaded profile's predicted TTFT, speeds and bottleneck
    on its own target (stored figures only, nothing timed: the view must not wait)."""
    limit = loaded.profile.prefill.max_context
    lengths = [n for n in prompt_tokens if n <= limit] or [limit]
    try:
        rows = [e.row for e in estimate_configuration(loaded, lengths, {}, live=False)]
    except UserError as err:
        return "Estimate: not available (" + "; ".join(d.message for d in err.diagnostics) + ")"
    lines = [f"Estimate on {rows[0].device} (predicted, not measured; `mllm-deploy estimate` for more)"]
    for r in rows:
        lines.append(
            f"  {r.prompt_tokens:>5} tokens: TTFT {r.ttft_ms:,.0f} ms · prefill {r.prefill_tokens_per_s:,.0f} tok/s · "
            f"decode {r.decode_tokens_per_s:.1f} tok/s · bound by {r.bound_by}"
        )
    fit = "fits" if rows[0].fits else f"does NOT fit: {rows[0].fits_note}"
    lines.append(f"  memory {rows[0].peak_memory_mb['total']:,.0f} MB of {rows[0].memory_available_mb:,.0f} MB: {fit}")
    return "\n".join(lines)

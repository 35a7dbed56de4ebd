"""Sweeps -> configurations -> one fresh worker process each -> rows; and the row renderings.

configs = expand_sweeps(["scheduler.policy=sequential,out-of-order", "device.npu_backend=none,auto"])
rows = run_bench(BenchRequest(...), configs)
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from mllm_deploy.device import OptIn
from mllm_deploy.errors import Diagnostic, ExitCode, UserError
from mllm_deploy.interface.deployment import load_deployment


@dataclass(frozen=True)
class BenchRequest:
    profile: str | None
    overrides: list[str] = field(default_factory=list)  # --set, applied to every configuration
    prompt_tokens: list[int] = field(default_factory=lambda: [1024])
    gen_tokens: int = 32
    repeat: int = 3
    warmup: int = 1
    trace: str | None = None
    opt_in: OptIn | None = None  # --emulate / --simulator: a Hexagon target on a machine without one


def expand_sweeps(sweeps: list[str]) -> list[dict[str, str]]:
    """`key=v1,v2` ... -> the cartesian product as [{key: value, ...}], in argument order."""
    axes: list[tuple[str, list[str]]] = []
    for sweep in sweeps:
        key, sep, values = sweep.partition("=")
        key = key.strip()
        items = [v.strip() for v in values.split(",")]
        if not sep or not key or not all(items):
            raise UserError([Diagnostic(message="a sweep is KEY=V1,V2,...", value=sweep)], exit_code=ExitCode.INVALID)
        if key in (k for k, _ in axes):
            raise UserError([Diagnostic(message=f"{key} is swept twice", value=sweep)], exit_code=ExitCode.INVALID)
        axes.append((key, items))
    return [dict(zip((k for k, _ in axes), combo, strict=True)) for combo in itertools.product(*(v for _, v in axes))]


def config_overrides(request: BenchRequest, settings: dict[str, str]) -> list[str]:
    return [*request.overrides, *(f"{k}={v}" for k, v in settings.items())]


def check_configs(request: BenchRequest, configs: list[dict[str, str]]) -> None:
    """Load and resolve every configuration's profile up front, so a bad value, or a target this
    machine cannot run without an opt-in, fails before any run."""
    for settings in configs:
        load_deployment(request.profile, config_overrides(request, settings), opt_in=request.opt_in, to_run=True)


def _trace_for(request: BenchRequest, index: int, n_configs: int) -> str | None:
    if request.trace is None or n_configs == 1:
        return request.trace
    stem, dot, ext = request.trace.rpartition(".")
    return f"{stem}-c{index}.{ext}" if dot else f"{request.trace}-c{index}"


def run_config(request: BenchRequest, settings: dict[str, str], trace: str | None) -> list[dict]:
    """One configuration in a fresh interpreter (its own peak RSS); its rows."""
    payload = {
        "profile": request.profile,
        "overrides": config_overrides(request, settings),
        "settings": settings,
        "prompt_tokens": request.prompt_tokens,
        "gen_tokens": request.gen_tokens,
        "repeat": request.repeat,
        "warmup": request.warmup,
        "trace": trace,
        "opt_in": request.opt_in,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "mllm_deploy.bench.worker"], input=json.dumps(payload), stdout=subprocess.PIPE, text=True
    )
    if proc.returncode == ExitCode.INTERRUPTED:
        raise KeyboardInterrupt
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    if "error" in result:
        raise UserError([Diagnostic(message=f"configuration {settings or 'default'}: {e}") for e in result["error"]],
                        exit_code=ExitCode(result.get("exit_code", ExitCode.INVALID)))  # fmt: skip
    if proc.returncode != 0 or "rows" not in result:
        raise RuntimeError(f"bench worker for {settings or 'the default configuration'} exited {proc.returncode}")
    return result["rows"]


def run_bench(
    request: BenchRequest, configs: list[dict[str, str]], on_rows: Callable[[list[dict]], None] | None = None
) -> list[dict]:
    rows: list[dict] = []
    for index, settings in enumerate(configs):
        new = run_config(request, settings, _trace_for(request, index, len(configs)))
        rows += new
        if on_rows is not None:
            on_rows(new)
    return rows


# -- output -------------------------------------------------------------------------------------


def flat_row(row: dict) -> dict:
    """One level of keys, for CSV."""
    out = {f"settings.{k}": v for k, v in row["settings"].items()}
    util = row.get("utilization") or {}
    spread = row.get("prefill_tokens_per_s_spread") or {}
    out.update({
        "prompt_tokens": row["prompt_tokens"], "gen_tokens": row["gen_tokens"], "repeat": row["repeat"],
        "ttft_ms": row["ttft_ms"], "prefill_tokens_per_s": row["prefill_tokens_per_s"],
        "prefill_tokens_per_s_min": spread.get("min"), "prefill_tokens_per_s_max": spread.get("max"),
        "decode_tokens_per_s": row["decode_tokens_per_s"], "peak_rss_mb": row["peak_rss_mb"],
        "utilization_npu": util.get("npu"), "utilization_cpu": util.get("cpu"),
        "process_cpu_cores": row.get("process_cpu_cores"),
        "backend_npu": row["backend"]["npu"], "backend_prefill": row["backend"]["prefill"],
        "backend_decode": row["backend"]["decode"], "scheduler": row["scheduler"],
        "cpu_threads": row["threads"]["cpu"], "npu_threads": row["threads"]["npu"], "chunk_size": row["chunk_size"],
        "target": row.get("target"), "runs_as": row.get("runs_as"), "target_cpu_threads": row["threads"].get("target_cpu"),
        "profile_hash": row["profile_hash"], "host_cpu": row["host"]["cpu"],
        "host_load_average_1m": row["host"]["load_average_1m"], "trace": row.get("trace"),
    })  # fmt: skip
    return out


def render_csv(rows: list[dict]) -> str:
    flat = [flat_row(r) for r in rows]
    keys: list[str] = []
    for f in flat:
        keys += [k for k in f if k not in keys]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    return buffer.getvalue()


def _fmt(value, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_table(rows: list[dict]) -> str:
    swept = []
    for row in rows:
        swept += [k for k in row["settings"] if k not in swept]
    header = [*swept, "prompt", "TTFT ms", "prefill tok/s", "(min-max)", "decode tok/s", "peak RSS MB",
              "util NPU", "util CPU", "cores", "sched", "thr c/n", "NPU backend", "decode"]  # fmt: skip
    table = [header]
    for r in rows:
        util = r.get("utilization") or {}
        spread = r.get("prefill_tokens_per_s_spread") or {}
        table.append([
            *(str(r["settings"].get(k, "")) for k in swept), str(r["prompt_tokens"]), _fmt(r["ttft_ms"]),
            _fmt(r["prefill_tokens_per_s"]), f"{_fmt(spread.get('min'))}-{_fmt(spread.get('max'))}",
            _fmt(r["decode_tokens_per_s"], 1), _fmt(r["peak_rss_mb"]),
            _fmt(util.get("npu"), 2), _fmt(util.get("cpu"), 2), _fmt(r.get("process_cpu_cores"), 2),
            r["scheduler"] if r["backend"]["npu"] != "none" else "-",
            f"{r['threads']['cpu']}/{r['threads']['npu']}", r["backend"]["npu"], r["backend"]["decode"],
        ])  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
    host = rows[0]["host"] if rows else {}
    lines.append(f"host: {host.get('cpu')}, {host.get('usable_cpus')} usable CPUs; "
                 "prefill = median of repeats (min-max); util = measured busy fraction of each executor; "
                 "cores = process CPU time / wall during prefill")  # fmt: skip
    return "\n".join(lines) + "\n"

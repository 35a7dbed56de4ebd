"""The plan view's text: resolved profile, layers x subgraphs x processor grid, the rendered plan.

No textual here (the plan screen shows these strings).
"""

from __future__ import annotations

from mllm_deploy.estimate.render import estimate_text
from mllm_deploy.interface.deployment import Deployment
from mllm_deploy.plan.render import render_plan
from mllm_deploy.tui.profile_values import profile_values

GRID_COLUMNS = (
    ("attn_norm", "a_norm"),
    ("qkv", "qkv"),
    ("attention", "attn"),
    ("o_proj", "o_proj"),
    ("ffn_norm", "f_norm"),
    ("gate_up", "gate_up"),
    ("down", "down"),
    ("shadow", "shadow"),
)
CELL = 8


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 1024**2:,.1f} MiB"


def summary_section(deployment: Deployment) -> str:
    """Where it runs, memory per processor, shadowed layers."""
    loaded, resolved, plan = deployment.loaded, deployment.resolved, deployment.plan
    here = deployment.here  # the target's plan above; what really runs on this machine here
    m = plan.memory
    shadow = plan.shadow
    shadowed = ", ".join(str(x) for x in shadow.layers) if shadow and shadow.layers else "none"
    lines = [
        f"Profile {deployment.profile.name!r} from {loaded.display_path or 'built-in default'}",
        f"  overrides   {' '.join(deployment.overrides) if deployment.overrides else 'none'}",
        f"  target      {resolved.caps.id}; NPU: {resolved.backend_label}",
        f"  runs here   {here.label}" if here.refusal is None else f"  runs here   no: {here.refusal}",
        f"  threads     {here.threads_label}; scheduler {plan.scheduler}",
        f"  memory      NPU {_mib(m.npu_bytes)} · CPU {_mib(m.cpu_bytes)} · total {_mib(m.total_bytes)}",
        f"  KV cache    {_mib(m.kv_cache_bytes)} {m.kv_cache_dtype} for {deployment.profile.prefill.max_context:,} tokens (in the CPU figure)",
        f"  graphs      {len(plan.graphs)} static NPU graph(s) shared by {plan.n_chunks} chunk(s) of {plan.chunk_size}",
        f"  outliers    {shadow.policy if shadow else deployment.profile.outliers.policy}; shadowed layers: {shadowed}",
        estimate_text(deployment.loaded),  # predicted TTFT and speeds on the target (issue 18)
    ]
    return "\n".join(lines)


def profile_section(deployment: Deployment) -> str:
    loaded, resolved = deployment.loaded, deployment.resolved
    lines = ["Resolved profile (* = set in the file or by --set / /set; others are defaults)"]
    for key, value in profile_values(deployment).items():
        mark = "*" if loaded.is_explicit(key) else " "
        lines.append(f" {mark} {key} = {value!r}")
    warnings = {d.render(): None for d in loaded.warnings + resolved.warnings}
    if warnings:
        lines.append("Warnings:")
        lines += [f"  {w}" for w in warnings]
    return "\n".join(lines)


def placement_grid(deployment: Deployment) -> str:
    """One row per layer of chunk 0: which processor runs each kind of subgraph (shadow: count)."""
    plan = deployment.plan
    rows: dict[int, dict[str, list[str]]] = {}
    for sg in plan.subgraphs:
        if sg.chunk == 0:
            rows.setdefault(sg.layer, {}).setdefault(sg.kind, []).append(sg.processor)
    header = "layer ".ljust(6) + "".join(short.ljust(CELL) for _, short in GRID_COLUMNS)
    lines = [
        f"Placement of chunk 0 ({plan.n_chunks} chunk(s) of {plan.chunk_size} planned; NPU / CPU per subgraph)",
        header,
    ]
    for layer in sorted(rows):
        kinds = rows[layer]
        if layer < 0 or any(k in kinds for k in ("embed", "final_norm", "lm_head")):
            name = "pre" if layer < 0 else "post"
            extra = " ".join(f"{k}@{'/'.join(sorted(set(p))).upper()}" for k, p in kinds.items())
            lines.append(f"{name:<6}{extra}")
            continue
        cells = []
        for kind, _ in GRID_COLUMNS:
            procs = kinds.get(kind, [])
            if not procs:
                cells.append("-".ljust(CELL))
            elif len(procs) == 1:
                cells.append(procs[0].upper().ljust(CELL))
            else:
                cells.append(f"{'/'.join(sorted(set(procs))).upper()}x{len(procs)}".ljust(CELL))
        lines.append(f"L{layer:<5}" + "".join(cells))
    return "\n".join(lines)


def plan_view_text(deployment: Deployment) -> tuple[str, str, str, str]:
    """(summary, placement grid, resolved profile, the full rendered plan)."""
    return (
        summary_section(deployment),
        placement_grid(deployment),
        profile_section(deployment),
        render_plan(
            deployment.plan, here=deployment.here.line, silu_mul_on_cpu=deployment.resolved.silu_mul_on_cpu
        ).rstrip(),
    )

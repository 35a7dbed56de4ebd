"""The plan as text for people: summary, memory, graphs, layers x subgraphs, estimate."""

from __future__ import annotations

from collections import Counter

from mllm_deploy.plan.models import Plan


def _mib(n: int) -> str:
    return f"{n / 1024**2:,.1f} MiB"


def _chunks(plan: Plan) -> str:
    """`4 chunk(s) of 256 (0 padding in the last)`, or with tail chunks `5 chunk(s): 4 x 256 +
    1 x 64 (38 padding)`: the chunks' static rows, runs of equal sizes counted."""
    if all(rows == plan.chunk_size for rows in plan.chunk_rows):
        return f"{plan.n_chunks} chunk(s) of {plan.chunk_size} ({plan.padded_tokens} padding in the last)"
    runs: list[list[int]] = []
    for rows in plan.chunk_rows:
        if runs and runs[-1][1] == rows:
            runs[-1][0] += 1
        else:
            runs.append([1, rows])
    layout = " + ".join(f"{n} x {rows}" for n, rows in runs)
    return f"{plan.n_chunks} chunk(s): {layout} ({plan.padded_tokens} padding)"


def render_plan(plan: Plan, *, dag_lines: int = 24, here: str | None = None, silu_mul_on_cpu: bool = False) -> str:
    """A readable plan: header, memory per processor, graphs, per-layer placement, DAG head, estimate.
    The plan is the target's (its backend, its threads); `here`: how it runs on this machine, or why
    it cannot (`interface.deployment.RunHere.line`), printed under the target's lines.
    `silu_mul_on_cpu` (`Resolved.silu_mul_on_cpu`): the target's gate_up graphs return gate and up,
    and the placement shows SiLU·mul on the CPU after each NPU gate_up."""
    m = plan.memory
    lines = [
        f"plan for profile {plan.profile_name!r}",
        f"  model        {plan.model}",
        f"  target       {plan.target}",
        f"  npu backend  {plan.backend_label}",
        f"  scheduler    {plan.scheduler}",
        f"  threads      cpu {plan.cpu_threads}, npu {plan.npu_threads}",
        *([f"  on this machine: {here}"] if here is not None else []),
        f"  prompt       {plan.prompt_tokens} tokens = {_chunks(plan)}",
        f"  tail         {plan.chunk_choice}",
        f"  passes       {' -> '.join(plan.passes)}",
        "",
        "memory",
        f"  npu  {_mib(m.npu_bytes):>14}  (weights {_mib(m.npu_weight_bytes)}, activations {_mib(m.npu_activation_bytes)})",
        f"  cpu  {_mib(m.cpu_bytes):>14}  (weights {_mib(m.cpu_weight_bytes)}, KV cache {_mib(m.kv_cache_bytes)} {m.kv_cache_dtype}, "
        f"activations {_mib(m.cpu_activation_bytes)}, hot shadow rows {_mib(m.shadow_hot_bytes)}, "
        f"decode graphs {_mib(m.decode_weight_bytes)})",
        f"  total {_mib(m.total_bytes):>13}",
        "",
    ]
    if plan.graphs:
        kinds = Counter(g.kind for g in plan.graphs)
        shared = sum(g.used_by_chunks for g in plan.graphs)
        lines += [
            f"static npu graphs: {len(plan.graphs)} ({', '.join(f'{k} x{v}' for k, v in kinds.items())}); "
            f"{shared} subgraph runs share them across {plan.n_chunks} chunk(s)",
            f"  weights {_mib(sum(g.weight_bytes for g in plan.graphs))}",
            "",
        ]
    if plan.shadow is not None:
        s = plan.shadow
        shadow_kinds: dict[str, int] = {}
        for linear in s.linears:
            kind = linear.split(".", 1)[1]
            shadow_kinds[kind] = shadow_kinds.get(kind, 0) + 1
        summary = ", ".join(f"{k} x{v}" for k, v in shadow_kinds.items()) or "none"
        lines += [
            f"outliers: {s.policy}; shadowed linear inputs ({s.source}): {len(s.linears)} ({summary}) "
            f"in {len(s.layers)} layers; hot channels <= {s.hot_channel_fraction:.1%}",
            "",
        ]
    lines.append("layer placement (chunk 0)")
    by_layer: dict[int, list[str]] = {}
    for sg in plan.subgraphs:
        if sg.chunk == 0 or sg.kind in ("final_norm", "lm_head"):
            by_layer.setdefault(sg.layer, []).append(f"{sg.kind}@{sg.processor}")
            if silu_mul_on_cpu and sg.id.endswith(".gate_up" if sg.kind == "gate_up" else ".gate_up.shadow"):
                # after gate_up, or after its shadow correction, which enters before SiLU
                items = by_layer[sg.layer]
                if sg.kind == "shadow" and items[-2] == "silu_mul@cpu":
                    items[-2], items[-1] = items[-1], items[-2]
                elif sg.kind == "gate_up":
                    items.append("silu_mul@cpu")
    for layer, items in sorted(by_layer.items()):
        name = "pre" if layer < 0 else ("post" if any(i.startswith("final_norm") for i in items) else f"L{layer}")
        lines.append(f"  {name:>5}  {' '.join(items)}")
    lines += ["", f"subgraphs: {len(plan.subgraphs)}, edges: {len(plan.edges)}; first {dag_lines} in schedule order:"]
    for sg in plan.subgraphs[:dag_lines]:
        ins = " ".join(t.render() for t in sg.inputs)
        outs = " ".join(t.render() for t in sg.outputs)
        lines.append(f"  {sg.id:<22} {sg.processor}  {ins} -> {outs}")
    if plan.estimate is not None:
        e = plan.estimate
        lines += [
            "",
            f"estimate ({e.label})",
            f"  npu {e.npu_ms:.2f} ms, cpu {e.cpu_ms:.2f} ms; sequential {e.sequential_ms:.2f} ms, "
            f"overlapped {e.overlapped_ms:.2f} ms; ~{e.prefill_tokens_per_s:,.0f} prompt tokens/s",
        ]
    return "\n".join(lines) + "\n"

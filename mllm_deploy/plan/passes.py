"""The passes that build a plan, in order: chunk -> place -> insert_shadow -> schedule.

Each pass is a pure function `(Plan, PlanInputs) -> Plan`.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass

from mllm_deploy.backends.registry import backend_support
from mllm_deploy.device.models import Capabilities
from mllm_deploy.model.linears import GRAPH_KINDS, LINEAR_GROUP, group_shapes
from mllm_deploy.model.spec import ModelSpec
from mllm_deploy.plan.models import Estimate, GraphSpec, Plan, ShadowPlan, Subgraph, SubgraphKind, TensorSpec
from mllm_deploy.profile.models import Profile
from mllm_deploy.resolve.memory import shadowed_input_count

F32 = "float32"
OUTLIER_SHARE = 0.003
"""Share of activation values beyond the clamp range assumed for estimates (DESIGN.md: 0.1-0.3%)."""


@dataclass(frozen=True)
class PlanInputs:
    """What passes read besides the plan: the profile, device, model and calibration ranks."""

    profile: Profile
    caps: Capabilities
    spec: ModelSpec
    backend: str
    calibrated_shadow_inputs: tuple[tuple[int, str], ...] | None = None  # (layer, kind) from `build`'s calibration


def _t(name: str, shape: tuple[int, ...], dtype: str = F32) -> TensorSpec:
    return TensorSpec(name=name, shape=shape, dtype=dtype)


def _layer_kinds(spec: ModelSpec, chunk: int) -> list[tuple[SubgraphKind, list[TensorSpec], list[TensorSpec], int]]:
    """(kind, inputs, outputs, ops per chunk) of the subgraphs of one layer, in data-flow order."""
    h, q, kv, f = spec.hidden, spec.q_dim, spec.kv_dim, spec.ffn
    return [
        (
            "attn_norm",
            [_t("residual", (chunk, h)), _t("mlp_out", (chunk, h))],
            [_t("residual", (chunk, h)), _t("x_norm", (chunk, h))],
            4 * chunk * h,
        ),
        (
            "qkv",
            [_t("x_norm", (chunk, h))],
            [_t("q", (chunk, q)), _t("k", (chunk, kv)), _t("v", (chunk, kv))],
            2 * chunk * h * (q + 2 * kv),
        ),
        (
            "attention",
            [_t("q", (chunk, q)), _t("k", (chunk, kv)), _t("v", (chunk, kv))],
            [_t("attn_out", (chunk, q))],
            0,
        ),
        ("o_proj", [_t("attn_out", (chunk, q))], [_t("o_out", (chunk, h))], 2 * chunk * q * h),
        (
            "ffn_norm",
            [_t("residual", (chunk, h)), _t("o_out", (chunk, h))],
            [_t("residual", (chunk, h)), _t("x_norm", (chunk, h))],
            4 * chunk * h,
        ),
        ("gate_up", [_t("x_norm", (chunk, h))], [_t("act", (chunk, f))], 2 * chunk * h * 2 * f + 4 * chunk * f),
        ("down", [_t("act", (chunk, f))], [_t("mlp_out", (chunk, h))], 2 * chunk * f * h),
    ]


def attention_ops(spec: ModelSpec, chunk: int, context_end: int) -> int:
    """Q K^T and P V for one chunk against `context_end` tokens (causal part ignored)."""
    return 2 * 2 * chunk * context_end * spec.q_dim


CHUNK_OVERHEAD_ROWS = 24
"""The cost model's fixed cost of one chunk, in rows of work. Measured on the default model (Zen 4
host, 2 cores, 2026-12-05): one prefill chunk of 64 rows against one of 256 — the NPU graphs' time
scales with the rows (52 vs 224 ms), the CPU side keeps ~31 ms a chunk whatever its rows (~300
subgraph dispatches, norms and small attention calls), about 24 rows' worth of work."""


def tail_chunk_tokens(profile: Profile, backend: str) -> int:
    """Rows of the tail graphs a plan may use: `prefill.tail_chunk_size` when it is smaller than
    `chunk_size` and the backend loads its graphs at a second static size (one that loads context
    binaries compiled at `chunk_size` cannot), else 0."""
    tail, chunk = profile.prefill.tail_chunk_size, profile.prefill.chunk_size
    if backend == "none" or not 0 < tail < chunk or backend_support(backend).context_binaries:
        return 0
    return tail


def chunk_schedule(prompt_tokens: int, chunk: int, tail: int) -> tuple[list[int], str]:
    """(rows of each chunk, the choice in words): full chunks of `chunk`, and the tokens left after
    them in `tail`-row chunks when those cost less than one padded full chunk (cost of a chunk: its
    rows + CHUNK_OVERHEAD_ROWS); ties keep the full chunk."""
    full, rest = divmod(max(1, prompt_tokens), chunk)
    if rest == 0:
        return [chunk] * full, "no tail: the prompt fills whole chunks"
    if tail == 0:
        return [chunk] * (full + 1), f"last {rest} token(s) in one padded chunk of {chunk} (no tail graphs)"
    n_tail = math.ceil(rest / tail)
    cost_tail, cost_full = n_tail * (tail + CHUNK_OVERHEAD_ROWS), chunk + CHUNK_OVERHEAD_ROWS
    compared = f"cost {cost_tail} vs {cost_full} rows, {CHUNK_OVERHEAD_ROWS} a chunk"
    if cost_tail < cost_full:
        return [chunk] * full + [
            tail
        ] * n_tail, f"last {rest} token(s) in {n_tail} tail chunk(s) of {tail} ({compared})"
    return [chunk] * (full + 1), f"last {rest} token(s) in one padded chunk of {chunk} ({n_tail} of {tail}: {compared})"


def chunk_pass(plan: Plan, inp: PlanInputs) -> Plan:
    """Split the prompt into static-size chunks (`chunk_schedule`) and lay out every subgraph
    with its shapes."""
    spec = inp.spec
    tail = tail_chunk_tokens(inp.profile, inp.backend)
    rows, choice = chunk_schedule(plan.prompt_tokens, plan.chunk_size, tail)
    n_chunks = len(rows)
    subgraphs: list[Subgraph] = []
    edges: list[tuple[str, str]] = []
    context_end = 0
    for c, chunk in enumerate(rows):
        kinds = _layer_kinds(spec, chunk)
        context_end += chunk
        prev = f"c{c}.embed"
        subgraphs.append(
            _sub(prev, c, -1, "embed", [_t("token_ids", (chunk,), "int32")], [_t("residual", (chunk, spec.hidden))], 0)
        )
        for layer in range(spec.n_layers):
            for kind, ins, outs, ops in kinds:
                sid = f"c{c}.L{layer}.{kind}"
                if kind == "attention":
                    ops = attention_ops(spec, chunk, context_end)
                subgraphs.append(_sub(sid, c, layer, kind, ins, outs, ops))
                edges.append((prev, sid))
                if kind == "attention" and c > 0:  # K/V of every earlier chunk at this layer
                    edges.append((f"c{c - 1}.L{layer}.attention", sid))
                prev = sid
        if c == n_chunks - 1:
            fin = f"c{c}.L{spec.n_layers}.final_norm"
            subgraphs.append(
                _sub(
                    fin,
                    c,
                    spec.n_layers,
                    "final_norm",
                    [_t("residual", (1, spec.hidden)), _t("mlp_out", (1, spec.hidden))],
                    [_t("x_norm", (1, spec.hidden))],
                    4 * spec.hidden,
                )
            )
            head = f"c{c}.L{spec.n_layers}.lm_head"
            subgraphs.append(
                _sub(
                    head,
                    c,
                    spec.n_layers,
                    "lm_head",
                    [_t("x_norm", (1, spec.hidden))],
                    [_t("logits", (1, spec.vocab))],
                    2 * spec.hidden * spec.vocab,
                )
            )
            edges += [(prev, fin), (fin, head)]
    return plan.model_copy(
        update={
            "n_chunks": n_chunks,
            "padded_tokens": sum(rows) - plan.prompt_tokens,
            "tail_chunk_size": tail,
            "chunk_rows": rows,
            "chunk_choice": choice,
            "subgraphs": subgraphs,
            "edges": edges,
            "passes": [*plan.passes, "chunk"],
        }
    )


def _sub(
    sid: str, chunk: int, layer: int, kind: SubgraphKind, ins: list[TensorSpec], outs: list[TensorSpec], ops: int
) -> Subgraph:
    return Subgraph(
        id=sid,
        chunk=chunk,
        layer=layer,
        kind=kind,
        processor="cpu",
        graph=None,
        inputs=ins,
        outputs=outs,
        ops=ops,
        estimate_ms=0.0,
    )


def _act_dtype(profile: Profile) -> str:
    return profile.quantization.activations


def place_pass(plan: Plan, inp: PlanInputs) -> Plan:
    """Put linears (and norms / output head where placed) on the NPU; everything else on the CPU.

    One static graph per layer and linear kind is shared by every chunk.
    """
    profile, spec = inp.profile, inp.spec
    on_npu: set[SubgraphKind] = set(GRAPH_KINDS) if inp.backend != "none" else set()
    if inp.backend != "none":
        if profile.placement.norms == "npu":
            on_npu |= {"attn_norm", "ffn_norm", "final_norm"}
        if profile.placement.lm_head == "npu":
            on_npu.add("lm_head")
    per_channel = profile.quantization.weights == "int8-per-channel"

    def weight_bytes(kind: str) -> int:
        if kind == "lm_head":
            return spec.vocab * spec.hidden + (spec.vocab if per_channel else 1) * 4
        if kind not in LINEAR_GROUP:
            return 0  # norms: no weight matrix
        return sum(out * inn + (out if per_channel else 1) * 4 for out, inn in group_shapes(spec, kind).values())

    graphs: dict[str, GraphSpec] = {}
    placed = []
    for sg in plan.subgraphs:
        if sg.kind not in on_npu:
            placed.append(sg)
            continue
        gid = f"L{sg.layer}.{sg.kind}" if sg.kind != "lm_head" else "lm_head"
        rows = sg.inputs[0].shape[0] if sg.inputs else plan.chunk_size
        if sg.kind != "lm_head" and rows != plan.chunk_size:  # the same graph at the tail's static size
            gid = f"{gid}@{rows}"
        if gid in graphs:
            graphs[gid] = graphs[gid].model_copy(update={"used_by_chunks": graphs[gid].used_by_chunks + 1})
        else:
            graphs[gid] = GraphSpec(
                id=gid,
                layer=sg.layer,
                kind=sg.kind,
                processor="npu",
                weight_bytes=weight_bytes(sg.kind),
                ops=sg.ops,
                used_by_chunks=1,
            )
        # the NPU quantizes its float input on entry (QuantizeLinear) and returns float
        inputs = [TensorSpec(name=t.name, shape=t.shape, dtype=F32) for t in sg.inputs]
        note = [
            TensorSpec(name=f"{t.name}_q", shape=t.shape, dtype=_act_dtype(profile))
            for t in sg.inputs
            if sg.kind in LINEAR_GROUP
        ]
        placed.append(sg.model_copy(update={"processor": "npu", "graph": gid, "inputs": inputs + note}))
    return plan.model_copy(
        update={"subgraphs": placed, "graphs": list(graphs.values()), "passes": [*plan.passes, "place"]}
    )


PROVISIONAL_KIND_ORDER = ("down", "qkv", "gate_up", "o_proj")
"""Before calibration: which linear inputs to shadow first — the order of calibration's
measured pruning damage on SmolLM2 (DESIGN.md §4: down-projection inputs first; at prune 0.5 the
default keeps down x30, qkv x25, gate_up x5, o_proj x0)."""


def _kind_order(kind: str) -> int:
    return GRAPH_KINDS.index(kind)


def choose_shadow_inputs(
    profile: Profile, spec: ModelSpec, calibrated: tuple[tuple[int, str], ...] | None
) -> tuple[list[tuple[int, str]], str]:
    """((layer, kind) inputs, source): calibration's choice when known, else a provisional one —
    kinds in PROVISIONAL_KIND_ORDER, each spread evenly over the layers."""
    if calibrated is not None:
        return sorted(
            ((int(layer), str(kind)) for layer, kind in calibrated), key=lambda p: (p[0], _kind_order(p[1]))
        ), "calibration"
    count = shadowed_input_count(profile, spec)
    chosen: list[tuple[int, str]] = []
    for kind in PROVISIONAL_KIND_ORDER:
        take = min(spec.n_layers, count - len(chosen))
        if take <= 0:
            break
        step = spec.n_layers / take
        chosen += [(min(spec.n_layers - 1, int(i * step + step / 2)), kind) for i in range(take)]
    return sorted(chosen, key=lambda p: (p[0], _kind_order(p[1]))), "provisional"


def insert_shadow_pass(plan: Plan, inp: PlanInputs) -> Plan:
    """For each linear of a shadowed layer, a CPU subgraph that multiplies the input's outliers
    (values beyond the clamp range) by their float weight rows, in parallel with the NPU."""
    profile, spec = inp.profile, inp.spec
    if inp.backend == "none":
        return plan.model_copy(update={"passes": [*plan.passes, "insert_shadow"]})
    inputs, source = choose_shadow_inputs(profile, spec, inp.calibrated_shadow_inputs)
    shadow = ShadowPlan(
        policy=profile.outliers.policy,
        layers=sorted({layer for layer, _ in inputs}),
        linears=[f"L{layer}.{kind}" for layer, kind in inputs],
        source=source,
        hot_channel_fraction=profile.outliers.hot_channel_fraction,
    )
    if not inputs:
        return plan.model_copy(update={"shadow": shadow, "passes": [*plan.passes, "insert_shadow"]})
    wanted = set(inputs)
    producers: dict[str, list[str]] = {}
    for src, dst in plan.edges:
        producers.setdefault(dst, []).append(src)
    consumers: dict[str, list[str]] = {}
    for src, dst in plan.edges:
        consumers.setdefault(src, []).append(dst)
    new_subgraphs = list(plan.subgraphs)
    new_edges = list(plan.edges)
    # subgraphs are in a valid order, so an earlier linear's shadow already feeds this linear
    # (its `shadow -> consumer` edge is in `producers`) and this shadow waits for it too: its
    # input (e.g. down's h = silu(gate)*up) is only final once that correction is added
    for sg in plan.subgraphs:
        if sg.processor != "npu" or sg.kind not in LINEAR_GROUP or (sg.layer, sg.kind) not in wanted:
            continue
        x = sg.inputs[0]  # [chunk, in]
        sid = f"{sg.id}.shadow"
        out_width = sum(t.shape[1] for t in sg.outputs)
        ops = int(2 * OUTLIER_SHARE * x.shape[0] * x.shape[1] * out_width)
        outs = [TensorSpec(name=f"{t.name}_correction", shape=t.shape, dtype=F32) for t in sg.outputs]
        new_subgraphs.append(
            Subgraph(
                id=sid,
                chunk=sg.chunk,
                layer=sg.layer,
                kind="shadow",
                processor="cpu",
                graph=None,
                inputs=[x],
                outputs=outs,
                ops=ops,
                estimate_ms=0.0,
            )
        )
        new_edges += [(src, sid) for src in producers.get(sg.id, [])]  # whatever made its input
        for dst in consumers.get(sg.id, []):  # the correction is added before use
            new_edges.append((sid, dst))
            producers.setdefault(dst, []).append(sid)
    return plan.model_copy(
        update={
            "subgraphs": new_subgraphs,
            "edges": new_edges,
            "shadow": shadow,
            "passes": [*plan.passes, "insert_shadow"],
        }
    )


def _ms(ops: int, gops: float) -> float:
    return ops / (gops * 1e9) * 1e3 if gops > 0 else 0.0


def schedule_pass(plan: Plan, inp: PlanInputs) -> Plan:
    """Estimate each subgraph from nominal peak throughput and order the DAG topologically."""
    caps = inp.caps
    npu_gops = (caps.npu.int8_tops or 0.0) * 1e3 if caps.npu is not None else 0.0
    cores = max(1, caps.cpu_cores)
    cpu_gops = caps.cpu_gflops * min(plan.cpu_threads or cores, cores) / cores
    timed = []
    for sg in plan.subgraphs:
        gops = npu_gops if sg.processor == "npu" else cpu_gops
        timed.append(sg.model_copy(update={"estimate_ms": round(_ms(sg.ops, gops), 4)}))
    order = topological_order([s.id for s in timed], plan.edges)
    rank = {sid: i for i, sid in enumerate(order)}
    timed.sort(key=lambda s: rank[s.id])
    npu_ms = sum(s.estimate_ms for s in timed if s.processor == "npu")
    cpu_ms = sum(s.estimate_ms for s in timed if s.processor == "cpu")
    seq, over = npu_ms + cpu_ms, max(npu_ms, cpu_ms)
    chosen = over if plan.scheduler == "out-of-order" and plan.backend != "none" else seq
    estimate = Estimate(
        label="nominal lower bound from peak INT8 TOPS and float GFLOP/s; not a measurement (run `mllm-deploy bench`)",
        prompt_tokens=plan.prompt_tokens,
        npu_ms=round(npu_ms, 3),
        cpu_ms=round(cpu_ms, 3),
        sequential_ms=round(seq, 3),
        overlapped_ms=round(over, 3),
        prefill_tokens_per_s=round(plan.prompt_tokens / (chosen / 1e3), 1) if chosen > 0 else 0.0,
    )
    return plan.model_copy(update={"subgraphs": timed, "estimate": estimate, "passes": [*plan.passes, "schedule"]})


def topological_order(nodes: list[str], edges: list[tuple[str, str]]) -> list[str]:
    """Kahn's order, ties broken by the nodes' original order; raises on a cycle."""
    index = {n: i for i, n in enumerate(nodes)}
    indegree = dict.fromkeys(nodes, 0)
    out: dict[str, list[str]] = {}
    for a, b in edges:
        indegree[b] += 1
        out.setdefault(a, []).append(b)

    ready = [(index[n], n) for n in nodes if indegree[n] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, n = heapq.heappop(ready)
        order.append(n)
        for m in out.get(n, []):
            indegree[m] -= 1
            if indegree[m] == 0:
                heapq.heappush(ready, (index[m], m))
    if len(order) != len(nodes):
        raise ValueError("plan DAG has a cycle")
    return order


PlanPass = Callable[[Plan, PlanInputs], Plan]
PASSES: tuple[tuple[str, PlanPass], ...] = (
    ("chunk", chunk_pass),
    ("place", place_pass),
    ("insert_shadow", insert_shadow_pass),
    ("schedule", schedule_pass),
)

"""What one subgraph and one decode step cost on a device: the catalog's cost model, priced.

    pricing = Pricing.of(caps, plan, memory, measured_npu_ms)
    seconds, category = pricing.subgraph(sub)       # one prefill subgraph
    pricing.decode_step_seconds(context_tokens)     # one decoded token

An NPU graph costs its launch and NPU<->CPU hand-off plus the longer of its INT8 operations at the
NPU's peak times the efficiency curve (by rows, and by the matrix's narrower side) and its weight
bytes at the memory bandwidth. Where the build measured the graph on this machine
(`latencies.json`, host only), the measurement replaces the formula. A CPU subgraph costs a fixed
dispatch overhead plus its float operations at the cores' nominal peak times the catalog's
efficiency; a shadow correction has its own fixed cost. On the host the emulated NPU and the CPU
subgraphs share cores: when their threads outnumber the usable CPUs and the policy overlaps them,
each runs slower in proportion (`core_share`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from mllm_deploy.device.models import Capabilities, CostModel
from mllm_deploy.errors import ExitCode, user_error
from mllm_deploy.plan.models import Plan, Subgraph
from mllm_deploy.resolve.memory import MemoryBudget

Category = Literal["npu compute", "memory bandwidth", "sync overhead", "cpu attention", "shadow work", "cpu other"]
CATEGORIES: tuple[Category, ...] = (
    "npu compute", "memory bandwidth", "sync overhead", "cpu attention", "shadow work", "cpu other",
)  # fmt: skip


def efficiency(cost: CostModel, rows: int) -> float:
    """Share of peak INT8 throughput at `rows` activation rows: the catalog's curve, linear in
    log2(rows) between its points, flat beyond them."""
    points = sorted((p.rows, p.fraction) for p in cost.npu_efficiency)
    if rows <= points[0][0]:
        return points[0][1]
    for (r0, f0), (r1, f1) in itertools.pairwise(points):
        if rows <= r1:
            t = (math.log2(rows) - math.log2(r0)) / (math.log2(r1) - math.log2(r0))
            return f0 + t * (f1 - f0)
    return points[-1][1]


def width_factor(cost: CostModel, narrow_side: int) -> float:
    """Efficiency kept by a matrix whose narrower side has `narrow_side` features."""
    return min(1.0, narrow_side / cost.npu_full_width)


def device_cost(caps: Capabilities) -> CostModel:
    """The device's cost model; a located refusal (exit 3) when the catalog has none."""
    if caps.cost is None:
        raise user_error(
            f"device {caps.id} has no cost model: estimate cannot price plans there",
            key="device.target", value=caps.id, exit_code=ExitCode.CANNOT_RUN,
            hint="add a [cost] table with its [cost.sources] to the device's catalog file",
        )  # fmt: skip
    return caps.cost


@dataclass(frozen=True)
class Pricing:
    """Per-subgraph and per-token prices of one plan on one device."""

    caps: Capabilities
    cost: CostModel
    chunk: int
    policy: str
    cpu_threads: int
    npu_threads: int
    weight_bytes: Mapping[str, int]  # graph id -> bytes
    measured_npu_ms: Mapping[str, float]  # "layer/kind" -> ms measured at build (host), else empty
    decode_weight_bytes: int
    kv_bytes_per_token: int
    busy: Mapping[str, float] | None = None  # a first simulation's busy fractions (for `core_share`)
    attention_s: Callable[[int, int], float] | None = None  # (rows, keys) -> s, measured (host), else ops
    q_dim: int = 0  # query width, to read an attention's keys from its operations

    @classmethod
    def of(cls, caps: Capabilities, plan: Plan, memory: MemoryBudget, kv_bytes_per_token: int,
           measured_npu_ms: Mapping[str, float] | None = None,
           attention_s: Callable[[int, int], float] | None = None, q_dim: int = 0) -> Pricing:  # fmt: skip
        return cls(
            caps=caps,
            cost=device_cost(caps),
            chunk=plan.chunk_size,
            policy=plan.scheduler,
            cpu_threads=max(1, plan.cpu_threads),
            npu_threads=plan.npu_threads,
            weight_bytes={g.id: g.weight_bytes for g in plan.graphs},
            measured_npu_ms=dict(measured_npu_ms or {}),
            decode_weight_bytes=memory.decode_weight_bytes or memory.cpu_weight_bytes,
            kv_bytes_per_token=kv_bytes_per_token,
            attention_s=attention_s,
            q_dim=q_dim,
        )

    # -- rates --------------------------------------------------------------------------------

    @property
    def npu_ops_per_s(self) -> float:
        npu = self.caps.npu
        return (npu.int8_tops or 0.0) * 1e12 if npu is not None else 0.0

    @property
    def bandwidth_bytes_per_s(self) -> float | None:
        if self.caps.memory_bandwidth_gbps is None:
            return None
        return self.caps.memory_bandwidth_gbps * 1e9 * self.cost.memory_bandwidth_efficiency

    def cpu_flops_per_s(self, threads: int) -> float:
        """Float32 rate of `threads` of the fastest cores at the catalog's efficiency."""
        per_core = sorted((c.gflops_per_core for c in self.caps.cpu_clusters for _ in range(c.cores)), reverse=True)
        used = per_core[: max(1, threads)]
        return sum(used) * 1e9 * self.cost.cpu_float_efficiency

    def core_share(self, processor: str) -> float:
        """Slow-down of a `processor` task when an emulated NPU and the CPU subgraphs share too few
        cores: the threads expected to be running beside it (from a first simulation's busy
        fractions) plus its own, over the usable CPUs; 1 where the NPU is its own processor, under
        the sequential policy, or before a first simulation."""
        npu = self.caps.npu
        if npu is None or npu.kind != "cpu-emulated" or self.policy == "sequential" or self.busy is None:
            return 1.0
        cpu_busy, npu_busy = self.busy.get("cpu", 0.0), self.busy.get("npu", 0.0)
        if processor == "npu":
            demand = self.npu_threads + self.cpu_threads * cpu_busy
        else:
            demand = 1 + (self.cpu_threads - 1) * cpu_busy + self.npu_threads * npu_busy
        return max(1.0, demand / max(1, self.caps.cpu_cores))

    # -- prices -------------------------------------------------------------------------------

    def subgraph(self, sub: Subgraph) -> tuple[float, Category]:
        """Seconds `sub` takes and what dominates it."""
        seconds, category = self._npu(sub) if sub.processor == "npu" else self._cpu(sub)
        return seconds * self.core_share(sub.processor), category

    def _npu(self, sub: Subgraph) -> tuple[float, Category]:
        overhead = (self.cost.npu_graph_launch_us + self.cost.npu_sync_us) * 1e-6
        rows = sub.inputs[0].shape[0] if sub.inputs and sub.inputs[0].shape else self.chunk
        measured = self.measured_npu_ms.get(f"{sub.layer}/{sub.kind}")
        if measured is not None:  # measured on the full-chunk graph; a tail graph has fewer rows
            scale = 1.0 if rows == self.chunk else rows / self.chunk * efficiency(self.cost, self.chunk) / efficiency(
                self.cost, rows)  # fmt: skip
            return measured * scale / 1e3 + self.cost.npu_sync_us * 1e-6, "npu compute"
        widths = [t.shape[-1] for t in (*sub.inputs, *sub.outputs) if len(t.shape) >= 2]
        narrow = min(widths) if widths else self.cost.npu_full_width
        rate = self.npu_ops_per_s * efficiency(self.cost, rows) * width_factor(self.cost, narrow)
        compute = sub.ops / rate if rate > 0 else 0.0
        bandwidth = self.bandwidth_bytes_per_s
        weights = self.weight_bytes.get(sub.graph or "", 0)
        streaming = weights / bandwidth if bandwidth else 0.0
        if streaming > compute:
            return overhead + streaming, "memory bandwidth"
        if overhead > compute:
            return overhead + compute, "sync overhead"
        return overhead + compute, "npu compute"

    def _cpu(self, sub: Subgraph) -> tuple[float, Category]:
        threads = self.cpu_threads if self.policy == "sequential" else 1  # out-of-order: one BLAS thread per task
        compute = sub.ops / self.cpu_flops_per_s(threads)
        fixed = self.cost.cpu_task_overhead_us * 1e-6
        if sub.kind == "shadow":
            return self.cost.shadow_task_us * 1e-6 + compute, "shadow work"
        if sub.kind == "attention":
            rows = sub.inputs[0].shape[0] if sub.inputs and sub.inputs[0].shape else self.chunk
            if self.attention_s is not None and self.q_dim and self.policy != "sequential":
                keys = sub.ops // (4 * rows * self.q_dim)  # plan.passes.attention_ops
                return fixed + self.attention_s(rows, keys), "cpu attention"
            return fixed + compute, "cpu attention"
        return fixed + compute, "cpu other"

    def decode_step_seconds(self, context_tokens: int) -> float:
        """One decoded token after `context_tokens` cached: the weights streamed once, the KV cache
        read, attention's own per-token cost, and the step's fixed cost."""
        rate = self.cost.decode_gbps * 1e9 if self.cost.decode_gbps else self.bandwidth_bytes_per_s
        if not rate:
            rate = self.cpu_flops_per_s(self.cpu_threads)  # no bandwidth figure: one byte ~ one flop
        read = (self.decode_weight_bytes + context_tokens * self.kv_bytes_per_token) / rate
        per_context = context_tokens * self.cost.decode_us_per_context_token * 1e-6
        return self.cost.decode_token_overhead_us * 1e-6 + read + per_context

"""The plan's prefill DAG through the runtime's own scheduler, in simulated time.

`runtime.scheduler.simulate` is the discrete-event model of the processors the scheduler's tests
use; here it runs the plan's real DAG (`TaskGraph.from_plan`) with each subgraph priced by the
device cost model, under the profile's policy and the runtime's slots (the NPU one in-order queue,
the CPU `cpu_threads`). One scheduler implementation: nothing here picks what runs next.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

from mllm_deploy.estimate.cost_model import CATEGORIES, Category, Pricing
from mllm_deploy.plan.models import Plan
from mllm_deploy.runtime.scheduler import PolicyName, SimulatedRun, TaskGraph, simulate


@dataclass(frozen=True)
class Prediction:
    """One simulated prefill."""

    makespan_s: float
    busy: dict[str, float]  # processor -> busy fraction of the makespan (CPU: over its slots)
    critical_path: list[str]  # task ids from the first to the last
    critical_by_category: dict[str, float]  # seconds of the critical path per cost category
    bound_by: Category
    run: SimulatedRun
    durations: dict[str, float]
    slots: dict[str, int]


def slots_of(plan: Plan) -> dict[str, int]:
    """The runtime's executor slots (DagPrefill: the NPU one queue, the CPU `cpu_threads`)."""
    return {"npu": 1, "cpu": max(1, plan.cpu_threads)}


def critical_path(graph: TaskGraph, run: SimulatedRun) -> list[str]:
    """Backwards from the task that ends last: each step is the predecessor (a DAG dependency, or
    the task before it on the same processor) that ended latest no later than this one started."""
    if not run.intervals:
        return []
    previous_on: dict[str, str | None] = {}
    for order in run.order.values():
        for before, after in zip([None, *order], order, strict=False):
            previous_on[after] = before
    tid: str | None = max(run.intervals, key=lambda t: run.intervals[t][1])
    path = []
    while tid is not None:
        path.append(tid)
        start = run.intervals[tid][0]
        candidates = [*graph.preds[tid], previous_on.get(tid)]
        done = [c for c in candidates if c is not None and run.intervals[c][1] <= start + 1e-12]
        tid = max(done, key=lambda c: run.intervals[c][1]) if done else None
    return path[::-1]


def simulate_plan(plan: Plan, pricing: Pricing) -> Prediction:
    """Price every subgraph, run the plan's policy over its DAG, and say what bounds it. Where the
    processors share cores (an emulated NPU), a first run's busy fractions price the second."""
    first = _simulate(plan, pricing)
    if (
        pricing.core_share("npu") == 1.0
        and replace(pricing, busy=first.busy).core_share("cpu") == 1.0
        and (replace(pricing, busy=first.busy).core_share("npu") == 1.0)
    ):
        return first
    return _simulate(plan, replace(pricing, busy=first.busy))


def _simulate(plan: Plan, pricing: Pricing) -> Prediction:
    graph = TaskGraph.from_plan(plan)
    durations: dict[str, float] = {}
    category: dict[str, Category] = {}
    for sub in plan.subgraphs:
        durations[sub.id], category[sub.id] = pricing.subgraph(sub)
    slots = slots_of(plan)
    policy: PolicyName = "sequential" if plan.scheduler == "sequential" else "out-of-order"
    run = simulate(graph, policy, durations, slots=slots)
    span = run.makespan or 1e-12
    busy_s: dict[str, float] = defaultdict(float)
    for tid, (start, end) in run.intervals.items():
        busy_s[graph.tasks[tid].processor] += end - start
    busy = {p: round(busy_s[p] / (span * slots.get(p, 1)), 3) for p in sorted(busy_s)}
    path = critical_path(graph, run)
    by_category: dict[str, float] = dict.fromkeys(CATEGORIES, 0.0)
    for tid in path:
        by_category[category[tid]] += durations[tid]
    bound_by = max(CATEGORIES, key=lambda c: by_category[c])
    return Prediction(run.makespan, busy, path, by_category, bound_by, run, durations, slots)

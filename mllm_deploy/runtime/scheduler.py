"""Which prefill subgraph runs next on each processor: pure bookkeeping, no threads, no clocks.

The DAG comes from the plan (`Plan.subgraphs` / `Plan.edges`). Each processor runs at most
`slots[processor]` subgraphs at once (the NPU: 1, an in-order queue; the CPU: its threads).
Whenever a processor has a free slot, the executor asks `Scheduler.pick(processor)`.

Policies:

- `sequential`: one global order, chunk after chunk, layer after layer, the subgraphs of a layer
  in data-flow order. A step starts only when every earlier step has finished, so the NPU and
  the CPU never overlap, except that a shadow-outlier subgraph runs alongside its NPU linear
  (that is the tensor-level method, not scheduling).
- `out-of-order`: the greedy rule of DESIGN.md §2.3. Among the ready subgraphs of the free
  processor, for candidate g let S be the NPU subgraphs that g's completion makes ready (g is
  their last unfinished dependency); score C = +ΣT(S) if g runs on the CPU, −ΣT(S) if on the
  NPU; run the highest score. Ties (most often: candidates that unblock nothing on the NPU) go
  to the subgraph with the longest path of expected latencies from its start to the end of the
  DAG (its "upward rank", the critical path), then to the earliest in the sequential order.
  Simulated with the measured spans of a default 1,024-token prefill, breaking ties by the
  critical path instead of the sequential order alone shortens the makespan by 7%: the last
  chunk, whose attention is the costliest, no longer trails the others into a tail where one
  core idles.

`simulate()` runs a policy against given latencies in simulated time (a discrete-event model of
the processors), which is how the rule is unit-tested and how a schedule can be previewed.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

from mllm_deploy.plan.models import SubgraphKind

PolicyName = Literal["sequential", "out-of-order"]
POLICIES: tuple[PolicyName, ...] = ("sequential", "out-of-order")

# Position of each kind within a layer, in data-flow order (the plan's SubgraphKind order); a shadow
# shares its linear's step.
KIND_POSITION = {kind: i for i, kind in enumerate(k for k in get_args(SubgraphKind) if k != "shadow")}


@dataclass(frozen=True)
class Task:
    """One subgraph as the scheduler sees it."""

    id: str
    processor: str  # "npu" or "cpu"
    chunk: int = 0
    layer: int = 0
    kind: str = "work"
    step: tuple = ()  # sequential position; tasks sharing a step may run together
    rows: int = 0  # static rows of a tail chunk's subgraph (its own latencies); 0: a full chunk


def plan_step(chunk: int, layer: int, kind: str, subgraph_id: str) -> tuple[int, int, int]:
    """(chunk, layer, position) of a plan subgraph; a shadow takes its linear's position."""
    if kind == "shadow":  # "c0.L3.gate_up.shadow" -> the gate_up step
        kind = subgraph_id.split(".")[-2]
    return (chunk, layer, KIND_POSITION.get(kind, len(KIND_POSITION)))


@dataclass
class TaskGraph:
    """Tasks and their dependencies (from -> to: `to` may start once `from` has finished)."""

    tasks: dict[str, Task]
    preds: dict[str, list[str]] = field(default_factory=dict)
    succs: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def from_edges(cls, tasks: Iterable[Task], edges: Iterable[tuple[str, str]]) -> TaskGraph:
        by_id = {t.id: t for t in tasks}
        preds: dict[str, list[str]] = {t: [] for t in by_id}
        succs: dict[str, list[str]] = {t: [] for t in by_id}
        for a, b in edges:
            if a not in by_id or b not in by_id:
                raise ValueError(f"edge {a} -> {b} names an unknown task")
            if a not in preds[b]:
                preds[b].append(a)
                succs[a].append(b)
        return cls(by_id, preds, succs)

    @classmethod
    def from_plan(cls, plan) -> TaskGraph:
        """The prefill DAG of a `Plan`, with sequential steps from (chunk, layer, kind); a tail
        chunk's tasks carry their rows."""
        rows = list(getattr(plan, "chunk_rows", None) or [])
        tail = {c for c, r in enumerate(rows) if r != plan.chunk_size}
        tasks = [
            Task(
                s.id,
                s.processor,
                s.chunk,
                s.layer,
                s.kind,
                plan_step(s.chunk, s.layer, s.kind, s.id),
                rows[s.chunk] if s.chunk in tail else 0,
            )
            for s in plan.subgraphs
        ]
        return cls.from_edges(tasks, plan.edges)


class LatencyModel:
    """Expected seconds per task: seeded with profiled figures, refined by an exponential moving
    average of measured runs. Keys are `(processor, kind, layer)`; attention also keys on the
    chunk (its cost grows with the context), a tail chunk's tasks on their rows. Unknown keys
    fall back to the kind's mean (over keys of the same rows)."""

    def __init__(self, seeded: Mapping[tuple, float] | None = None, alpha: float = 0.3):
        self.alpha = alpha
        self._mean: dict[tuple, float] = dict(seeded or {})

    @staticmethod
    def key(task: Task) -> tuple:
        if task.kind == "attention":
            return (task.processor, task.kind, task.layer, task.chunk)
        if task.rows:
            return (task.processor, task.kind, task.layer, "rows", task.rows)
        return (task.processor, task.kind, task.layer)

    def seconds(self, task: Task) -> float:
        value = self._mean.get(self.key(task))
        if value is not None:
            return value
        tail = task.rows and task.kind != "attention"
        same_kind = [
            v
            for k, v in self._mean.items()
            if k[:2] == (task.processor, task.kind) and (k[3:] == ("rows", task.rows) if tail else "rows" not in k)
        ]
        return sum(same_kind) / len(same_kind) if same_kind else 0.0

    def observe(self, task: Task, seconds: float) -> None:
        key = self.key(task)
        old = self._mean.get(key)
        self._mean[key] = seconds if old is None else (1 - self.alpha) * old + self.alpha * seconds

    def snapshot(self) -> dict[tuple, float]:
        return dict(self._mean)


class Scheduler:
    """Readiness bookkeeping plus a policy. Call `pick`, then `started`, then `finished`."""

    def __init__(self, graph: TaskGraph, policy: PolicyName, latencies: LatencyModel | None = None):
        if policy not in POLICIES:
            raise ValueError(f"unknown scheduler policy {policy!r}; expected one of {POLICIES}")
        self.graph = graph
        self.policy = policy
        self.latencies = latencies or LatencyModel()
        self._unfinished_preds = {t: len(p) for t, p in graph.preds.items()}
        self._ready: dict[str, set[str]] = {}
        for tid, count in self._unfinished_preds.items():
            if count == 0:
                self._ready.setdefault(graph.tasks[tid].processor, set()).add(tid)
        self.running: set[str] = set()
        self.finished_ids: set[str] = set()
        steps = sorted({t.step for t in graph.tasks.values()})
        self._step_rank = {s: i for i, s in enumerate(steps)}
        self._open_per_step = [0] * len(steps)  # tasks of each step not finished yet
        for t in graph.tasks.values():
            self._open_per_step[self._step_rank[t.step]] += 1
        self._current_step = 0  # sequential: the first step with unfinished tasks
        self._rank = upward_ranks(graph, self.latencies) if policy == "out-of-order" else {}

    # -- queries ---------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return len(self.finished_ids) == len(self.graph.tasks)

    def ready(self, processor: str) -> list[str]:
        """Ready, not started tasks of `processor`, in sequential order."""
        return sorted(self._ready.get(processor, ()), key=self._order)

    def _order(self, tid: str) -> tuple:
        return (self._step_rank[self.graph.tasks[tid].step], tid)

    def unblocked_npu(self, tid: str) -> list[str]:
        """NPU tasks whose last unfinished dependency is `tid`."""
        return [
            s
            for s in self.graph.succs[tid]
            if self.graph.tasks[s].processor == "npu" and self._unfinished_preds[s] == 1
        ]

    def score(self, tid: str) -> float:
        """C of the greedy rule: ±ΣT(S) over the NPU tasks `tid` unblocks (+ on the CPU)."""
        total = sum(self.latencies.seconds(self.graph.tasks[s]) for s in self.unblocked_npu(tid))
        return -total if self.graph.tasks[tid].processor == "npu" else total

    # -- decisions -------------------------------------------------------------------------

    def pick(self, processor: str) -> str | None:
        """The task `processor` should start now, or None (nothing allowed to start)."""
        candidates = self._ready.get(processor)
        if not candidates:
            return None
        if self.policy == "sequential":
            for tid in sorted(candidates, key=self._order):
                if self._step_rank[self.graph.tasks[tid].step] == self._current_step:
                    return tid
            return None
        return min(candidates, key=lambda t: (-self.score(t), -self._rank[t], self._order(t)))

    def started(self, tid: str) -> None:
        task = self.graph.tasks[tid]
        self._ready[task.processor].remove(tid)
        self.running.add(tid)

    def finished(self, tid: str) -> list[str]:
        """Record completion; returns the tasks that became ready."""
        self.running.remove(tid)
        self.finished_ids.add(tid)
        rank = self._step_rank[self.graph.tasks[tid].step]
        self._open_per_step[rank] -= 1
        while self._current_step < len(self._open_per_step) and self._open_per_step[self._current_step] == 0:
            self._current_step += 1
        now_ready = []
        for s in self.graph.succs[tid]:
            self._unfinished_preds[s] -= 1
            if self._unfinished_preds[s] == 0:
                self._ready.setdefault(self.graph.tasks[s].processor, set()).add(s)
                now_ready.append(s)
        return now_ready


def upward_ranks(graph: TaskGraph, latencies: LatencyModel) -> dict[str, float]:
    """Per task: its expected seconds plus the longest such path through its successors to the
    end of the DAG (the critical-path length still ahead once it may start)."""
    pending = {t: len(s) for t, s in graph.succs.items()}
    ready = [t for t, n in pending.items() if n == 0]  # sinks first, then backwards
    rank: dict[str, float] = {}
    while ready:
        tid = ready.pop()
        rank[tid] = latencies.seconds(graph.tasks[tid]) + max((rank[s] for s in graph.succs[tid]), default=0.0)
        for p in graph.preds[tid]:
            pending[p] -= 1
            if pending[p] == 0:
                ready.append(p)
    if len(rank) != len(graph.tasks):
        raise ValueError("the task graph has a cycle")
    return rank


@dataclass(frozen=True)
class SimulatedRun:
    makespan: float
    intervals: dict[str, tuple[float, float]]  # task -> (start, end) in simulated seconds
    order: dict[str, list[str]]  # processor -> tasks in start order


def simulate(
    graph: TaskGraph,
    policy: PolicyName,
    durations: Mapping[str, float],
    slots: Mapping[str, int] | None = None,
    latencies: LatencyModel | None = None,
) -> SimulatedRun:
    """Run `policy` on `graph` in simulated time, task `t` taking `durations[t]` seconds.

    `latencies` is what the policy believes (defaults to the true durations per task, i.e.
    perfect profiling). Pure: no threads, no clocks.
    """
    slots = dict(slots or {})
    processors = sorted({t.processor for t in graph.tasks.values()})
    for p in processors:
        slots.setdefault(p, 1)
    if latencies is None:
        latencies = _ExactLatencies(graph, durations)
    sched = Scheduler(graph, policy, latencies)
    now = 0.0
    busy = dict.fromkeys(processors, 0)
    events: list[tuple[float, int, str]] = []  # (end time, sequence, task)
    intervals: dict[str, tuple[float, float]] = {}
    order: dict[str, list[str]] = {p: [] for p in processors}
    sequence = 0
    while not sched.done:
        for p in processors:
            while busy[p] < slots[p]:
                tid = sched.pick(p)
                if tid is None:
                    break
                sched.started(tid)
                busy[p] += 1
                order[p].append(tid)
                end = now + float(durations[tid])
                intervals[tid] = (now, end)
                heapq.heappush(events, (end, sequence, tid))
                sequence += 1
        if not events:
            raise RuntimeError("simulation stalled: nothing running and nothing may start")
        now, _, tid = heapq.heappop(events)
        finished = [tid]
        while events and events[0][0] == now:  # finish everything ending now before picking
            finished.append(heapq.heappop(events)[2])
        for f in finished:
            busy[graph.tasks[f].processor] -= 1
            sched.finished(f)
    return SimulatedRun(now, intervals, order)


class _ExactLatencies(LatencyModel):
    """Per-task durations known exactly (for simulation)."""

    def __init__(self, graph: TaskGraph, durations: Mapping[str, float]):
        super().__init__()
        self._durations = durations

    def seconds(self, task: Task) -> float:
        return float(self._durations[task.id])

"""The scheduler's policies on synthetic DAGs, in simulated time (a test of the rule, not of hardware)."""

from __future__ import annotations

import itertools

import pytest

from mllm_deploy.runtime.scheduler import LatencyModel, Scheduler, Task, TaskGraph, plan_step, simulate, upward_ranks


def _graph(spec: dict[str, tuple[str, tuple]], edges: list[tuple[str, str]]) -> TaskGraph:
    """spec: id -> (processor, step)."""
    return TaskGraph.from_edges([Task(t, p, step=s) for t, (p, s) in spec.items()], edges)


def optimal_makespan(graph: TaskGraph, durations: dict[str, float]) -> float:
    """Exhaustive search over every schedule (each processor one task at a time, idling allowed)."""
    best = [float("inf")]
    procs = sorted({t.processor for t in graph.tasks.values()})

    def ready(done: frozenset, running: dict) -> dict[str, list[str]]:
        out = {p: [] for p in procs}
        for tid, t in graph.tasks.items():
            if tid not in done and tid not in running.values() and all(d in done for d in graph.preds[tid]):
                out[t.processor].append(tid)
        return out

    def search(now: float, done: frozenset, running: dict, ends: dict) -> None:
        if len(done) == len(graph.tasks):
            best[0] = min(best[0], now)
            return
        if now >= best[0]:
            return
        free = [p for p in procs if p not in running]
        options = ready(done, running)
        choices = [[None, *options[p]] for p in free]
        for combo in itertools.product(*choices):
            new_running, new_ends = dict(running), dict(ends)
            for p, tid in zip(free, combo, strict=False):
                if tid is not None:
                    new_running[p] = tid
                    new_ends[p] = now + durations[tid]
            if not new_running:
                continue  # idling everything forever never finishes
            t_next = min(new_ends.values())
            finished = {p for p, e in new_ends.items() if e == t_next}
            search(
                t_next,
                done | {new_running[p] for p in finished},
                {p: t for p, t in new_running.items() if p not in finished},
                {p: e for p, e in new_ends.items() if p not in finished},
            )

    search(0.0, frozenset(), {}, {})
    return best[0]


def two_chunk_pipeline() -> tuple[TaskGraph, dict[str, float]]:
    """Two chunks of: cpu norm -> npu linear -> cpu attention (needs the previous chunk's
    attention) -> npu linear. Sequential runs one thing at a time; the optimum overlaps
    chunk 1's NPU work with chunk 0's CPU work."""
    spec, edges, dur = {}, [], {}
    kinds = [("norm", "cpu", 1.0), ("lin1", "npu", 3.0), ("attn", "cpu", 2.0), ("lin2", "npu", 3.0)]
    for c in range(2):
        prev = None
        for i, (kind, proc, d) in enumerate(kinds):
            tid = f"c{c}.{kind}"
            spec[tid] = (proc, (c, 0, i))
            dur[tid] = d
            if prev:
                edges.append((prev, tid))
            prev = tid
        if c:
            edges.append(("c0.attn", "c1.attn"))
    return _graph(spec, edges), dur


def test_sequential_runs_one_step_at_a_time_in_order():
    graph, dur = two_chunk_pipeline()
    run = simulate(graph, "sequential", dur)
    assert run.makespan == pytest.approx(sum(dur.values()))  # no overlap at all
    starts = sorted(graph.tasks, key=lambda t: run.intervals[t][0])
    assert starts == ["c0.norm", "c0.lin1", "c0.attn", "c0.lin2", "c1.norm", "c1.lin1", "c1.attn", "c1.lin2"]


def test_out_of_order_finds_the_optimum_of_the_two_chunk_pipeline():
    graph, dur = two_chunk_pipeline()
    best = optimal_makespan(graph, dur)
    run = simulate(graph, "out-of-order", dur)
    assert best == pytest.approx(13.0)  # the NPU holds 12 s of work and must wait 1 s for c0.norm
    assert run.makespan == pytest.approx(best)
    assert run.makespan < simulate(graph, "sequential", dur).makespan == pytest.approx(18.0)


def test_cpu_prefers_the_subgraph_that_unblocks_the_most_npu_work():
    # CPU has two ready tasks; b is earlier in sequential order but unblocks nothing on the NPU,
    # a unblocks an NPU task of 5 s. The rule runs a first.
    graph = _graph(
        {"b": ("cpu", (0,)), "a": ("cpu", (1,)), "n": ("npu", (2,)), "m": ("cpu", (3,))},
        [("a", "n"), ("b", "m")],
    )
    dur = {"a": 1.0, "b": 1.0, "n": 5.0, "m": 1.0}
    sched = Scheduler(graph, "out-of-order", _exact(graph, dur))
    assert sched.score("a") == pytest.approx(5.0) and sched.score("b") == 0.0
    assert sched.pick("cpu") == "a"
    assert Scheduler(graph, "sequential").pick("cpu") == "b"
    assert simulate(graph, "out-of-order", dur).makespan == pytest.approx(optimal_makespan(graph, dur)) == 6.0


def test_npu_prefers_the_subgraph_that_does_not_just_feed_itself():
    # x unblocks more NPU work (score -4), z unblocks CPU work (score 0): z first, so the CPU
    # starts early while the NPU continues with x and y.
    graph = _graph(
        {"x": ("npu", (0,)), "z": ("npu", (1,)), "y": ("npu", (2,)), "c": ("cpu", (3,))},
        [("x", "y"), ("z", "c")],
    )
    dur = {"x": 2.0, "z": 2.0, "y": 4.0, "c": 6.0}
    sched = Scheduler(graph, "out-of-order", _exact(graph, dur))
    assert sched.score("x") == pytest.approx(-4.0) and sched.score("z") == 0.0
    assert sched.pick("npu") == "z"
    run = simulate(graph, "out-of-order", dur)
    assert run.order["npu"] == ["z", "x", "y"]
    assert run.makespan == pytest.approx(optimal_makespan(graph, dur)) == 8.0
    # earliest-first (the sequential order on one processor) would start x and finish at 10
    assert simulate(graph, "sequential", dur).makespan == pytest.approx(14.0)


def test_an_npu_task_with_two_unfinished_dependencies_is_not_counted_as_unblocked():
    graph = _graph(
        {"a": ("cpu", (0,)), "b": ("cpu", (1,)), "n": ("npu", (2,))},
        [("a", "n"), ("b", "n")],
    )
    sched = Scheduler(graph, "out-of-order", _exact(graph, {"a": 1, "b": 1, "n": 7}))
    assert sched.score("a") == 0.0
    sched.started("a")
    sched.finished("a")
    assert sched.score("b") == pytest.approx(7.0)


@pytest.mark.parametrize("seed", range(12))
def test_out_of_order_is_never_worse_than_sequential_on_random_chunk_dags(seed):
    import random

    rng = random.Random(seed)
    graph, dur = _random_chunk_dag(rng, n_chunks=3, n_layers=2)
    seq = simulate(graph, "sequential", dur)
    ooo = simulate(graph, "out-of-order", dur)
    npu = sum(d for t, d in dur.items() if graph.tasks[t].processor == "npu")
    cpu = sum(d for t, d in dur.items() if graph.tasks[t].processor == "cpu")
    assert max(npu, cpu) - 1e-9 <= ooo.makespan <= seq.makespan + 1e-9
    assert seq.makespan == pytest.approx(npu + cpu)
    _check_respects_dependencies(graph, ooo)


def test_cpu_slots_run_cpu_tasks_side_by_side():
    graph = _graph({"a": ("cpu", (0,)), "b": ("cpu", (1,)), "n": ("npu", (2,))}, [("a", "n"), ("b", "n")])
    run = simulate(graph, "out-of-order", {"a": 2.0, "b": 2.0, "n": 1.0}, slots={"cpu": 2})
    assert run.intervals["a"][0] == run.intervals["b"][0] == 0.0
    assert run.makespan == pytest.approx(3.0)


def test_latency_model_moving_average_and_fallback():
    model = LatencyModel({("npu", "qkv", 0): 0.010}, alpha=0.5)
    t0 = Task("c0.L0.qkv", "npu", 0, 0, "qkv")
    t5 = Task("c0.L5.qkv", "npu", 0, 5, "qkv")
    assert model.seconds(t0) == pytest.approx(0.010)
    assert model.seconds(t5) == pytest.approx(0.010)  # unknown layer: mean of the kind
    model.observe(t0, 0.020)
    assert model.seconds(t0) == pytest.approx(0.015)
    assert model.seconds(Task("x", "cpu", kind="attention")) == 0.0
    a0, a3 = Task("a0", "cpu", 0, 1, "attention"), Task("a3", "cpu", 3, 1, "attention")
    model.observe(a0, 1.0)
    model.observe(a3, 4.0)
    assert (model.seconds(a0), model.seconds(a3)) == (1.0, 4.0)  # attention keys on the chunk


def test_plan_step_puts_a_shadow_with_its_linear():
    assert plan_step(1, 4, "shadow", "c1.L4.down.shadow") == plan_step(1, 4, "down", "c1.L4.down")
    assert plan_step(0, -1, "embed", "c0.embed") < plan_step(0, 0, "attn_norm", "c0.L0.attn_norm")


def test_unknown_policy_is_refused():
    graph, _ = two_chunk_pipeline()
    with pytest.raises(ValueError, match="unknown scheduler policy"):
        Scheduler(graph, "fastest")


def test_real_plan_dag_sequential_never_overlaps_and_out_of_order_overlaps(tmp_path):
    from plan_fixtures import capabilities, loaded_from

    from mllm_deploy.model import read_spec
    from mllm_deploy.plan import build_plan
    from mllm_deploy.resolve import resolve

    loaded = loaded_from(tmp_path, 'name = "t"\n[device]\nnpu_backend = "ort-cpu"\n', ["outliers.prune_fraction=0.8"])
    spec = read_spec(loaded.profile.model.source)
    plan = build_plan(resolve(loaded, capabilities("host"), spec), prompt_tokens=1024)
    graph = TaskGraph.from_plan(plan)
    # Latencies shaped like this machine: NPU linears ~ what ort-cpu does on one core,
    # attention growing with the chunk, small norms, shadows a fraction of their linear.
    base = {
        "qkv": 3.0,
        "o_proj": 2.0,
        "gate_up": 9.0,
        "down": 4.5,
        "attn_norm": 0.3,
        "ffn_norm": 0.3,
        "shadow": 0.8,
        "embed": 0.2,
        "final_norm": 0.1,
        "lm_head": 2.0,
    }
    dur = {t.id: base.get(t.kind, 0.0) if t.kind != "attention" else 1.5 * (t.chunk + 1) for t in graph.tasks.values()}
    seq = simulate(graph, "sequential", dur)
    ooo = simulate(graph, "out-of-order", dur)
    _check_respects_dependencies(graph, seq)
    _check_respects_dependencies(graph, ooo)
    npu_total = sum(d for t, d in dur.items() if graph.tasks[t].processor == "npu")
    cpu_total = sum(d for t, d in dur.items() if graph.tasks[t].processor == "cpu")
    assert seq.makespan == pytest.approx(
        npu_total + cpu_total - sum(d for t, d in dur.items() if t.endswith(".shadow"))
    )
    # within 10% of the busier processor's total (the bound no schedule can beat)
    assert max(npu_total, cpu_total) - 1e-9 <= ooo.makespan <= 1.1 * max(npu_total, cpu_total)
    # sequential: the only overlap is a shadow with its own linear
    spans = sorted((iv, t) for t, iv in seq.intervals.items())
    for (a, ta), (b, tb) in itertools.pairwise(spans):
        if b[0] < a[1] - 1e-12:
            assert {ta, tb} & {x for x in (ta, tb) if x.endswith(".shadow")}
            assert ta.removesuffix(".shadow") == tb.removesuffix(".shadow")


def _check_respects_dependencies(graph: TaskGraph, run) -> None:
    for tid, preds in graph.preds.items():
        for p in preds:
            assert run.intervals[p][1] <= run.intervals[tid][0] + 1e-12, (p, tid)
    for proc in {t.processor for t in graph.tasks.values()}:
        spans = sorted(run.intervals[t] for t in graph.tasks if graph.tasks[t].processor == proc)
        for a, b in itertools.pairwise(spans):
            assert a[1] <= b[0] + 1e-12  # one slot per processor here


def _random_chunk_dag(rng, n_chunks: int, n_layers: int):
    kinds = [
        ("attn_norm", "cpu"),
        ("qkv", "npu"),
        ("attention", "cpu"),
        ("o_proj", "npu"),
        ("ffn_norm", "cpu"),
        ("gate_up", "npu"),
        ("down", "npu"),
    ]
    tasks, edges, dur = [], [], {}
    for c in range(n_chunks):
        prev = None
        for layer in range(n_layers):
            for kind, proc in kinds:
                tid = f"c{c}.L{layer}.{kind}"
                tasks.append(Task(tid, proc, c, layer, kind, plan_step(c, layer, kind, tid)))
                dur[tid] = rng.uniform(0.5, 5.0)
                if prev:
                    edges.append((prev, tid))
                if kind == "attention" and c:
                    edges.append((f"c{c - 1}.L{layer}.attention", tid))
                prev = tid
    return TaskGraph.from_edges(tasks, edges), dur


def _exact(graph: TaskGraph, dur: dict[str, float]) -> LatencyModel:
    model = LatencyModel()
    model.seconds = lambda task: float(dur[task.id])  # type: ignore[method-assign]
    return model


def tie_between_short_and_long_paths() -> tuple[TaskGraph, dict[str, float]]:
    """a and b each unblock a 2 s NPU task (equal scores); only b's leads on to more work."""
    graph = _graph(
        {"a": ("cpu", (0,)), "b": ("cpu", (1,)), "na": ("npu", (2,)), "nb": ("npu", (3,)), "c": ("cpu", (4,))},
        [("a", "na"), ("b", "nb"), ("nb", "c")],
    )
    return graph, {"a": 1.0, "b": 1.0, "na": 2.0, "nb": 2.0, "c": 3.0}


def test_upward_ranks_are_the_longest_remaining_paths():
    graph, dur = tie_between_short_and_long_paths()
    assert upward_ranks(graph, _exact(graph, dur)) == {"a": 3.0, "na": 2.0, "b": 6.0, "nb": 5.0, "c": 3.0}
    with pytest.raises(ValueError, match="cycle"):
        cyclic = _graph({"x": ("cpu", (0,)), "y": ("cpu", (1,))}, [("x", "y"), ("y", "x")])
        upward_ranks(cyclic, LatencyModel())


def test_a_tie_goes_to_the_longer_critical_path():
    graph, dur = tie_between_short_and_long_paths()
    sched = Scheduler(graph, "out-of-order", _exact(graph, dur))
    assert sched.score("a") == sched.score("b") == pytest.approx(2.0)
    assert sched.pick("cpu") == "b"  # a comes first in the sequential order
    run = simulate(graph, "out-of-order", dur)
    assert run.order["cpu"] == ["b", "a", "c"]
    # earliest-first would run a, b, then na before nb, and finish c at 8
    assert run.makespan == pytest.approx(optimal_makespan(graph, dur)) == 6.0


def test_tail_chunk_tasks_keep_their_own_latencies():
    """A tail chunk's subgraph is keyed by its rows: its latency neither comes from nor moves the
    full chunks' figure of the same layer and kind."""
    full = Task("c0.L0.qkv", "npu", 0, 0, "qkv")
    tail = Task("c1.L0.qkv", "npu", 1, 0, "qkv", rows=64)
    model = LatencyModel({("npu", "qkv", 0): 0.004, ("npu", "qkv", 0, "rows", 64): 0.001})
    assert (model.seconds(full), model.seconds(tail)) == (0.004, 0.001)
    model.observe(tail, 0.002)
    assert model.seconds(full) == 0.004 and model.seconds(tail) == pytest.approx(0.0013)
    other_layer = Task("c1.L1.qkv", "npu", 1, 1, "qkv", rows=64)
    assert model.seconds(other_layer) == pytest.approx(0.0013)  # the mean of the tail keys only

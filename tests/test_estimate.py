"""estimate: cost-model units, the scheduler's simulation on hand-computed DAGs, the command's outputs."""

from __future__ import annotations

import csv
import io
import json

import pytest
from pydantic import ValidationError

from mllm_deploy.cli import main
from mllm_deploy.device.catalog import catalog_entries
from mllm_deploy.device.models import CostModel
from mllm_deploy.errors import ExitCode
from mllm_deploy.estimate import EstimateRequest, estimate_rows
from mllm_deploy.estimate.cost_model import efficiency, width_factor
from mllm_deploy.estimate.simulate import critical_path
from mllm_deploy.interface.deployment import load_deployment
from mllm_deploy.model.cards import model_cards
from mllm_deploy.runtime.scheduler import Task, TaskGraph, simulate
from mllm_deploy.tui.plan_text import summary_section  # plain text, no textual

COST = {
    "npu_efficiency": [{"rows": 32, "fraction": 0.1}, {"rows": 128, "fraction": 0.3}],
    "npu_full_width": 256, "npu_graph_launch_us": 100.0, "npu_sync_us": 50.0, "cpu_float_efficiency": 0.5,
    "cpu_task_overhead_us": 10.0, "shadow_task_us": 20.0, "memory_bandwidth_efficiency": 0.5,
    "decode_token_overhead_us": 0.0, "app_memory_fraction": 0.5,
}  # fmt: skip


def _cost(**changes: object) -> CostModel:
    data = {**COST, **changes}
    data.setdefault("sources", {k: "test" for k in data if k != "sources"})
    return CostModel.model_validate(data)


def test_efficiency_curve_interpolates_in_log2_rows_and_holds_flat_outside() -> None:
    cost = _cost()
    assert efficiency(cost, 16) == 0.1 and efficiency(cost, 32) == 0.1
    assert efficiency(cost, 64) == pytest.approx(0.2)  # halfway between 32 and 128 in log2
    assert efficiency(cost, 4096) == 0.3
    assert width_factor(cost, 64) == 0.25 and width_factor(cost, 1024) == 1.0


def test_every_cost_figure_needs_a_source() -> None:
    with pytest.raises(ValidationError, match="no source given for npu_sync_us"):
        _cost(sources={k: "x" for k in COST if k != "npu_sync_us"})
    with pytest.raises(ValidationError, match="unknown figures: npu_speed"):
        _cost(sources={**{k: "x" for k in COST}, "npu_speed": "x"})


def test_every_catalogued_device_has_a_sourced_cost_model() -> None:
    for caps in catalog_entries().values():
        assert caps.cost is not None, caps.id
        assert set(caps.cost.sources) >= caps.cost.model_fields_set - {"sources"}


def test_simulation_of_a_hand_computed_dag_and_its_critical_path() -> None:
    # npu: a(2) -> b(2); cpu: c(3) needs a; d(1) needs b and c. Out-of-order: a 0-2, b 2-4 || c 2-5, d 5-6.
    tasks = [Task("a", "npu"), Task("b", "npu"), Task("c", "cpu"), Task("d", "cpu")]
    graph = TaskGraph.from_edges(tasks, [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")])
    run = simulate(graph, "out-of-order", {"a": 2, "b": 2, "c": 3, "d": 1})
    assert run.makespan == 6
    assert run.intervals["c"] == (2, 5)
    assert critical_path(graph, run) == ["a", "c", "d"]
    sequential = simulate(graph, "sequential", {"a": 2, "b": 2, "c": 3, "d": 1})
    assert sequential.makespan >= run.makespan


def test_estimate_rows_for_every_device_and_every_card() -> None:
    devices = sorted(catalog_entries())
    rows = [e.row for e in estimate_rows(EstimateRequest(None, devices=devices, models=sorted(model_cards()),
                                                          prompt_tokens=[64]))]  # fmt: skip
    assert len(rows) == len(devices) * len(model_cards())
    for r in rows:
        assert r.ttft_ms > 0 and r.prefill_tokens_per_s > 0 and r.decode_tokens_per_s > 0, (r.device, r.model)
        assert 0 < r.busy["npu"] <= 1 and 0 < r.busy["cpu"] <= 1
        assert r.peak_memory_mb["total"] == pytest.approx(r.peak_memory_mb["npu"] + r.peak_memory_mb["cpu"], abs=0.2)
    by = {(r.device, r.model.split(" (")[0]): r for r in rows}
    assert not by[("qcs6490", "LLaMA-2-7B")].fits and by[("qcs6490", "LLaMA-2-7B")].fits_note
    assert by[("sd8gen3", "SmolLM2-135M")].fits
    # a bigger model on the same device is slower; a faster NPU makes the same model faster
    assert by[("sd8gen3", "LLaMA-2-7B")].ttft_ms > by[("sd8gen3", "Qwen1.5-1.8B")].ttft_ms
    assert by[("sd8elite", "Qwen1.5-1.8B")].ttft_ms < by[("qcs6490", "Qwen1.5-1.8B")].ttft_ms


def test_estimate_command_json_csv_sweep_and_trace(tmp_path, capsys) -> None:
    args = ["estimate", "--device", "sd8gen3", "--device", "sd8gen2", "--model", "qwen1.5-1.8b",
            "--prompt-tokens", "256,512", "--sweep", "scheduler.policy=out-of-order,sequential"]  # fmt: skip
    assert main([*args, "--json"]) == ExitCode.OK
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 * 2 * 2
    for key in ("device", "model", "settings", "prompt_tokens", "ttft_ms", "prefill_tokens_per_s",
                "decode_tokens_per_s", "peak_memory_mb", "fits", "bound_by", "busy", "critical_path"):  # fmt: skip
        assert key in rows[0]
    assert {r["settings"]["scheduler.policy"] for r in rows} == {"out-of-order", "sequential"}
    seq = {(r["device"], r["prompt_tokens"]): r["ttft_ms"] for r in rows if r["scheduler"] == "sequential"}
    ooo = {(r["device"], r["prompt_tokens"]): r["ttft_ms"] for r in rows if r["scheduler"] == "out-of-order"}
    assert all(ooo[k] != seq[k] for k in seq)  # the two policies really are simulated
    assert main([*args[:9], "--csv"]) == ExitCode.OK
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["device"] for r in table] == ["sd8gen3", "sd8gen3", "sd8gen2", "sd8gen2"]
    trace = tmp_path / "pred.json"
    assert main(["estimate", "--device", "sd8gen3", "--prompt-tokens", "256", "--trace", str(trace)]) == ExitCode.OK
    events = json.loads(trace.read_text())["traceEvents"]
    lanes = {e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    assert any(lane.startswith("NPU (") for lane in lanes) and "CPU" in lanes
    spans = [e for e in events if e.get("ph") == "X"]
    assert {e["cat"] for e in spans} == {"npu", "cpu"} and all(e["dur"] > 0 for e in spans)


def test_estimate_refuses_a_prompt_beyond_the_context(capsys) -> None:
    assert main(["estimate", "--prompt-tokens", "99999"]) == ExitCode.INVALID
    assert "prefill.max_context" in capsys.readouterr().err


def test_tui_plan_view_shows_the_estimate() -> None:
    deployment = load_deployment(None, ["device.target=sd8gen3", "model.source=card:qwen1.5-1.8b"])
    summary = summary_section(deployment)
    assert "Estimate on sd8gen3 (predicted, not measured" in summary
    assert "  1024 tokens: TTFT " in summary and "bound by " in summary and ": fits" in summary

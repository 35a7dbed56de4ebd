"""The plan: passes in order, chunk-sharing graphs, DAG shape, placement, golden text and JSON."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import pytest
from goldens import changed_message, golden_bytes, golden_text
from plan_fixtures import GOLDEN, REPO, capabilities, loaded_from

from mllm_deploy.plan import build_plan, plan_to_json
from mllm_deploy.plan.passes import chunk_schedule, topological_order
from mllm_deploy.plan.render import render_plan
from mllm_deploy.profile import load_profile
from mllm_deploy.resolve import resolve


def _plan(loaded, model_spec, **kw):
    return build_plan(resolve(loaded, capabilities(loaded.profile.device.target), model_spec), **kw)


def test_passes_run_in_order_and_dump(tmp_path, smollm_spec):
    dump = tmp_path / "dump"
    plan = _plan(loaded_from(tmp_path, ""), smollm_spec, prompt_tokens=300, dump_dir=dump)
    assert plan.passes == ["chunk", "place", "insert_shadow", "schedule"]
    files = sorted(p.name for p in dump.iterdir())
    assert files == ["01-chunk.json", "02-place.json", "03-insert_shadow.json", "04-schedule.json"]
    after_chunk = json.loads((dump / "01-chunk.json").read_text())
    assert {s["processor"] for s in after_chunk["subgraphs"]} == {"cpu"}  # placement comes later


def test_chunking_and_padding(tmp_path, smollm_spec):
    plan = _plan(loaded_from(tmp_path, ""), smollm_spec, prompt_tokens=300)
    # the 44 tokens after the full chunk run as one tail chunk of 64 (cost 64 + 24 < 256 + 24)
    assert (plan.n_chunks, plan.padded_tokens, plan.chunk_size, plan.chunk_rows) == (2, 20, 256, [256, 64])
    assert plan.tail_chunk_size == 64 and "1 tail chunk(s) of 64" in plan.chunk_choice
    per_chunk = Counter(s.chunk for s in plan.subgraphs if s.kind != "shadow")
    assert per_chunk == {0: 1 + 30 * 7, 1: 1 + 30 * 7 + 2}  # embed + 7 per layer (+ final norm, head)
    tail_qkv = next(s for s in plan.subgraphs if s.id == "c1.L0.qkv")
    assert (tail_qkv.graph, tail_qkv.inputs[0].shape) == ("L0.qkv@64", (64, 576))
    assert next(s for s in plan.subgraphs if s.id == "c1.L0.attention").ops == 2 * 2 * 64 * 320 * 576
    off = _plan(loaded_from(tmp_path, "", ["prefill.tail_chunk_size=0"]), smollm_spec, prompt_tokens=300)
    assert (off.n_chunks, off.padded_tokens, off.chunk_rows, off.tail_chunk_size) == (2, 212, [256, 256], 0)


@pytest.mark.parametrize(
    ("tokens", "rows"),
    [
        (64, [64]),  # a short prompt: one tail chunk instead of 192 rows of padding
        (65, [64, 64]),
        (192, [64, 64, 64]),  # 3 x (64 + 24) = 264 < 280
        (193, [256]),  # 4 x 88 = 352 > 280: one padded full chunk
        (256, [256]),
        (1050, [256, 256, 256, 256, 64]),
    ],
)
def test_tail_chunk_choice_by_cost(tokens, rows):
    assert chunk_schedule(tokens, 256, 64)[0] == rows
    assert chunk_schedule(tokens, 256, 0)[0] == [256] * -(-tokens // 256)


def test_tail_chunks_only_where_the_backend_loads_a_second_size(tmp_path, smollm_spec):
    plan = _plan(loaded_from(tmp_path, "", ["device.target=sd8gen3"]), smollm_spec, prompt_tokens=64)
    assert (plan.tail_chunk_size, plan.chunk_rows) == (0, [256])  # context binaries at chunk_size only
    assert "no tail graphs" in plan.chunk_choice


def test_chunk_sharing_one_graph_per_layer_and_linear(tmp_path, smollm_spec):
    plan = _plan(loaded_from(tmp_path, ""), smollm_spec, prompt_tokens=1024)
    assert len(plan.graphs) == 30 * 4
    assert {g.used_by_chunks for g in plan.graphs} == {4}
    qkv = next(g for g in plan.graphs if g.id == "L0.qkv")
    assert qkv.weight_bytes == 576 * (576 + 192 + 192) + (576 + 192 + 192) * 4
    runs = [s for s in plan.subgraphs if s.graph == "L0.qkv"]
    assert [s.chunk for s in runs] == [0, 1, 2, 3]


def test_placement_shapes_and_dtypes(tmp_path, smollm_spec):
    plan = _plan(loaded_from(tmp_path, '[quantization]\nactivations = "uint16"\n'), smollm_spec, prompt_tokens=256)
    by_id = {s.id: s for s in plan.subgraphs}
    down = by_id["c0.L5.down"]
    assert down.processor == "npu" and down.graph == "L5.down"
    assert [t.render() for t in down.inputs] == ["act:float32[256,1536]", "act_q:uint16[256,1536]"]
    assert [t.render() for t in down.outputs] == ["mlp_out:float32[256,576]"]
    att = by_id["c0.L5.attention"]
    assert att.processor == "cpu" and [t.render() for t in att.outputs] == ["attn_out:float32[256,576]"]
    assert by_id["c0.L30.lm_head"].outputs[0].shape == (1, 49152)


def test_dag_dependencies_across_chunks_and_layers(tmp_path, smollm_spec):
    plan = _plan(loaded_from(tmp_path, '[outliers]\npolicy = "none"\n'), smollm_spec, prompt_tokens=512)
    edges = set(plan.edges)
    assert ("c1.L3.qkv", "c1.L3.attention") in edges
    assert ("c0.L3.attention", "c1.L3.attention") in edges  # K/V of the earlier chunk
    assert ("c1.L2.down", "c1.L3.attn_norm") in edges
    assert ("c0.L2.down", "c1.L3.attn_norm") not in edges  # chunks are independent outside attention
    order = topological_order([s.id for s in plan.subgraphs], plan.edges)
    assert order == [s.id for s in plan.subgraphs]  # the plan lists subgraphs in a valid schedule order
    assert plan.shadow.layers == [] and not any(s.kind == "shadow" for s in plan.subgraphs)


def test_shadow_insertion(tmp_path, smollm_spec):
    plan = _plan(loaded_from(tmp_path, "[outliers]\nprune_fraction = 0.9\n"), smollm_spec, prompt_tokens=256)
    # 10% of 120 linear inputs; before calibration: down projections, spread over the layers
    assert plan.shadow.layers == [1, 3, 6, 8, 11, 13, 16, 18, 21, 23, 26, 28] and plan.shadow.source == "provisional"
    assert plan.shadow.linears[:2] == ["L1.down", "L3.down"] and len(plan.shadow.linears) == 12
    shadows = [s for s in plan.subgraphs if s.kind == "shadow"]
    assert len(shadows) == 12
    assert {s.processor for s in shadows} == {"cpu"}
    edges = set(plan.edges)
    assert ("c0.L13.gate_up", "c0.L13.down.shadow") in edges  # same input as the NPU linear
    assert ("c0.L13.down.shadow", "c0.L14.attn_norm") in edges  # correction added before use
    more = _plan(loaded_from(tmp_path, "[outliers]\nprune_fraction = 0.5\n"), smollm_spec, prompt_tokens=256)
    kinds = [linear.split(".")[1] for linear in more.shadow.linears]
    assert kinds.count("down") == 30 and kinds.count("qkv") == 30  # then qkv
    assert kinds.count("gate_up") == kinds.count("o_proj") == 0
    chosen = ((29, "down"), (0, "qkv"), (7, "gate_up"))
    calibrated = _plan(
        loaded_from(tmp_path, "[outliers]\nprune_fraction = 0.9\n"),
        smollm_spec,
        prompt_tokens=256,
        calibrated_shadow_inputs=chosen,
    )
    assert calibrated.shadow.layers == [0, 7, 29] and calibrated.shadow.source == "calibration"
    assert calibrated.shadow.linears == ["L0.qkv", "L7.gate_up", "L29.down"]
    assert sorted(s.id for s in calibrated.subgraphs if s.kind == "shadow") == [
        "c0.L0.qkv.shadow",
        "c0.L29.down.shadow",
        "c0.L7.gate_up.shadow",
    ]


def test_shadow_of_a_linear_waits_for_the_shadow_of_its_input(tmp_path, smollm_spec):
    # down's input h = silu(gate)*up is final only after gate_up's correction is added
    plan = _plan(loaded_from(tmp_path, "[outliers]\nprune_fraction = 0.0\n"), smollm_spec, prompt_tokens=256)
    edges = set(plan.edges)
    assert ("c0.L4.gate_up.shadow", "c0.L4.down.shadow") in edges
    assert ("c0.L4.gate_up.shadow", "c0.L4.down") in edges
    assert ("c0.L4.down.shadow", "c0.L5.qkv.shadow") not in edges  # via attn_norm, not directly
    assert ("c0.L5.attn_norm", "c0.L5.qkv.shadow") in edges
    assert topological_order([s.id for s in plan.subgraphs], plan.edges)  # still acyclic


def test_float_baseline_plan_is_all_cpu(tmp_path, smollm_spec):
    plan = _plan(loaded_from(tmp_path, '[device]\nnpu_backend = "none"\n'), smollm_spec, prompt_tokens=256)
    assert plan.graphs == [] and {s.processor for s in plan.subgraphs} == {"cpu"}
    assert plan.estimate.sequential_ms == plan.estimate.cpu_ms


def test_estimate_overlap_is_busier_processor(tmp_path, smollm_spec):
    plan = _plan(loaded_from(tmp_path, ""), smollm_spec, prompt_tokens=1024)
    e = plan.estimate
    assert e.overlapped_ms == pytest.approx(max(e.npu_ms, e.cpu_ms), abs=1e-2)
    assert e.sequential_ms == pytest.approx(e.npu_ms + e.cpu_ms, abs=1e-2)
    assert "nominal" in e.label and "not a measurement" in e.label
    assert e.prefill_tokens_per_s == pytest.approx(1024 / (e.overlapped_ms / 1e3), rel=1e-3)


GOLDEN_CASES = [
    ("default", REPO / "profiles" / "default.toml", 512),
    ("sd8gen3", REPO / "profiles" / "sd8gen3.toml", 512),
]


@pytest.mark.parametrize(("name", "path", "tokens"), GOLDEN_CASES, ids=[c[0] for c in GOLDEN_CASES])
def test_golden_plan_text_and_json(smollm_spec, name, path, tokens, update_goldens):
    loaded = load_profile(path)
    plan = _plan(loaded, smollm_spec, prompt_tokens=tokens)
    text = render_plan(plan)
    data = json.loads(plan_to_json(plan))
    json_bytes = gzip.compress(json.dumps(data, indent=1, sort_keys=True).encode(), mtime=0)
    assert text == golden_text(GOLDEN / f"plan_{name}.txt", text, update_goldens), changed_message("plan text")
    golden = json.loads(gzip.decompress(golden_bytes(GOLDEN / f"plan_{name}.json.gz", json_bytes, update_goldens)))
    for key in golden:
        assert data[key] == golden[key], changed_message(f"plan JSON key {key!r}")
    assert set(data) == set(golden)
    assert {"subgraphs", "edges", "memory", "estimate"} <= set(data)
    assert {"id", "layer", "kind", "processor", "inputs", "outputs"} <= set(data["subgraphs"][0])


def test_placement_shows_silu_mul_on_the_cpu_where_the_htp_arch_has_no_float_math(tmp_path, smollm_spec):
    """On HTP v68 (qcs6490) every gate_up graph returns gate and up and the CPU applies SiLU·mul
    (after a shadowed gate_up's correction): each layer's row says so; on v75 no row does."""
    rows = {}
    for target in ("qcs6490", "sd8gen3"):
        text = f'[device]\ntarget = "{target}"\n[prefill]\nchunk_size = 128\n'
        loaded = loaded_from(tmp_path, text)
        resolved = resolve(loaded, capabilities(target), smollm_spec)
        rendered = render_plan(_plan(loaded, smollm_spec), silu_mul_on_cpu=resolved.silu_mul_on_cpu)
        rows[target] = [line.split() for line in rendered.splitlines() if line.strip().startswith("L")]
    assert len(rows["qcs6490"]) == 30 and not any("silu_mul@cpu" in row for row in rows["sd8gen3"])
    for row in rows["qcs6490"]:
        after = row[row.index("gate_up@npu") + 1 :]
        assert after[after[0] == "shadow@cpu"] == "silu_mul@cpu", row

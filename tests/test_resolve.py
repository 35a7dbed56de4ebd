"""The resolver: every capability refusal names the key (located), the value and the device limit."""

from __future__ import annotations

import pytest
from plan_fixtures import capabilities, loaded_from

from mllm_deploy.errors import ExitCode, UserError
from mllm_deploy.resolve import resolve

GIB = 1024**3


def _caps(target: str, npu: dict | None = None, **top):
    caps = capabilities(target)
    if npu:
        top["npu"] = caps.npu.model_copy(update=npu)
    return caps.model_copy(update=top)


# (name, profile text, target, npu overrides, caps overrides, key, line, message part, allowed part)
REFUSALS = [
    (
        "attention on npu",
        '[placement]\nattention = "npu"\n',
        "host",
        None,
        {},
        "placement.attention",
        2,
        "dynamic shapes",
        "cpu",
    ),
    ("norms need fp16", '[placement]\nnorms = "npu"\n', "host", None, {}, "placement.norms", 2, "no float16", "cpu"),
    (
        "chunk rule",
        "[prefill]\nchunk_size = 100\n",
        "sd8gen3",
        None,
        {},
        "prefill.chunk_size",
        2,
        "not allowed on sd8gen3",
        "multiples of 32 from 32 to 1024",
    ),
    (
        "chunk above context",
        "[prefill]\nchunk_size = 512\nmax_context = 256\n",
        "host",
        None,
        {},
        "prefill.chunk_size",
        2,
        "cannot hold more tokens",
        "<= prefill.max_context (256)",
    ),
    (
        "context above model",
        "[prefill]\nmax_context = 16384\n",
        "host",
        None,
        {},
        "prefill.max_context",
        2,
        "model's context length",
        "<= 8192",
    ),
    (
        "int16 unsupported",
        '[quantization]\nactivations = "uint16"\n',
        "sd8gen3",
        {"supports_int16_activations": False},
        {},
        "quantization.activations",
        2,
        "no 16-bit activations",
        "uint8",
    ),
    (
        "per-channel unsupported",
        '[quantization]\nweights = "int8-per-channel"\n',
        "sd8gen3",
        {"supports_per_channel_weights": False},
        {},
        "quantization.weights",
        2,
        "no per-channel",
        "int8-per-tensor",
    ),
    (
        "npu memory",
        "[prefill]\nchunk_size = 256\n",
        "sd8gen3",
        {"addressable_memory_bytes": 50 * 1024**2},
        {},
        "prefill.chunk_size",
        2,
        "more than sd8gen3's NPU can address",
        "<= 0.05 GiB",
    ),
    (
        "ram",
        "[prefill]\nmax_context = 8192\n",
        "qcs6490",
        None,
        {"ram_bytes": GIB // 4},
        "prefill.max_context",
        2,
        "more than 80% of qcs6490's RAM",
        "<= 0.20 GiB",
    ),
    (
        "cpu threads",
        "[device]\ncpu_threads = 16\n",
        "sd8gen3",
        None,
        {},
        "device.cpu_threads",
        2,
        "more threads than sd8gen3 has cores",
        "<= 8",
    ),
    (
        "npu threads",
        '[device]\nnpu_backend = "ort-cpu"\nnpu_threads = 64\n',
        "host",
        None,
        {},
        "device.npu_threads",
        3,
        "more threads than host has cores",
        "<= 2",
    ),
    (
        "int8 attention on a float32 cache",
        '[prefill]\nattention = "int8"\n[decode]\nkv_cache = "float32"\n',
        "host",
        None,
        {},
        "prefill.attention",
        2,
        "reads the int8 KV cache",
        "float32",
    ),
    (
        "backend not on device",
        '[device]\nnpu_backend = "ort-cpu"\n',
        "sd8gen3",
        None,
        {},
        "device.npu_backend",
        2,
        "not available on sd8gen3",
        "qnn-htp, none",
    ),
]


@pytest.mark.parametrize("case", REFUSALS, ids=[c[0] for c in REFUSALS])
def test_each_refusal_names_key_line_value_and_limit(tmp_path, smollm_spec, case):
    _, text, target, npu, top, key, line, message, allowed = case
    loaded = loaded_from(
        tmp_path,
        f'[device]\ntarget = "{target}"\n' + text
        if "[device]" not in text
        else text.replace("[device]\n", f'[device]\ntarget = "{target}"\n'),
    )
    shift = 0 if "[device]" in text else 2
    with pytest.raises(UserError) as info:
        resolve(loaded, _caps(target, npu, **top), smollm_spec)
    err = info.value
    assert err.exit_code == ExitCode.CANNOT_RUN
    assert len(err.diagnostics) == 1, [d.render() for d in err.diagnostics]
    diag = err.diagnostics[0]
    assert diag.key == key
    assert diag.line == line + shift + (1 if "[device]" in text else 0)
    assert diag.file == str(loaded.path)
    assert message in diag.message
    assert allowed in diag.allowed
    assert diag.render().startswith(f"{loaded.path}:{diag.line}:1: error: {key}: ")


def test_all_refusals_reported_at_once(tmp_path, smollm_spec):
    text = (
        '[device]\ntarget = "sd8gen3"\ncpu_threads = 12\n[prefill]\nchunk_size = 100\n[placement]\nattention = "npu"\n'
    )
    with pytest.raises(UserError) as info:
        resolve(loaded_from(tmp_path, text), capabilities("sd8gen3"), smollm_spec)
    keys = sorted(d.key for d in info.value.diagnostics)
    assert keys == ["device.cpu_threads", "placement.attention", "prefill.chunk_size"]


def test_override_refusal_points_at_the_set(tmp_path, smollm_spec):
    loaded = loaded_from(tmp_path, "", overrides=["prefill.max_context=9000"])
    with pytest.raises(UserError) as info:
        resolve(loaded, capabilities("host"), smollm_spec)
    assert info.value.diagnostics[0].file == "--set prefill.max_context=9000"


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        ('[model]\nchat_template = "nope.jinja"\n', "model.chat_template", "chat template file not found"),
        ('[calibration]\nsource = "texts/*.txt"\n', "calibration.source", "no text files match"),
    ],
)
def test_missing_files_are_invalid_input(tmp_path, smollm_spec, text, key, message):
    with pytest.raises(UserError) as info:
        resolve(loaded_from(tmp_path, text), capabilities("host"), smollm_spec)
    assert info.value.exit_code == ExitCode.INVALID
    assert info.value.diagnostics[0].key == key
    assert message in info.value.diagnostics[0].message
    assert info.value.diagnostics[0].line == 2


def test_calibration_glob_that_matches_is_accepted(tmp_path, smollm_spec):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("some text")
    resolved = resolve(
        loaded_from(tmp_path, '[calibration]\nsource = "texts/*.txt"\n'), capabilities("host"), smollm_spec
    )
    assert resolved.backend == "ort-cpu"


@pytest.mark.parametrize(
    ("text", "target", "backend", "label", "threads"),
    [
        ("", "host", "ort-cpu", "ort-cpu emulation (AMX INT8)", (2, 1)),
        ('[device]\nnpu_backend = "none"\n', "host", "none", "none (float32 on the CPU)", (2, 0)),
        ("", "sd8gen3", "qnn-htp", "QNN HTP v75", (8, 0)),
        ("[device]\nnpu_threads = 2\ncpu_threads = 2\n", "host", "ort-cpu", "ort-cpu emulation (AMX INT8)", (2, 2)),
    ],
)
def test_backend_label_and_threads(tmp_path, smollm_spec, text, target, backend, label, threads):
    body = text if "[device]" in text else "[device]\n" + text
    body = body.replace("[device]\n", f'[device]\ntarget = "{target}"\n')
    resolved = resolve(loaded_from(tmp_path, body), capabilities(target), smollm_spec)
    assert (resolved.backend, resolved.backend_label) == (backend, label)
    assert (resolved.cpu_threads, resolved.npu_threads) == threads


def test_qnn_on_a_target_without_an_htp_arch_is_refused_not_defaulted(tmp_path, smollm_spec):
    """The host's QNN simulator emulates no particular HTP: qnn-htp needs a target that names one
    (it used to compile for v75 silently)."""
    text = '[device]\nnpu_backend = "qnn-htp"\n'
    with pytest.raises(UserError) as info:
        resolve(loaded_from(tmp_path, text), capabilities("host"), smollm_spec)
    assert info.value.exit_code == ExitCode.CANNOT_RUN
    (diag,) = info.value.diagnostics
    assert (diag.key, diag.line, diag.value) == ("device.npu_backend", 2, "qnn-htp")
    assert "names none" in diag.message and diag.allowed == "ort-cpu"
    assert "catalog" in diag.hint


def test_oversubscription_warns_but_runs(tmp_path, smollm_spec):
    text = '[device]\nnpu_backend = "ort-cpu"\nnpu_threads = 2\ncpu_threads = 2\n'
    resolved = resolve(loaded_from(tmp_path, text), capabilities("host"), smollm_spec)
    assert any("compete for cores" in w.message for w in resolved.warnings)


def test_int8_attention_is_ignored_with_a_warning_on_the_float_baseline(tmp_path, smollm_spec):
    text = '[device]\nnpu_backend = "none"\n[prefill]\nattention = "int8"\n'
    resolved = resolve(loaded_from(tmp_path, text), capabilities("host"), smollm_spec)
    assert [(w.key, w.line) for w in resolved.warnings if "float baseline attends in float32" in w.message] == [
        ("prefill.attention", 4)
    ]
    assert not resolve(
        loaded_from(tmp_path, '[device]\nnpu_backend = "none"\n'), capabilities("host"), smollm_spec
    ).warnings


def test_memory_budget_of_default_profile(tmp_path, smollm_spec):
    resolved = resolve(loaded_from(tmp_path, ""), capabilities("host"), smollm_spec)
    m = resolved.memory
    linear_params = 30 * (576 * 576 * 2 + 2 * 192 * 576 + 3 * 1536 * 576)
    assert m.npu_weight_bytes == linear_params + 30 * (576 + 192 + 192 + 576 + 1536 + 1536 + 576) * 4
    assert m.kv_cache_bytes == 2 * 30 * 4096 * 192 * 1  # int8 KV cache (decode.kv_cache default)
    assert m.cpu_weight_bytes >= 49152 * 576 * 4 + m.decode_weight_bytes  # float embeddings (tied head), decode graphs
    # decode graphs, blocks of 64 (+ a float32 scale each): the layers' linears; the output head in
    # blocks of 32 whatever the profile says (HEAD_BLOCK: a Q8_0 embedding exactly)
    blocks = 30 * (960 * 9 + 576 * 9 + 2 * 1536 * 9 + 576 * 24)
    head = 49152 * 18 * (32 + 4)
    assert m.decode_weight_bytes == blocks * (64 + 4) + head
    q8_0 = resolve(loaded_from(tmp_path, "[decode]\nweight_block = 32\n"), capabilities("host"), smollm_spec)
    assert q8_0.memory.decode_weight_bytes == 2 * blocks * (32 + 4) + head
    assert q8_0.memory.cpu_weight_bytes - m.cpu_weight_bytes == q8_0.memory.decode_weight_bytes - m.decode_weight_bytes
    float_kv = resolve(loaded_from(tmp_path, '[decode]\nkv_cache = "float32"\n'), capabilities("host"), smollm_spec)
    assert float_kv.memory.kv_cache_bytes == 2 * 30 * 4096 * 192 * 4
    float_run = resolve(loaded_from(tmp_path, '[device]\nnpu_backend = "none"\n'), capabilities("host"), smollm_spec)
    assert float_run.memory.npu_bytes == 0 and float_run.memory.kv_cache_bytes == 2 * 30 * 4096 * 192 * 4
    assert float_run.memory.decode_weight_bytes == 0  # float32 decode from the float linears
    # the float baseline keeps float32 linears on the CPU instead of the 8-bit decode graphs
    assert float_run.memory.cpu_weight_bytes > m.cpu_weight_bytes - m.decode_weight_bytes + 3 * linear_params


@pytest.mark.parametrize(
    ("target", "key", "words"),
    [
        ("host", "lm_head", "no output-head graph"),
        ("sd8gen3", "lm_head", "no output-head graph"),
        ("host", "norms", "no float16"),  # the emulated NPU has no float16 either
    ],
)
def test_placements_no_backend_implements_are_refused(tmp_path, smollm_spec, target, key, words):
    """`plan` used to count an lm_head graph the compiler never built (its matmul ran on the NPU
    executor as CPU work): a placement nothing implements is a located refusal."""
    text = f'[device]\ntarget = "{target}"\n[placement]\n{key} = "npu"\n'
    with pytest.raises(UserError) as info:
        resolve(loaded_from(tmp_path, text), capabilities(target), smollm_spec)
    assert info.value.exit_code == ExitCode.CANNOT_RUN
    diags = [d for d in info.value.diagnostics if d.key == f"placement.{key}"]
    assert len(diags) == 1 and diags[0].line == 4 and words in diags[0].message and diags[0].allowed == "cpu"


def test_norms_on_an_fp16_npu_are_refused_because_no_backend_builds_them(tmp_path, smollm_spec):
    caps = capabilities("sd8elite")
    assert caps.npu is not None and caps.npu.supports_fp16
    text = '[device]\ntarget = "sd8elite"\n[placement]\nnorms = "npu"\n'
    with pytest.raises(UserError) as info:
        resolve(loaded_from(tmp_path, text), caps, smollm_spec)
    (diag,) = [d for d in info.value.diagnostics if d.key == "placement.norms"]
    assert "builds no norm graphs" in diag.message and diag.line == 4


@pytest.mark.parametrize(
    "target, on_cpu", [("qcs6490", True), ("sd8gen3", False), ("sd8gen2", False), ("sd8elite", False), ("host", False)]
)
def test_silu_mul_is_re_placed_on_the_cpu_where_the_htp_arch_has_no_float_math(tmp_path, smollm_spec, target, on_cpu):
    """HTP v68 refuses gate_up's float SiLU·mul (backends.registry.HTP_ARCHS): the resolver puts it
    on the CPU for every layer before anything is built, and says so, naming the arch and why."""
    text = f'[device]\ntarget = "{target}"\n[prefill]\nchunk_size = 128\n'
    resolved = resolve(loaded_from(tmp_path, text), capabilities(target), smollm_spec)
    assert resolved.silu_mul_on_cpu is on_cpu
    notes = [w for w in resolved.warnings if "SiLU" in w.message]
    if on_cpu:
        (note,) = notes
        assert (note.key, note.line) == ("device.target", 2)
        assert "HTP v68" in note.message and "no float arithmetic" in note.message and "CPU" in note.message
    else:
        assert notes == []


def test_split_gate_up_follows_the_resolver_and_the_shadowed_inputs(tmp_path, smollm_spec):
    from mllm_deploy.compile.build import split_gate_up

    v68 = resolve(loaded_from(tmp_path, '[device]\ntarget = "qcs6490"\n'), capabilities("qcs6490"), smollm_spec)
    v75 = resolve(loaded_from(tmp_path, '[device]\ntarget = "sd8gen3"\n'), capabilities("sd8gen3"), smollm_spec)
    shadowed = frozenset({(3, "gate_up"), (4, "down")})
    assert [split_gate_up(v68, shadowed, layer) for layer in (0, 3, 4)] == [True, True, True]
    assert [split_gate_up(v75, shadowed, layer) for layer in (0, 3, 4)] == [False, True, False]


@pytest.mark.parametrize("activations, warned", [("uint8", True), ("uint16", False)])
def test_uint8_on_a_snapdragon_target_warns_about_its_accuracy(tmp_path, smollm_spec, activations, warned):
    """HTP re-quantizes every linear output: uint8 there costs accuracy the host's path does not."""
    text = f'[device]\ntarget = "sd8gen3"\n[quantization]\nactivations = "{activations}"\n'
    resolved = resolve(loaded_from(tmp_path, text), capabilities("sd8gen3"), smollm_spec)
    notes = [w for w in resolved.warnings if w.key == "quantization.activations"]
    assert len(notes) == int(warned)
    if warned:
        assert (notes[0].line, notes[0].value) == (4, "uint8") and "uint16" in notes[0].message
    host = resolve(loaded_from(tmp_path, '[device]\ntarget = "host"\n'), capabilities("host"), smollm_spec)
    assert not [w for w in host.warnings if w.key == "quantization.activations"]  # uint8 is the host's fast path


def test_shipped_snapdragon_profiles_default_to_16_bit_activations_and_the_host_to_uint8():
    from mllm_deploy.backends.registry import HTP_ARCHS
    from mllm_deploy.paths import resource_dir
    from mllm_deploy.profile import load_profile

    seen = {}
    for path in sorted((resource_dir("profiles")).glob("*.toml")):
        profile = load_profile(path).profile
        caps = capabilities(profile.device.target)
        qnn = profile.device.npu_backend == "qnn-htp"
        if qnn:
            assert caps.npu is not None and HTP_ARCHS[caps.npu.htp_arch_number].int16_activations
        seen[path.stem] = profile.quantization.activations
        assert profile.quantization.activations == ("uint16" if qnn else "uint8"), path.name
    assert {"sd8gen3", "qcs6490", "host", "default"} <= set(seen)

"""The profile language: strict, frozen, documented pydantic models.

Every field's docstring is its documentation: `mllm-deploy schema` and
`docs/profile-reference.md` are generated from these models.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from mllm_deploy.backends.registry import NpuBackendName

SCHEMA_VERSION: Final = 1

Processor = Literal["cpu", "npu"]
NpuBackend = Literal["auto", NpuBackendName, "none"]  # the registered backends, plus auto and none


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        strict=True,
        use_attribute_docstrings=True,
        validate_default=True,
        allow_inf_nan=False,
    )


class ModelSection(_Section):
    """Which model to deploy and how to talk to it."""

    source: str = Field("builtin:smollm2-135m-instruct", min_length=1)
    """`builtin:NAME` from the registry (`mllm-deploy models list`), a path to a `.gguf` file,
    or a Hugging Face model directory (`config.json` + `*.safetensors` + `tokenizer.json`).
    Relative paths are relative to the profile file."""

    chat_template: str = Field("auto", min_length=1)
    """`auto` uses the model's own chat template (GGUF metadata or `tokenizer_config.json`),
    falling back to the built-in ChatML template; otherwise a path to a Jinja template file."""

    system_prompt: str | None = None
    """System message put at the start of every conversation; none when unset."""


class DeviceSection(_Section):
    """The target device and which backend plays the NPU."""

    target: str = Field("host", min_length=1)
    """Device id from the catalog (`mllm-deploy devices`); `host` is this machine, probed at run time."""

    npu_backend: NpuBackend = "auto"
    """What executes the NPU subgraphs: `qnn-htp` (onnxruntime QNN HTP; the x86 simulator when
    no Hexagon NPU is present), `ort-cpu` (the same INT8 graphs on onnxruntime's CPU integer
    kernels, an emulated NPU), `none` (everything float32 on the CPU: the baseline), or `auto`
    (qnn-htp on a real Hexagon NPU, otherwise ort-cpu)."""

    cpu_threads: int | None = Field(None, ge=1, le=256)
    """Threads for CPU subgraphs (attention, norms, outlier corrections, decode).
    Unset: all cores (on `ort-cpu` the CPU side shares cores with the emulated NPU, which idles part of the time)."""

    npu_threads: int | None = Field(None, ge=1, le=256)
    """Threads onnxruntime may use for the emulated NPU; only meaningful for `ort-cpu`.
    Unset: half of the cores (at least one)."""


class PrefillSection(_Section):
    """How the prompt is cut into fixed-size chunks for the NPU."""

    chunk_size: int = Field(256, ge=1, le=4096)
    """Tokens per prefill chunk: the static batch dimension of every NPU graph. The last chunk
    of a prompt is padded. Must be one the target NPU allows and no larger than `max_context`."""

    tail_chunk_size: int = Field(64, ge=0, le=4096)
    """Tokens per tail chunk: a second static size of the NPU graphs (the same weights) for a
    short prompt or a prompt's last few tokens. When the tokens left after the full chunks fit in
    tail chunks at a lower cost than one padded full chunk (the plan's cost model: padded rows
    plus a fixed cost per chunk), they run as tail chunks; `plan` shows the choice. 0, or a value
    not smaller than `chunk_size`: off (every chunk is `chunk_size`). Must be a size the target
    NPU allows. Backends that load context binaries compiled at `chunk_size` only (`qnn-htp`)
    run without tail chunks."""

    max_context: int = Field(4096, ge=1, le=1_048_576)
    """Most tokens (prompt + generated) one conversation may hold; sizes the KV cache.
    Must not exceed the model's own context length."""

    overflow: Literal["error", "truncate-left"] = "error"
    """What to do with a prompt longer than `max_context`: refuse it, or drop the oldest tokens."""

    attention: Literal["float32", "int8"] = "float32"
    """Arithmetic of prefill attention on the NPU path. `float32` dequantizes the KV cache and
    multiplies in float (the chunk's own keys at full precision); `int8` multiplies per-token
    int8 queries with the earlier chunks' int8 keys, and uint8 attention weights with their
    values, in integer kernels (softmax and the chunk's own keys in float): faster prefill, at a
    measured perplexity cost (README, Accuracy). `int8` needs `decode.kv_cache = "int8"`; the float baseline always computes in float32."""


class QuantizationSection(_Section):
    """Number formats of the NPU graphs."""

    weights: Literal["int8-per-tensor", "int8-per-channel"] = "int8-per-channel"
    """INT8 weight quantization: one scale per tensor, or one per output channel
    (more accurate; the NPU must support per-channel weights)."""

    activations: Literal["uint8", "uint16"] = "uint8"
    """Static per-tensor activation quantization of linear inputs, calibrated offline.
    `uint16` is more accurate, slower, and needs NPU support for 16-bit activations."""


class OutliersSection(_Section):
    """Shadow outlier execution: activation values beyond the INT8 range are corrected on the CPU."""

    policy: Literal["none", "clip", "shadow"] = "shadow"
    """`shadow`: clamp on the NPU, add the outliers' product on the CPU in float;
    `clip`: clamp and drop the outliers (for comparison); `none`: max-abs scales, no correction."""

    scale_percentile: float = Field(99.8, gt=50.0, le=100.0)
    """Percentile of |x| over the calibration set that sets each linear input's per-tensor
    scale; values beyond it are outliers (about 0.2% of values at 99.8, handled on the CPU).
    100 means max-abs."""

    hot_channel_fraction: float = Field(0.03, ge=0.0, le=1.0)
    """Largest share of a linear's input channels kept in memory as float weight rows
    ("hot channels"); the remaining rows are read from disk on demand."""

    prune_fraction: float = Field(0.5, ge=0.0, le=1.0)
    """Share of linear inputs (over all layers) whose outlier correction is skipped, those whose
    max-abs grid measurably costs least in calibration first; a skipped input gets a max-abs
    grid instead of a clamp. On SmolLM2 (4,096 news tokens, percentile 99.8): 0.5 gives 1.0137x
    float perplexity, 0.3 1.0115x, 0 1.0083x; lower it for accuracy, raise it for less CPU work."""


class SchedulerSection(_Section):
    """Order in which prefill subgraphs run."""

    policy: Literal["sequential", "out-of-order"] = "out-of-order"
    """`sequential`: layer after layer, chunk after chunk (the baseline); `out-of-order`:
    the greedy rule that favours subgraphs unblocking the most NPU work."""


class PlacementSection(_Section):
    """Which processor runs each kind of non-linear subgraph."""

    attention: Processor = "cpu"
    """Attention over the KV cache (dynamic shapes, float). The NPU cannot run it."""

    norms: Processor = "cpu"
    """RMSNorm before attention and MLP."""

    lm_head: Processor = "cpu"
    """Output projection to vocabulary logits (only for positions that need logits)."""


class DecodeSection(_Section):
    """Token generation after prefill, on the CPU."""

    max_new_tokens: int = Field(256, ge=1, le=1_048_576)
    """Most tokens generated per turn."""

    temperature: float = Field(0.0, ge=0.0, le=10.0)
    """Sampling temperature; 0 is greedy (deterministic)."""

    top_k: int = Field(0, ge=0, le=1_000_000)
    """Sample only among the k most likely tokens; 0 disables the filter."""

    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling: the smallest set of tokens whose probability reaches p; 1 disables it."""

    repetition_penalty: float = Field(1.0, ge=1.0, le=10.0)
    """Divide positive (multiply negative) logits of already seen tokens by this; 1 disables it."""

    seed: int = Field(0, ge=0, le=2**63 - 1)
    """Random seed for sampling."""

    kv_cache: Literal["int8", "float32"] = "int8"
    """Storage of the KV cache on the NPU path: `int8` with per-channel steps from calibration
    (a quarter of the memory, and decode reads a quarter of the bytes) or `float32`. The float
    baseline (`device.npu_backend = "none"`) always keeps float32."""

    weight_block: Literal[32, 64, 128] = 64
    """Values per block of the decode graphs' weights (one scale each), which is also the
    block the activation row is quantized in for the integer dot products. Smaller blocks follow
    the float model more closely, larger ones decode faster (README, Performance: 32 is llama.cpp's
    Q8_0 block; 64 measured 9-20% faster per token at 1.8x its small divergence from float)."""

    weight_bits: Literal[4, 8] = 8
    """Bits per weight of the decode graphs' linears: `8` (symmetric blocks) or `4` (each block's
    minimum kept as a float offset; the output head stays 8-bit). With `weight_block = 32` 4 bits
    read a GGUF's Q4_1 blocks back exactly: the default model's decode graphs 143 -> 112 MB and
    closer to float than 8 bits, but ~15% slower per token on a Zen 4 host; larger blocks
    re-quantize Q4_1 weights and diverge (docs/method.md, decode graphs)."""

    stop: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    """Strings that end generation when they appear in the output (not included in it);
    each must be non-empty."""


class CalibrationSection(_Section):
    """Data used to calibrate activation scales and find outliers."""

    source: str = Field("self", min_length=1)
    """`self`: text the model generates from a fixed, seeded set of prompts; otherwise a text
    file path or glob (relative to the profile file)."""

    samples: int = Field(16, ge=1, le=4096)
    """Number of calibration sequences."""

    tokens_per_sample: int = Field(256, ge=8, le=65_536)
    """Tokens per calibration sequence."""


class AccuracySection(_Section):
    """The accuracy gate of `build --out`: the bundle's path against the float32 model."""

    max_ppl_ratio: float = Field(1.05, gt=1.0, le=100.0)
    """Largest perplexity ratio (bundle's path / float32 model, on the held-out text shipped with
    mllm-deploy) at which `build --out` writes the bundle; above it the build refuses (exit 4)
    unless `--force-accuracy`."""


class UiSection(_Section):
    """Terminal UI settings."""

    refresh_hz: float = Field(4.0, ge=0.5, le=60.0)
    """How often utilization bars and metrics redraw, per second."""


class Profile(_Section):
    """A deployment: model, target device, prefill, quantization, outliers, scheduling, decoding."""

    schema_version: Literal[1] = SCHEMA_VERSION
    """Version of the profile language; this release reads 1."""

    name: str = Field("default", min_length=1, max_length=128)
    """A name for this deployment, shown in the UI and reports."""

    model: ModelSection = Field(default_factory=ModelSection)
    """The model to deploy."""

    device: DeviceSection = Field(default_factory=DeviceSection)
    """The target device."""

    prefill: PrefillSection = Field(default_factory=PrefillSection)
    """Chunked prefill."""

    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    """NPU number formats."""

    outliers: OutliersSection = Field(default_factory=OutliersSection)
    """Shadow outlier execution."""

    scheduler: SchedulerSection = Field(default_factory=SchedulerSection)
    """Subgraph scheduling."""

    placement: PlacementSection = Field(default_factory=PlacementSection)
    """Processor placement of non-linear subgraphs."""

    decode: DecodeSection = Field(default_factory=DecodeSection)
    """Generation."""

    calibration: CalibrationSection = Field(default_factory=CalibrationSection)
    """Calibration data."""

    accuracy: AccuracySection = Field(default_factory=AccuracySection)
    """Accuracy gate of bundles."""

    ui: UiSection = Field(default_factory=UiSection)
    """Terminal UI."""

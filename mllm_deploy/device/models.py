"""What a target device can do: strict, frozen, documented models.

Catalog devices carry public nominal figures (vendor spec sheets, QNN SDK tables, or
figures derived from vendor claims; each data file says which). The `host` device is
filled in by the probe (`mllm_deploy.device.probe`): its `probe` values are measured on
this machine, except the few figures the probe labels nominal.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mllm_deploy.backends.registry import NpuBackendName

HtpArch = Literal["v68", "v69", "v73", "v75", "v79", "v81"]
DeviceKind = Literal["phone", "laptop", "iot", "host"]
QnnHtpMode = Literal["device", "simulator", "absent"]

GIB = 1024**3


class _Strict(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        validate_default=True,
    )


class ChunkSizeRule(_Strict):
    """Which prefill chunk sizes a device accepts: every multiple of `multiple_of` in
    `[min_tokens, max_tokens]`. This is this tool's policy for static NPU graph shapes
    (HTP tiles activations in blocks of 32 rows), not a vendor limit; memory limits are
    checked separately by the resolver."""

    multiple_of: int = Field(ge=1, le=4096)
    """Chunk sizes must be a multiple of this many tokens."""

    min_tokens: int = Field(ge=1, le=4096)
    """Smallest allowed chunk size in tokens."""

    max_tokens: int = Field(ge=1, le=4096)
    """Largest allowed chunk size in tokens."""

    @model_validator(mode="after")
    def _ordered(self) -> ChunkSizeRule:
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens {self.min_tokens} is larger than max_tokens {self.max_tokens}")
        if self.min_tokens % self.multiple_of:
            raise ValueError(f"min_tokens {self.min_tokens} is not a multiple of {self.multiple_of}")
        return self

    def allows(self, n: int) -> bool:
        """True when `n` tokens is an allowed chunk size."""
        return (
            isinstance(n, int)
            and not isinstance(n, bool)
            and self.min_tokens <= n <= self.max_tokens
            and n % self.multiple_of == 0
        )

    def describe(self) -> str:
        """The rule in words, e.g. `multiples of 32 from 32 to 1024`."""
        if self.multiple_of == 1:
            return f"any size from {self.min_tokens} to {self.max_tokens}"
        return f"multiples of {self.multiple_of} from {self.min_tokens} to {self.max_tokens}"


class CpuCluster(_Strict):
    """A group of identical CPU cores."""

    name: str = Field(min_length=1)
    """Core type and role, e.g. `Cortex-X4 (prime)`."""

    cores: int = Field(ge=1, le=1024)
    """Number of cores in this cluster."""

    ghz: float = Field(gt=0.0, le=10.0)
    """Maximum clock in GHz (nominal)."""

    gflops_per_core: float = Field(gt=0.0)
    """Peak float32 GFLOP/s of one core: clock x float32 FLOPs per cycle of its SIMD units
    (e.g. four 128-bit NEON FMA pipes = 32 FLOP/cycle). A nominal peak, not a measurement."""


class NpuCaps(_Strict):
    """The processor that runs the static-shape INT8 graphs (the `npu` logical processor)."""

    kind: Literal["hexagon-htp", "cpu-emulated"]
    """`hexagon-htp`: a Qualcomm Hexagon NPU driven through QNN; `cpu-emulated`: this
    machine's CPU integer units running the same INT8 graphs with onnxruntime (`ort-cpu`)."""

    vendor: str = Field(min_length=1)
    """Who makes the processor or the runtime that plays it, e.g. `Qualcomm`."""

    qnn_soc_model: int | None = Field(None, ge=0)
    """QNN `soc_model` id (QnnTypes.h `Qnn_SocModel_t`), passed to the QNN EP when
    compiling context binaries for this SoC; none when not a Qualcomm target."""

    htp_arch: HtpArch | None = None
    """Hexagon HTP architecture version (QNN `htp_arch`); none when not a Hexagon NPU."""

    int8_tops: float | None = Field(None, gt=0.0)
    """Peak INT8 throughput in TOPS (tera-operations per second; one MAC = 2 ops).
    Nominal: from the vendor, or derived from vendor claims (see `source_note`)."""

    supports_fp16: bool
    """Whether the NPU can run float16 graphs."""

    supports_int16_activations: bool
    """Whether 16-bit quantized activations (A16W8) are supported (profile
    `quantization.activations = "uint16"`)."""

    supports_per_channel_weights: bool
    """Whether weights quantized with one scale per output channel are supported
    (profile `quantization.weights = "int8-per-channel"`)."""

    addressable_memory_bytes: int = Field(ge=0)
    """Most bytes of graphs, weights and buffers the NPU can map at once
    (recent Hexagon NPUs: a 32-bit virtual address space, about 4 GiB)."""

    allowed_chunk_sizes: ChunkSizeRule
    """Prefill chunk sizes (static graph batch dimension) this NPU accepts."""

    @property
    def htp_arch_number(self) -> int | None:
        """`htp_arch` as the number QNN's options take (`"v75"` -> 75); none when unset."""
        return int(self.htp_arch[1:]) if self.htp_arch else None


class HostProbe(_Strict):
    """What the probe found on this machine (measured unless a field says nominal)."""

    ok: bool
    """True when the probe subprocess finished; false means these are conservative
    fallback values (see `warnings`)."""

    warnings: list[str] = Field(default_factory=list)
    """Problems met while probing (e.g. the probe crashed or timed out)."""

    system: str
    """Operating system (`platform.system()`), e.g. `Linux`."""

    machine: str
    """CPU architecture (`platform.machine()`), e.g. `x86_64` or `aarch64`."""

    cpu_model: str
    """CPU model name (`/proc/cpuinfo` `model name`, or `platform.processor()`)."""

    physical_cores: int = Field(ge=1)
    """Physical cores in the machine (psutil)."""

    logical_cpus: int = Field(ge=1)
    """Logical CPUs in the machine (psutil; hyper-threads count)."""

    usable_cpus: int = Field(ge=1)
    """Logical CPUs this process may run on (`os.sched_getaffinity`); thread counts are
    checked against this."""

    cpu_ghz: float | None = Field(None, gt=0.0)
    """Maximum (or current, when no maximum is reported) CPU clock in GHz; none if unknown."""

    ram_bytes: int = Field(ge=0)
    """Physical memory usable by this process: the machine's RAM, or the cgroup
    `memory.max` limit when that is lower."""

    has_amx_int8: bool
    """CPU has Intel AMX INT8 tiles (`amx_int8` flag)."""

    has_avx512_vnni: bool
    """CPU has AVX-512 VNNI INT8 dot products (`avx512_vnni` flag)."""

    has_avx_vnni: bool
    """CPU has AVX (256-bit) VNNI INT8 dot products (`avx_vnni` flag)."""

    has_avx512f: bool
    """CPU has AVX-512 Foundation (`avx512f` flag)."""

    has_avx2_fma: bool
    """CPU has AVX2 and FMA (`avx2` and `fma` flags)."""

    onnxruntime_version: str | None = None
    """Installed onnxruntime version; none when it cannot be imported."""

    ort_providers: list[str] = Field(default_factory=list)
    """onnxruntime execution providers available (built in, plus plugin EPs registered by
    the probe, e.g. `QNNExecutionProvider`)."""

    qnn_version: str | None = None
    """Installed `onnxruntime-qnn` package version; none when absent."""

    qnn_sdk_version: str | None = None
    """QNN SDK (QAIRT) version bundled with `onnxruntime-qnn`; none when unknown."""

    qnn_available: bool
    """The QNN execution provider registered and its HTP backend library is present."""

    qnn_htp_mode: QnnHtpMode
    """`device`: QNN reports a real Hexagon NPU; `simulator`: the HTP backend runs as
    Qualcomm's x86 simulator (bit-faithful, 200-700x slower than the CPU); `absent`."""

    qnn_ep_devices: list[str] = Field(default_factory=list)
    """Hardware devices the QNN EP offered (`ort.get_ep_devices()`), as `TYPE vendor`."""

    npu_metadata: dict[str, str] = Field(default_factory=dict)
    """What onnxruntime reports about the QNN EP's NPU device, verbatim: `vendor_id`,
    `device_id`, and the `OrtHardwareDevice.metadata` / `OrtEpDevice.ep_metadata` entries
    (prefixed `hw.` / `ep.`). Empty without an NPU-type device (e.g. under the x86 simulator,
    whose QNN device is the CPU). onnxruntime-qnn documents no HTP arch or SoC key here, so the
    SoC is identified from the kernel's facts below."""

    soc_machine: str | None = None
    """The SoC's part name as the Linux kernel reports it (`/sys/devices/soc0/machine`, e.g.
    `SM8650` on a Snapdragon 8 Gen 3); none where the file does not exist (x86, macOS)."""

    soc_id: int | None = None
    """The kernel's SoC id (`/sys/devices/soc0/soc_id`; on Qualcomm the msm-id, e.g. 557 for
    SM8650: not QNN's `soc_model` numbering); none where the file does not exist."""

    board_model: str | None = None
    """The board's name from the device tree (`/proc/device-tree/model`, e.g. `Qualcomm
    Technologies, Inc. SM8650 QRD`); none without a device tree (x86)."""

    int8_emulated_gops: float = Field(gt=0.0)
    """Nominal INT8 throughput (GOP/s) of onnxruntime's CPU integer kernels on the usable
    CPUs. Nominal, not measured by the probe; `int8_emulated_gops_source` says where
    the per-core figure comes from."""

    int8_emulated_gops_source: str
    """Where `int8_emulated_gops` comes from."""

    fingerprint: dict[str, str] = Field(default_factory=dict)
    """What the cached probe is keyed by (hostname, python, onnxruntime, CPU, kernel, ...)."""


class EfficiencyPoint(_Strict):
    """One point of the NPU's efficiency curve: the share of peak INT8 throughput a linear graph
    of `rows` activation rows (the chunk size) reaches."""

    rows: int = Field(ge=1, le=65536)
    """Activation rows of the matrix product (tokens per chunk)."""

    fraction: float = Field(gt=0.0, le=1.0)
    """Share of `npu.int8_tops` reached at that many rows."""


class CostModel(_Strict):
    """What `mllm-deploy estimate` prices a plan with on this device. Every figure names its
    source in `sources` (a datasheet, a public benchmark, a measurement here, or an assumption)."""

    npu_efficiency: list[EfficiencyPoint] = Field(min_length=1)
    """Share of peak INT8 throughput by matrix rows, interpolated in log2(rows) between points
    and held flat outside them."""

    npu_full_width: int = Field(ge=1)
    """Matrices whose narrower side (input or output features) is below this width lose
    efficiency in proportion (the NPU's vector/tile width left idle)."""

    npu_graph_launch_us: float = Field(ge=0.0)
    """Fixed cost of executing one NPU graph (driver call, RPC to the NPU), microseconds."""

    npu_sync_us: float = Field(ge=0.0)
    """NPU<->CPU hand-off per NPU graph: its float input quantized in, its output back to the
    CPU (cache maintenance, signalling), microseconds."""

    cpu_float_efficiency: float = Field(gt=0.0, le=1.0)
    """Share of a core's nominal float32 peak (`gflops_per_core`) the CPU subgraphs' kernels
    (attention matmuls, norms) reach."""

    cpu_task_overhead_us: float = Field(ge=0.0)
    """Fixed cost of one CPU subgraph (dispatch, small-array work), microseconds."""

    shadow_task_us: float = Field(ge=0.0)
    """Fixed cost of one shadow-outlier correction (find the outliers, gather their weight rows,
    scatter the product), microseconds, on top of its operations."""

    memory_bandwidth_efficiency: float = Field(gt=0.0, le=1.0)
    """Share of `memory_bandwidth_gbps` a streaming read reaches (what decode is bound by)."""

    decode_token_overhead_us: float = Field(ge=0.0)
    """Fixed cost of one decode step (graph launch, sampling, bookkeeping), microseconds."""

    decode_us_per_context_token: float = Field(0.0, ge=0.0)
    """Extra decode-step time per token already in the KV cache beyond reading it at the
    memory bandwidth (attention's own arithmetic), microseconds."""

    decode_gbps: float | None = Field(None, gt=0.0)
    """Sustained rate at which one decode step streams its weights, GB/s, when known directly
    (a measurement); else `memory_bandwidth_gbps` x `memory_bandwidth_efficiency`."""

    app_memory_fraction: float = Field(gt=0.0, le=1.0)
    """Share of `ram_bytes` one app may hold before the OS kills it or swaps."""

    sources: dict[str, str] = Field(min_length=1)
    """Field name -> where its figure comes from. Every figure set here has one."""

    @model_validator(mode="after")
    def _every_figure_has_a_source(self) -> CostModel:
        fields = type(self).model_fields
        missing = [
            name
            for name, info in fields.items()
            if name != "sources" and name not in self.sources and getattr(self, name) != info.default
        ]  # a figure left at its default (none, 0) needs no source
        unknown = [k for k in self.sources if k not in fields]
        if missing:
            raise ValueError(f"no source given for {', '.join(missing)} (add it to [cost.sources])")
        if unknown:
            raise ValueError(f"sources name unknown figures: {', '.join(unknown)}")
        return self


class Capabilities(_Strict):
    """Everything the resolver and planner may assume about one target device."""

    schema_version: int = Field(1, ge=1, le=1)
    """Version of this data layout."""

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    """Catalog id used as profile `device.target`, e.g. `sd8gen3`."""

    name: str = Field(min_length=1)
    """Human-readable name, e.g. `Snapdragon 8 Gen 3 (SM8650)`."""

    kind: DeviceKind
    """Form factor: `phone`, `laptop`, `iot` board, or `host` (this machine)."""

    nominal: bool
    """True when the figures are public nominal specs, not measured here. `host` is false:
    its probe values are measured (a few derived figures say so in their own docs)."""

    source_note: str = Field(min_length=1)
    """Where the figures come from and how certain they are."""

    npu: NpuCaps | None = None
    """The processor that runs INT8 NPU graphs; none if the device has none."""

    ram_bytes: int = Field(ge=0)
    """Main memory in bytes (phones: a typical shipping configuration)."""

    cpu_clusters: list[CpuCluster] = Field(min_length=1)
    """CPU cores, grouped by cluster."""

    memory_bandwidth_gbps: float | None = Field(None, gt=0.0)
    """Peak DRAM bandwidth in GB/s (transfer rate x bus width); none when unknown."""

    backends: list[NpuBackendName] = Field(default_factory=list)
    """NPU backends (profile `device.npu_backend`) that make sense here; `none`
    (everything in float on the CPU) is always possible and not listed."""

    auto_backend: NpuBackendName | None = None
    """What `device.npu_backend = "auto"` selects on this device."""

    probe: HostProbe | None = None
    """Probe results; only for `host`."""

    cost: CostModel | None = None
    """How `estimate` prices plans on this device; none where no cost model is catalogued."""

    @property
    def cpu_cores(self) -> int:
        """Total CPU cores over all clusters."""
        return sum(c.cores for c in self.cpu_clusters)

    @property
    def cpu_gflops(self) -> float:
        """Nominal peak float32 GFLOP/s of all cores together."""
        return sum(c.cores * c.gflops_per_core for c in self.cpu_clusters)

    def chunk_size_allowed(self, n: int) -> bool:
        """True when a prefill chunk of `n` tokens is allowed on this device's NPU."""
        return self.npu is not None and self.npu.allowed_chunk_sizes.allows(n)

    def chunk_size_rule(self) -> str:
        """The allowed chunk sizes in words (for error messages)."""
        if self.npu is None:
            return "none (this device has no NPU)"
        return self.npu.allowed_chunk_sizes.describe()

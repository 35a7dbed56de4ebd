"""A bundle's lockfile (`bundle.json`): what the bundle was built for, with, and what it holds.

Written by `compile.bundle.write_bundle`, checked by `compile.bundle_check.open_bundle`; strict
pydantic models, unknown fields refused (docs/deploy.md has the table of fields).
"""

from __future__ import annotations

from datetime import datetime
from importlib import import_module, metadata
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mllm_deploy import __version__
from mllm_deploy.backends.registry import NpuBackendName
from mllm_deploy.compile.bundle_latency import BundleLatencies

BUNDLE_FORMAT = 3
"""Version of the bundle layout and lockfile. 1: bundle.json was a BundleInfo (no decode graphs,
no checksums). 2: this lockfile. 3: decode graphs with their weights in `<graph>.onnx.data`, the
embedding read from the head's (`compile.bundle_weights`). An mllm-deploy refuses any other version."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class BundleFile(_Model):
    """One file of the bundle as it was written."""

    size: int = Field(ge=0)
    """Bytes."""
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """Hex sha256 of the contents."""


class BundleAccuracy(_Model):
    """Perplexity of the bundle's path against the float32 model, measured at build."""

    ppl_ratio: float = Field(gt=0)
    """`path_ppl / float_ppl`."""
    float_ppl: float = Field(gt=0)
    """Perplexity of the float32 model on the held-out text."""
    path_ppl: float = Field(gt=0)
    """Perplexity of the bundle's own path (its graphs, shadow rows, KV cache) on the same text."""
    tokens: int = Field(ge=1)
    """Tokens scored."""
    text: str = Field(min_length=1)
    """Name of the held-out text."""
    max_ppl_ratio: float = Field(gt=0)
    """The limit the build checked `ppl_ratio` against (`[accuracy] max_ppl_ratio`)."""
    measured_on: str = Field(min_length=1)
    """What ran the bundle's graphs for `path_ppl`, e.g. `ort-cpu emulation (VNNI INT8)`, or for a
    qnn-htp bundle built on x86 `ort-cpu emulation of the qnn-htp QDQ graphs (VNNI INT8)`: the
    same graphs its context binaries were compiled from, on the CPU provider, not the HTP itself."""
    chunk_size: int = Field(ge=1)
    """Tokens per prefill chunk of both runs (the bundle's `chunk_size`)."""
    seconds: float = Field(ge=0)
    """Wall time of the measurement (both runs) at build."""
    forced: bool = False
    """True when `ppl_ratio` was over `max_ppl_ratio` and `build --force-accuracy` wrote the bundle anyway."""


class BundleVersions(_Model):
    """Library versions the bundle was built with (or, from `installed_versions`, that this machine has)."""

    mllm_deploy: str
    """mllm-deploy."""
    onnx: str | None
    """onnx (builds the graphs; not needed to run them). None: not installed."""
    onnxruntime: str | None
    """onnxruntime, which runs every graph. None: not installed."""
    onnxruntime_qnn: str | None
    """onnxruntime-qnn, the QNN execution provider (and the QNN SDK it ships). None: not installed."""
    qnn_sdk: str | None
    """QNN SDK (QAIRT) version inside onnxruntime-qnn, as the package reports it. None: unknown
    (the package is absent or does not say)."""


class KvLayout(_Model):
    """The KV cache the bundle's decode graphs and attention are built for."""

    storage: Literal["int8", "float32"]
    """`decode.kv_cache`: int8 with per-channel steps from calibration, or float32."""
    layers: int = Field(ge=1)
    """Layers, each with one K and one V cache."""
    kv_heads: int = Field(ge=1)
    """K/V heads per layer."""
    head_dim: int = Field(ge=1)
    """Values per head and position."""
    max_context: int = Field(ge=1)
    """`prefill.max_context` at build (positions per conversation; a runtime key, so it may be
    changed with --set when the bundle is run)."""


class BundleModel(_Model):
    """The model inside the bundle."""

    source: str
    """`model.source` of the bundle's profile: the path inside the bundle."""
    identity: str
    """sha256 of the model's content (`compile.artifacts.model_identity`): `sha256:<hex>` of a GGUF
    file, `sha256-dir:<hex>` over a Hugging Face directory's files."""
    name: str
    """The model's own name (its metadata)."""
    architecture: str
    """`llama`, `qwen2`, ..."""
    format: Literal["gguf", "hf"]
    """A GGUF file or a Hugging Face directory."""
    trimmed: bool = False
    """True: the GGUF without its blocks' linear weights (`model.gguf_trim`: the graphs hold them;
    every other tensor's bytes and every metadata key unchanged), so `identity` is the original
    model's, not this file's (whose sha256 is in `files`)."""


class BundleLock(_Model):
    """The lockfile of a bundle (`bundle.json`): what it was built for, with, and what it holds."""

    format_version: int
    """Version of the bundle layout (`BUNDLE_FORMAT`); another version is refused."""
    created: datetime
    """When the bundle was written (UTC)."""
    profile_name: str
    """The profile's `name`."""
    target: str
    """`device.target` the bundle was built for (a catalog id, or `host`)."""
    backend: NpuBackendName
    """What runs the NPU graphs."""
    backend_label: str
    """The backend as the build machine ran it (e.g. `ort-cpu emulation (VNNI INT8)`)."""
    htp_arch: int | None
    """Hexagon HTP architecture the context binaries are compiled for (qnn-htp), else None."""
    soc_model: int | None
    """QNN SoC id the context binaries are compiled for (qnn-htp), else None."""
    chunk_size: int = Field(ge=1)
    """Static chunk of every NPU graph (`prefill.chunk_size`)."""
    decode_weight_block: int = Field(ge=1)
    """Values per block of the decode graphs' weights (`decode.weight_block`)."""
    decode_weight_bits: int = 8
    """Bits per weight of the decode graphs (`decode.weight_bits`)."""
    kv_cache: KvLayout
    """The KV cache layout."""
    model: BundleModel
    """The model inside the bundle."""
    versions: BundleVersions
    """Libraries the bundle was built with."""
    artifact_format: str
    """Format of the artifacts (`compile.artifacts.ARTIFACT_FORMAT`) this mllm-deploy must read."""
    decode_format: int
    """Format of the decode graphs (`compile.decode_cache.FORMAT_VERSION`) this mllm-deploy must read."""
    accuracy: BundleAccuracy | None = None
    """Perplexity against float measured at build; None: not measured."""
    latencies: BundleLatencies | None = None
    """Where the scheduler's per-graph latencies (`artifacts/latencies.json`) come from: profiled
    at build on the target's kind of machine, or the device cost model (never a simulator's
    timings); None: a bundle written before this was recorded."""
    files: dict[str, BundleFile]
    """Every file of the bundle but this one, by path relative to the bundle (POSIX)."""


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def installed_versions() -> BundleVersions:
    """The versions this machine has (read from package metadata: nothing heavy is imported)."""
    qnn = _version("onnxruntime-qnn")
    sdk = None
    if qnn is not None:
        try:  # the optional QNN plugin's small Python package; reports the QNN SDK it ships
            info = getattr(import_module("onnxruntime_qnn"), "build_and_package_info", None)
            sdk = getattr(info, "qnn_version", None)
        except Exception:  # a broken plugin: the SDK version stays unknown
            sdk = None
    return BundleVersions(
        mllm_deploy=__version__,
        onnx=_version("onnx"),
        onnxruntime=_version("onnxruntime"),
        onnxruntime_qnn=qnn,
        qnn_sdk=sdk if isinstance(sdk, str) else None,
    )

"""The artifact cache: compiled NPU graphs, shadow weight rows and calibration, keyed and locked.

    cache_dir()/artifacts/<key>/
        lock.json             Lockfile: model identity, chunk size, target SoC, backend, versions
        calibration.json      CalibrationResult (clamps, importance, shadowed layers, hot channels)
        latencies.json        per-graph latency profiled at build, ms
        kernels.json          which onnxruntime kernels run (integer_kernel_report of layer 0)
        graphs/layer{i}_{kind}.onnx           static-shape QDQ graphs (audited)
        contexts/layer{i}_{kind}.ctx.onnx     QNN context binaries (qnn-htp targets)
        shadow/layer{i}_{kind}.*              shadowed inputs' rows: hot channels' float32 rows, every
                                              other row in the model's own blocks (compile/shadow_store.py)
        manifest.json         every file's size and sha256, written last

The key hashes everything that changes the files: the model file's identity, every profile
field that affects graphs, the backend and target, and library versions. An entry is built in
a temporary sibling directory and renamed into place, so an interrupted build leaves no entry.
`open_entry` refuses (with the reason) an entry whose lockfile disagrees with the profile or
whose files are missing or fail their checksum; the caller then rebuilds it, never reuses it.
`cache_dir()/calibration/<key>.json` caches the policy-independent ActivationStats.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mllm_deploy import __version__
from mllm_deploy.backends.registry import NpuBackendName, backend_support
from mllm_deploy.compile import calibration_text
from mllm_deploy.compile.calibration import ActivationStats, CalibrationResult
from mllm_deploy.model.spec import ModelSpec
from mllm_deploy.paths import atomic_write_text, cache_dir, sha256_file

if TYPE_CHECKING:  # types only: audit loads onnx and onnxruntime, which reading an entry does not need
    from mllm_deploy.compile.audit import KernelReport
    from mllm_deploy.resolve import Resolved

LOCK, MANIFEST, CALIBRATION, LATENCIES, KERNELS = (
    "lock.json",
    "manifest.json",
    "calibration.json",
    "latencies.json",
    "kernels.json",
)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class Lockfile(_Model):
    """What an artifact entry was built from; any difference from the current profile means rebuild."""

    schema_version: Literal[1] = 1
    """Version of this file's layout."""
    model_source: str
    """`model.source` as given in the profile (informative: the identity below is what counts,
    so a bundle's copy of the model matches)."""
    model_identity: str
    """sha256 of the model file when known (builtin registry), else path:size:mtime_ns."""
    chunk_size: int = Field(ge=1)
    """Static batch dimension of every graph."""
    backend: NpuBackendName
    """What runs the graphs."""
    target: str
    """`device.target`."""
    htp_arch: int | None
    """QNN HTP generation the context binaries are prepared for (qnn-htp targets)."""
    soc_model: int | None
    """QNN SoC id (qnn-htp targets)."""
    settings: dict[str, str | int | float]
    """Every other profile field that affects the graphs (quantization.*, outliers.*, calibration.*)."""
    versions: dict[str, str]
    """onnx, onnxruntime, onnxruntime-qnn and mllm-deploy versions."""


class Manifest(_Model):
    """Files of an entry with their sizes and checksums; written last."""

    files: dict[str, tuple[int, str]]
    """Relative path -> (bytes, sha256)."""
    build_seconds: float = Field(ge=0)
    """Wall time of the build that wrote this entry."""
    profiled_npu_threads: int = Field(ge=0)
    """onnxruntime threads the latencies were measured with (0: not ort-cpu)."""


ARTIFACT_FORMAT = "4"
"""Bump whenever what `build` produces changes for the same inputs (graph layout, calibration
rules), so entries built by an older rule are recompiled instead of silently reused.
2: shadow pruning per linear input, pruned inputs on max-abs grids.
3: shadow rows as hot float32 rows + cold rows in the model's blocks (`compile.shadow_store`).
4: every layer's gate_up split (SiLU·mul on the CPU) for an HTP arch without float math (v68)."""


DECODE_FORMAT = 8
"""Format of the decode graphs' directory (`compile.decode_cache`); bump when what it holds changes.
5: the manifest records the block. 6: ... and the bits (`decode.weight_bits`). 7: 4-bit blocks
carry float offsets, not zero points. 8: each graph's linear weights in `<graph>.onnx.data` (listed
in the manifest's `weights`), the head in blocks of 32. (Here, not in decode_cache, so reading it
does not import onnx.)"""


def library_versions() -> dict[str, str]:
    out = {"mllm-deploy": __version__, "artifact-format": ARTIFACT_FORMAT}
    for dist in ("onnx", "onnxruntime", "onnxruntime-qnn"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


_IDENTITY_MEMO: dict[tuple[tuple[str, int, int], ...], str] = {}  # (path, size, mtime_ns) of every file


def model_identity(spec: ModelSpec) -> str:
    """sha256 of the model's content (the registry's verified hash for builtins; for a directory,
    of every file's name and hash), so a copied model (a bundle) keeps its identity."""
    if spec.file_sha256:
        return f"sha256:{spec.file_sha256}"
    if spec.format == "card":  # an architecture card has no files: nothing is ever built from it
        return spec.source
    path = Path(spec.path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    memo_key = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if memo_key not in _IDENTITY_MEMO:
        if path.is_dir():
            text = "\n".join(f"{p.relative_to(path).as_posix()}:{sha256_file(p)}" for p in files)
            _IDENTITY_MEMO[memo_key] = "sha256-dir:" + hashlib.sha256(text.encode()).hexdigest()
        else:
            _IDENTITY_MEMO[memo_key] = f"sha256:{sha256_file(path)}"
    return _IDENTITY_MEMO[memo_key]


def expected_lock(resolved: Resolved) -> Lockfile:
    """The lockfile an entry for `resolved` must carry."""
    p = resolved.profile
    npu = resolved.caps.npu
    qnn = backend_support(resolved.backend).context_binaries
    return Lockfile(
        model_source=p.model.source,
        model_identity=model_identity(resolved.spec),
        chunk_size=p.prefill.chunk_size,
        backend=resolved.backend,
        target=resolved.caps.id,
        htp_arch=npu.htp_arch_number if qnn and npu is not None else None,  # set: resolve refuses qnn-htp without
        soc_model=npu.qnn_soc_model if qnn and npu is not None else None,
        settings=graph_settings(resolved),
        versions=library_versions(),
    )


def graph_settings(resolved: Resolved) -> dict[str, str | int | float]:
    """The lockfile's `settings`: every other profile field that affects the graphs."""
    p = resolved.profile
    return {
        "quantization.weights": p.quantization.weights,
        "quantization.activations": p.quantization.activations,
        "outliers.policy": p.outliers.policy,
        "outliers.scale_percentile": p.outliers.scale_percentile,
        "outliers.hot_channel_fraction": p.outliers.hot_channel_fraction,
        "outliers.prune_fraction": p.outliers.prune_fraction,
        "calibration.source": _calibration_source_identity(p.calibration.source, resolved.loaded.base_dir),
        "calibration.samples": p.calibration.samples,
        "calibration.tokens_per_sample": p.calibration.tokens_per_sample,
    }


def _calibration_source_identity(source: str, base_dir: Path | None) -> str:
    """`self` with the generator's version (new generator code rebuilds samples, statistics and
    artifacts), or the matched files with size and mtime, so edited calibration text rebuilds."""
    if source == "self":
        return f"self:generation-{calibration_text.GENERATION_VERSION}"  # read now: tests patch the module

    pattern = Path(source).expanduser()
    if not pattern.is_absolute() and base_dir is not None:
        pattern = Path(base_dir) / pattern
    files = sorted(glob.glob(str(pattern)))
    return (
        source
        + ":"
        + hashlib.sha256(
            "\n".join(f"{f}:{os.stat(f).st_size}:{os.stat(f).st_mtime_ns}" for f in files).encode()
        ).hexdigest()[:16]
    )


_INFORMATIVE = {"model_source"}


def entry_key(lock: Lockfile) -> str:
    return hashlib.sha256(lock.model_dump_json(exclude=_INFORMATIVE).encode()).hexdigest()[:24]


def stats_key(lock: Lockfile) -> str:
    """Calibration statistics depend on the model, the data and the percentile only."""
    s = lock.settings
    parts = [
        lock.model_identity,
        s["calibration.source"],
        s["calibration.samples"],
        s["calibration.tokens_per_sample"],
        s["outliers.scale_percentile"],
        lock.versions["mllm-deploy"],
    ]
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:24]


def artifacts_root() -> Path:
    root = cache_dir() / "artifacts"
    root.mkdir(parents=True, exist_ok=True)
    return root


class EntryProblem(Exception):
    """Why an artifact entry cannot be used (the message is shown before recompiling)."""


class Artifacts:
    """A verified artifact entry (read-only)."""

    def __init__(self, root: Path, lock: Lockfile, manifest: Manifest):
        self.root, self.lock, self.manifest = Path(root), lock, manifest
        self.calibration = CalibrationResult.model_validate_json((self.root / CALIBRATION).read_text())
        self.latencies_ms: dict[str, float] = json.loads((self.root / LATENCIES).read_text())
        self.kernels: dict[str, KernelReport] = json.loads((self.root / KERNELS).read_text())

    def graph_path(self, layer: int, kind: str) -> Path:
        return self.root / "graphs" / f"layer{layer}_{kind}.onnx"

    def context_path(self, layer: int, kind: str) -> Path:
        return self.root / "contexts" / f"layer{layer}_{kind}.ctx.onnx"


def open_entry(root: Path, expected: Lockfile | None, *, verify_checksums: bool = True) -> Artifacts:
    """The entry at `root`, verified against `expected` (None: any lock); EntryProblem if unusable."""
    root = Path(root)
    if not root.is_dir():
        raise EntryProblem("no compiled artifacts yet")
    try:
        lock = Lockfile.model_validate_json((root / LOCK).read_text())
        manifest = Manifest.model_validate_json((root / MANIFEST).read_text())
    except FileNotFoundError as exc:
        raise EntryProblem(f"incomplete entry: {Path(exc.filename).name} is missing") from None
    except (ValidationError, ValueError, OSError) as exc:
        raise EntryProblem(f"unreadable lockfile or manifest: {str(exc).splitlines()[0]}") from None
    if expected is not None and lock.model_dump(exclude=_INFORMATIVE) != expected.model_dump(exclude=_INFORMATIVE):
        mine, want = lock.model_dump(exclude=_INFORMATIVE), expected.model_dump(exclude=_INFORMATIVE)
        diffs = [f"{k}: {mine[k]!r} != {want[k]!r}" for k in want if mine.get(k) != want[k]]
        raise EntryProblem("lockfile does not match the profile (" + "; ".join(diffs)[:400] + ")")
    for rel, (size, digest) in manifest.files.items():
        path = root / rel
        if not path.is_file():
            raise EntryProblem(f"{rel} is missing")
        if path.stat().st_size != size:
            raise EntryProblem(f"{rel} has {path.stat().st_size} bytes, the manifest says {size}")
        if verify_checksums and sha256_file(path) != digest:
            raise EntryProblem(f"{rel} fails its sha256 checksum")
    try:
        return Artifacts(root, lock, manifest)
    except (ValidationError, ValueError, OSError) as exc:
        raise EntryProblem(f"unreadable calibration or latencies: {str(exc).splitlines()[0]}") from None


def write_manifest(tmp: Path, build_seconds: float, npu_threads: int) -> None:
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        rel = path.relative_to(tmp).as_posix()
        if rel != MANIFEST:
            files[rel] = (path.stat().st_size, sha256_file(path))
    manifest = Manifest(files=files, build_seconds=build_seconds, profiled_npu_threads=npu_threads)
    atomic_write_text(tmp / MANIFEST, manifest.model_dump_json(indent=1))


def commit_entry(tmp: Path, final: Path) -> None:
    """Move a finished temporary entry into place, replacing an old (rejected) one."""
    if final.exists():
        trash = final.with_name(f".{final.name}.old.{os.getpid()}")
        os.rename(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(tmp, final)


def load_stats(key: str) -> ActivationStats | None:
    path = cache_dir() / "calibration" / f"{key}.json"
    try:
        return ActivationStats.model_validate_json(path.read_text())
    except (OSError, ValidationError, ValueError):
        return None


def store_stats(key: str, stats: ActivationStats) -> None:
    atomic_write_text(cache_dir() / "calibration" / f"{key}.json", stats.model_dump_json())

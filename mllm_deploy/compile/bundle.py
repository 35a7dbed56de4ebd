"""Self-contained deployment bundles: `build PROFILE --out DIR`, then `run DIR` / `up DIR` anywhere.

    DIR/bundle.json        the lockfile (BundleLock): format, target, backend, versions, chunk size,
                           KV layout, model identity, accuracy, and the size and sha256 of every file
    DIR/profile.toml       the keys the user set (file and --set), model.source pointing inside DIR
    DIR/model/<file>       the model: a GGUF trimmed to what a run reads (tokenizer, chat template,
                           embedding, norms; the graphs hold the linears) or an HF directory
    DIR/model/templates/   a chat template file the profile names, if any
    DIR/artifacts/         the verified artifact entry: graphs, QNN context binaries, shadow rows,
                           calibration, latencies (see compile/artifacts.py)
    DIR/decode/            the CPU decode graphs: `head` and the step graph of the bundle's KV cache

Everything a run needs is inside: a run from DIR never calibrates, compiles or builds decode
graphs, and reads the float weights it uses from the bundled model as it needs them (nothing is
written to the weight cache). `bundle_check.open_bundle` verifies a bundle before it is used.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from datetime import UTC, datetime
from importlib import import_module, metadata
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mllm_deploy import __version__
from mllm_deploy.backends.registry import NpuBackendName, backend_support
from mllm_deploy.compile.artifacts import (
    ARTIFACT_FORMAT,
    DECODE_FORMAT,
    LATENCIES,
    LOCK,
    MANIFEST,
    Artifacts,
    model_identity,
)
from mllm_deploy.compile.bundle_latency import BundleLatencies, bundle_latencies
from mllm_deploy.compile.bundle_profile import bundle_profile_toml
from mllm_deploy.compile.decode_weights import data_file
from mllm_deploy.errors import user_error
from mllm_deploy.model.gguf_trim import write_trimmed_gguf
from mllm_deploy.model.spec import ModelSpec
from mllm_deploy.paths import atomic_write_text, make_build_dir, sha256_file
from mllm_deploy.resolve import Resolved

BUNDLE_INFO = "bundle.json"  # the lockfile; its presence makes a directory a bundle
BUNDLE_PROFILE = "profile.toml"
MODEL_DIR, TEMPLATES_DIR, ARTIFACTS_DIR, DECODE_DIR = "model", "model/templates", "artifacts", "decode"
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


def is_bundle(path: str | Path) -> bool:
    """True when `path` is a bundle directory (it holds a lockfile)."""
    return Path(path).is_dir() and (Path(path) / BUNDLE_INFO).is_file()


def bundle_profile_path(path: str | Path) -> Path:
    """The profile file to load for a PROFILE argument: DIR/profile.toml for a bundle, else `path`."""
    return Path(path) / BUNDLE_PROFILE if is_bundle(path) else Path(path)


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


def decode_graph_names(kv_cache: str) -> tuple[str, ...]:
    """The decode graphs a bundle ships: the output head and the step graph of its KV cache."""
    return ("head", "step_kv8" if kv_cache == "int8" else "step")


def write_bundle(
    resolved: Resolved,
    artifacts: Artifacts,
    out_dir: Path,
    *,
    decode_graphs: Path,
    accuracy: BundleAccuracy | None = None,
) -> Path:
    """Copy model, profile, artifacts and decode graphs into `out_dir` with a lockfile listing every
    file's size and sha256. Built in a temporary sibling directory and renamed into place (an
    earlier bundle there is replaced), so a killed build leaves no half bundle."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not is_bundle(out_dir) and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise user_error("--out must be a new or empty directory (or an earlier bundle)", file=str(out_dir))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    profile, spec = resolved.profile, resolved.spec
    tmp = make_build_dir(out_dir.parent, out_dir.name)
    try:
        model = Path(spec.path)
        identity = model_identity(spec)
        (tmp / DECODE_DIR).mkdir()
        shutil.copy2(Path(decode_graphs) / "manifest.json", tmp / DECODE_DIR / "manifest.json")
        for name in decode_graph_names(profile.decode.kv_cache):  # each graph and its weights' data file
            for file in (f"{name}.onnx", data_file(name)):
                shutil.copy2(Path(decode_graphs) / file, tmp / DECODE_DIR / file)
        (tmp / MODEL_DIR).mkdir()
        if model.is_dir():
            shutil.copytree(model, tmp / MODEL_DIR / model.name)
        else:  # what a run reads of it: embedding, norms, tokenizer, template (the graphs hold the linears)
            _write_bundle_gguf(spec, model, tmp / MODEL_DIR / model.name, identity, tmp / DECODE_DIR)
        source = f"{MODEL_DIR}/{model.name}"
        template = _copy_chat_template(profile.model.chat_template, resolved.loaded.base_dir, tmp)
        latencies, latency_source = bundle_latencies(resolved, artifacts.latencies_ms)
        _copy_artifacts(artifacts, tmp / ARTIFACTS_DIR, latencies)
        _share_cold_rows(tmp, profile.decode.kv_cache)
        text = bundle_profile_toml(resolved.loaded, backend=resolved.backend, model_source=source,
                                   chat_template=template)  # fmt: skip
        atomic_write_text(tmp / BUNDLE_PROFILE, text)
        lock = BundleLock(
            format_version=BUNDLE_FORMAT,
            created=datetime.now(UTC).replace(microsecond=0),
            profile_name=profile.name,
            target=artifacts.lock.target,
            backend=artifacts.lock.backend,
            backend_label=resolved.backend_label,
            htp_arch=artifacts.lock.htp_arch,
            soc_model=artifacts.lock.soc_model,
            chunk_size=artifacts.lock.chunk_size,
            decode_weight_block=profile.decode.weight_block,
            decode_weight_bits=profile.decode.weight_bits,
            kv_cache=KvLayout(
                storage=profile.decode.kv_cache,
                layers=spec.n_layers,
                kv_heads=spec.n_kv_heads,
                head_dim=spec.head_dim,
                max_context=profile.prefill.max_context,
            ),
            model=BundleModel(
                source=source,
                identity=identity,
                name=spec.name,
                architecture=spec.architecture,
                format=spec.format,
                trimmed=spec.format == "gguf",
            ),
            versions=installed_versions(),
            artifact_format=ARTIFACT_FORMAT,
            decode_format=DECODE_FORMAT,
            accuracy=accuracy,
            latencies=latency_source,
            files=_file_table(tmp),
        )
        atomic_write_text(tmp / BUNDLE_INFO, lock.model_dump_json(indent=1))
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write_bundle_gguf(spec: ModelSpec, model: Path, dest: Path, identity: str, decode_dir: Path) -> None:
    """The trimmed GGUF (`model.gguf_trim`), without the embedding too when the bundle's decode head
    holds every row of it exactly (`compile.bundle_weights`; else rewritten with it)."""
    # deferred: it reads GGUF files (gguf), which opening or checking a bundle never needs
    from mllm_deploy.compile.bundle_weights import head_embedding_is_exact, head_embedding_ref  # noqa: PLC0415

    in_head = head_embedding_ref(spec, decode_dir, f"../{DECODE_DIR}")
    write_trimmed_gguf(model, dest, identity, in_head)
    if in_head is not None and not head_embedding_is_exact(model, dest):
        write_trimmed_gguf(model, dest, identity)


def _share_cold_rows(tmp: Path, kv_cache: str) -> None:
    """Cold shadow rows read from the 4-bit step graph where it holds them exactly (`compile.bundle_weights`)."""
    from mllm_deploy.compile.bundle_weights import share_cold_rows  # noqa: PLC0415 - deferred: see _write_bundle_gguf

    step = decode_graph_names(kv_cache)[1]
    share_cold_rows(tmp / ARTIFACTS_DIR, tmp / DECODE_DIR, step, f"../../{DECODE_DIR}")


def shipped_artifact(rel: str, backend: str) -> bool:
    """Whether the artifact file at `rel` (relative to the entry) goes into a bundle for `backend`:
    everything its run loads. A backend that runs QNN context binaries never loads the QDQ graphs
    they were compiled from (`graphs/`, ~107 MB for the default model), so they stay in the build
    machine's cache (where `verify` runs them on the CPU provider)."""
    return not (backend_support(backend).context_binaries and rel.startswith("graphs/"))


def _copy_artifacts(artifacts: Artifacts, dest: Path, latencies: dict[str, float]) -> None:
    """Copy the artifact entry's files a run of its backend loads (`shipped_artifact`), its
    latencies replaced by `latencies`, with a manifest listing exactly those (so the bundle's entry
    verifies as a whole)."""
    manifest = artifacts.manifest
    files = {rel: entry for rel, entry in manifest.files.items() if shipped_artifact(rel, artifacts.lock.backend)}
    for rel in sorted({*files, LOCK}):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(artifacts.root / rel, dest / rel)
    if latencies != artifacts.latencies_ms:
        atomic_write_text(dest / LATENCIES, json.dumps(latencies, indent=1))
        files[LATENCIES] = ((dest / LATENCIES).stat().st_size, sha256_file(dest / LATENCIES))
    shipped = manifest.model_copy(update={"files": files})
    atomic_write_text(dest / MANIFEST, shipped.model_dump_json(indent=1))


def _copy_chat_template(template: str, base_dir: Path, tmp: Path) -> str | None:
    """Copy a chat template file the profile names into the bundle; its path inside it (None: `auto`)."""
    if template == "auto":
        return None
    path = Path(template).expanduser()
    path = path if path.is_absolute() else Path(base_dir) / path
    (tmp / TEMPLATES_DIR).mkdir(parents=True, exist_ok=True)
    shutil.copy2(path, tmp / TEMPLATES_DIR / path.name)
    return f"{TEMPLATES_DIR}/{path.name}"


def _file_table(root: Path) -> dict[str, BundleFile]:
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel != BUNDLE_INFO:
            files[rel] = BundleFile(size=path.stat().st_size, sha256=sha256_file(path))
    return files


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename the finished `tmp` to `final`, replacing an earlier bundle there (moved aside under a
    name `paths.remove_orphaned_build_dirs` removes if this process is killed before it does)."""
    if final.exists():
        trash = final.with_name(f".{final.name}.pid{os.getpid()}.replaced")
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)


BUNDLE_PARTS = ("model", "graphs", "context binaries", "decode graphs", "shadow rows", "other")


def bundle_part(rel: str) -> str:
    """Which part of a bundle the file at `rel` belongs to (one of BUNDLE_PARTS)."""
    if rel.startswith(f"{MODEL_DIR}/"):
        return "model"
    prefixes = {f"{ARTIFACTS_DIR}/graphs/": "graphs", f"{ARTIFACTS_DIR}/contexts/": "context binaries",
                f"{ARTIFACTS_DIR}/shadow/": "shadow rows", f"{DECODE_DIR}/": "decode graphs"}  # fmt: skip
    for prefix, part in prefixes.items():
        if rel.startswith(prefix) and (part == "shadow rows" or not rel.endswith(".json")):
            return part
    return "other"  # the profile, calibration, latencies, manifests (a shadow index counts as shadow rows)


def bundle_sizes(lock: BundleLock) -> dict[str, tuple[int, int]]:
    """Part -> (files, bytes), every part of BUNDLE_PARTS in order."""
    sizes = dict.fromkeys(BUNDLE_PARTS, (0, 0))
    for rel, entry in lock.files.items():
        files, size = sizes[bundle_part(rel)]
        sizes[bundle_part(rel)] = (files + 1, size + entry.size)
    return sizes


def render_bundle_contents(lock: BundleLock) -> str:
    """What went into a bundle, per part, with sizes (what `build --out` prints)."""
    sizes = bundle_sizes(lock)
    lines = [f"  {part:<17}{files:>5} files {size / 1e6:>9.1f} MB" for part, (files, size) in sizes.items()]
    total = sum(size for _, size in sizes.values())
    lines.append(f"  {'total':<17}{len(lock.files):>5} files {total / 1e6:>9.1f} MB (+ the lockfile)")
    return "\n".join(lines)


def write_archive(bundle: Path) -> Path:
    """`bundle` as one uncompressed tar next to it (`DIR.tar`; unpack with `tar xf DIR.tar`, which
    recreates DIR), written to a temporary file and renamed into place."""
    bundle = Path(bundle)
    final = bundle.with_name(bundle.name + ".tar")
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.pid{os.getpid()}.", suffix=".tmp", dir=bundle.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            with tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tar:
                tar.add(bundle, arcname=bundle.name)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return final

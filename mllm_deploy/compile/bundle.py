"""Self-contained deployment bundles: `build PROFILE --out DIR`, then `run DIR` / `up DIR` anywhere.

    DIR/bundle.json        the lockfile (`compile.bundle_lock.BundleLock`): format, target, backend, versions, chunk size,
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
from pathlib import Path

from mllm_deploy.backends.registry import backend_support
from mllm_deploy.compile.artifacts import (
    ARTIFACT_FORMAT,
    DECODE_FORMAT,
    LATENCIES,
    LOCK,
    MANIFEST,
    Artifacts,
    model_identity,
)
from mllm_deploy.compile.bundle_latency import bundle_latencies
from mllm_deploy.compile.bundle_lock import (
    BUNDLE_FORMAT,
    BundleAccuracy,
    BundleFile,
    BundleLock,
    BundleModel,
    KvLayout,
    installed_versions,
)
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


def is_bundle(path: str | Path) -> bool:
    """True when `path` is a bundle directory (it holds a lockfile)."""
    return Path(path).is_dir() and (Path(path) / BUNDLE_INFO).is_file()


def bundle_profile_path(path: str | Path) -> Path:
    """The profile file to load for a PROFILE argument: DIR/profile.toml for a bundle, else `path`."""
    return Path(path) / BUNDLE_PROFILE if is_bundle(path) else Path(path)


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

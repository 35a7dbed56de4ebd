"""Opening a bundle: refuse it, before anything is loaded or written, unless it is whole, of a
format this mllm-deploy reads, and runnable on this machine.

    bundle = open_bundle("dist/smollm2")   # OpenedBundle, or UserError (exit 2 or 3)

Checked, in this order (each refusal is one diagnostic naming the bundle, the file or lockfile
field, what was expected and what was found; docs/deploy.md lists them):

1. the lockfile parses (else exit 2) and has format version `BUNDLE_FORMAT` (else exit 3);
2. every file it lists is there with its size, and its sha256 (exit 3; `compile.bundle_files`:
   a file's verified hash is remembered, `rehash=True` hashes everything again);
3. the artifact and decode-graph formats are this version's (exit 3);
4. library versions (`check_bundle_versions`): QNN context binaries need the onnxruntime and
   onnxruntime-qnn they were compiled with (refused otherwise); plain QDQ graphs on the CPU
   provider run on another onnxruntime with a warning (exit 3 only without onnxruntime);
5. the target (`check_bundle_target`): a qnn-htp bundle needs a Hexagon NPU, or the user's
   opt-in (`--emulate`: its QDQ graphs on the CPU provider, if it ships them; `--simulator`);
6. the lockfile agrees with the artifacts and decode graphs it lists (exit 3).

Before context binaries load (a bundle's or a cache entry's), `compile.context_check` compares
the HTP arch / SoC each records (`ep_compatibility_info`) with the lockfile and with this
machine's Hexagon NPU (exit 3 naming the file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pydantic import ValidationError

from mllm_deploy import __version__
from mllm_deploy.backends.registry import BACKENDS, backend_support
from mllm_deploy.compile.artifacts import (
    ARTIFACT_FORMAT,
    DECODE_FORMAT,
    LOCK,
    MANIFEST,
    Artifacts,
    EntryProblem,
    Lockfile,
    graph_settings,
    open_entry,
)
from mllm_deploy.compile.bundle import ARTIFACTS_DIR, BUNDLE_INFO, DECODE_DIR, decode_graph_names, is_bundle
from mllm_deploy.compile.bundle_files import remember_verified, verify_bundle_files
from mllm_deploy.compile.bundle_lock import BUNDLE_FORMAT, BundleLock, BundleVersions, installed_versions
from mllm_deploy.compile.bundle_refusal import REBUILD, refuse_bundle
from mllm_deploy.compile.decode_weights import data_file
from mllm_deploy.device.host import OptIn
from mllm_deploy.device.models import HostProbe
from mllm_deploy.device.probe import probe_host
from mllm_deploy.errors import Diagnostic, ExitCode, UserError, user_error
from mllm_deploy.resolve import Resolved


@dataclass(frozen=True)
class OpenedBundle:
    """A verified bundle: its directory, its lockfile and the warnings opening it gave."""

    root: Path
    lock: BundleLock
    warnings: tuple[Diagnostic, ...] = ()

    @property
    def artifacts_dir(self) -> Path:
        return self.root / ARTIFACTS_DIR

    @property
    def decode_dir(self) -> Path:
        return self.root / DECODE_DIR


def open_bundle(
    path: str | Path,
    *,
    rehash: bool = False,
    allow_simulator: bool = False,
    host: HostProbe | None = None,
    opt_in: OptIn | None = None,
) -> OpenedBundle:
    """The bundle at `path`, verified (see the module docstring); UserError if it cannot run here.
    `allow_simulator`: accept a qnn-htp bundle on Qualcomm's x86 HTP simulator (for verification).
    `opt_in`: the user's --emulate / --simulator for a qnn-htp bundle on a machine without a
    Hexagon NPU (`check_bundle_target`). `host`: this machine's probe (default: `probe_host()`,
    only asked for a qnn-htp bundle)."""
    root = Path(path).resolve()
    lock = read_lock(root)
    fresh = verify_bundle_files(root, lock, rehash=rehash)
    _check_formats(root, lock)
    warnings = check_bundle_versions(lock, root, installed_versions())
    allow_simulator = allow_simulator or opt_in == "simulator"
    warnings += check_bundle_target(lock, root, host=host, allow_simulator=allow_simulator,
                                    allow_emulation=opt_in == "emulate")  # fmt: skip
    _check_consistent(root, lock)
    remember_verified(fresh)
    return OpenedBundle(root, lock, tuple(warnings))


def read_lock(root: Path) -> BundleLock:
    """The lockfile of the bundle at `root`: it parses (exit 2) and has this format version (exit 3)."""
    file = root / BUNDLE_INFO
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise refuse_bundle(root, f"its lockfile {BUNDLE_INFO} is missing", exit_code=ExitCode.INVALID) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise refuse_bundle(root, f"its lockfile does not parse as JSON: {exc}", exit_code=ExitCode.INVALID) from None
    if not isinstance(data, dict):
        raise refuse_bundle(root, "its lockfile is not a JSON object", exit_code=ExitCode.INVALID)
    version = data.get("format_version")
    if version != BUNDLE_FORMAT:
        found = ("format 1 (written by an older mllm-deploy)" if version is None and "schema_version" in data
                 else f"format {version!r}")  # fmt: skip
        raise refuse_bundle(root, f"this mllm-deploy ({__version__}) reads bundle format {BUNDLE_FORMAT}; the bundle has {found}",
                      key="format_version", value=version, allowed=str(BUNDLE_FORMAT),
                      hint=f"run it with the mllm-deploy that built it, or {REBUILD}")  # fmt: skip
    try:
        lock = BundleLock.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(part) for part in error["loc"])
        raise refuse_bundle(root, f"its lockfile is not valid: {error['msg']}", key=key or None,
                      exit_code=ExitCode.INVALID) from None  # fmt: skip
    for rel in lock.files:
        pure = PurePosixPath(rel)
        if pure.is_absolute() or ".." in pure.parts or rel == BUNDLE_INFO:
            raise refuse_bundle(root, f"its lockfile lists {rel!r}, which is not a file inside the bundle",
                          key="files", exit_code=ExitCode.INVALID)  # fmt: skip
    return lock


def _check_formats(root: Path, lock: BundleLock) -> None:
    from_build = {"artifact_format": (lock.artifact_format, ARTIFACT_FORMAT),
                  "decode_format": (lock.decode_format, DECODE_FORMAT)}  # fmt: skip
    for key, (built, here) in from_build.items():
        if built != here:
            raise refuse_bundle(root, f"its {key.replace('_', ' ')} is {built!r}; this mllm-deploy ({__version__}) reads {here!r}",
                          key=key, value=built, allowed=repr(here),
                          hint=f"run it with the mllm-deploy that built it, or {REBUILD}")  # fmt: skip


def check_bundle_versions(lock: BundleLock, root: Path, here: BundleVersions) -> list[Diagnostic]:
    """Refuse library versions that cannot load the bundle's graphs; warnings for ones that can.

    QNN context binaries are serialized by the QNN SDK inside onnxruntime-qnn and load only with
    the one that compiled them: onnxruntime and onnxruntime-qnn must be the build's. Plain QDQ
    graphs on onnxruntime's CPU provider are standard ONNX: another onnxruntime runs them (a
    warning: its kernels may round differently, so output may differ from the build machine's)."""
    built = lock.versions
    if here.onnxruntime is None:
        raise refuse_bundle(root, f"onnxruntime is not installed; the bundle's graphs need it (built with {built.onnxruntime})",
                      key="versions.onnxruntime", allowed=built.onnxruntime,
                      hint=f"pip install onnxruntime=={built.onnxruntime}")  # fmt: skip
    if backend_support(lock.backend).context_binaries:
        problems = [
            Diagnostic(
                message=f"bundle {root}: its QNN context binaries were compiled with {dist} {want}; this machine "
                f"has {have or 'none'} (a context binary loads only with the QNN SDK that compiled it)",
                file=str(root / BUNDLE_INFO),
                key=f"versions.{key}",
                value=have,
                allowed=want,
                hint=f"pip install onnxruntime=={built.onnxruntime} onnxruntime-qnn=={built.onnxruntime_qnn}, or {REBUILD}",
            )
            for key, dist, want, have in (
                ("onnxruntime", "onnxruntime", built.onnxruntime, here.onnxruntime),
                ("onnxruntime_qnn", "onnxruntime-qnn", built.onnxruntime_qnn, here.onnxruntime_qnn),
            )
            if want != have
        ]
        if problems:
            raise UserError(problems, exit_code=ExitCode.CANNOT_RUN)
        return []
    if built.onnxruntime != here.onnxruntime:
        return [Diagnostic(
            message=f"bundle {root} was built with onnxruntime {built.onnxruntime}; this machine has "
            f"{here.onnxruntime}: its QDQ graphs run on either, but the output may differ from the build machine's",
            file=str(root / BUNDLE_INFO), key="versions.onnxruntime", severity="warning",
        )]  # fmt: skip
    return []


def runnable_here(host: HostProbe) -> str:
    """What this machine can run, in words (for refusals)."""
    can = [f"{name} bundles ({support.summary})" for name, support in BACKENDS.items()
           if not support.needs_htp_arch or host.qnn_htp_mode == "device"]  # fmt: skip
    if host.qnn_htp_mode == "simulator":
        can.append("qnn-htp context binaries on Qualcomm's x86 HTP simulator, for verification only (200-700x slower)")
    return "; ".join(can)


def bundle_has_qdq_graphs(root: Path) -> bool:
    """The bundle at `root` ships QDQ graphs (`artifacts/graphs/`), which the CPU provider can run
    (`--emulate`); a qnn-htp bundle may ship its context binaries only. False if unreadable."""
    try:
        files = json.loads((Path(root) / BUNDLE_INFO).read_text(encoding="utf-8")).get("files", {})
    except (OSError, ValueError, AttributeError):
        return False
    prefix = f"{ARTIFACTS_DIR}/graphs/"
    return any(str(rel).startswith(prefix) and str(rel).endswith(".onnx") for rel in files)


def check_bundle_target(
    lock: BundleLock,
    root: Path,
    *,
    host: HostProbe | None = None,
    allow_simulator: bool = False,
    allow_emulation: bool = False,
) -> list[Diagnostic]:
    """Refuse a bundle whose NPU backend this machine cannot run; warnings for what it runs instead.

    ort-cpu bundles run wherever onnxruntime runs (the versions are checked separately). A qnn-htp
    bundle needs a Hexagon NPU, or, when the user opts in, Qualcomm's x86 simulator
    (`allow_simulator`) or its QDQ graphs on the CPU provider (`allow_emulation`; refused for a
    bundle that ships context binaries only). The context binaries' recorded HTP arch / SoC is
    checked against the device before they load (`check_context_compatibility`)."""
    if not backend_support(lock.backend).needs_htp_arch:
        return []
    probe = host if host is not None else probe_host()
    file, key = str(root / BUNDLE_INFO), "target"
    if probe.qnn_htp_mode == "device":
        return []
    built_for = f"{lock.target} ({lock.backend}, HTP v{lock.htp_arch}, SoC {lock.soc_model})"
    if allow_emulation:
        if not bundle_has_qdq_graphs(root):
            raise user_error(
                f"bundle {root} is built for {built_for} and ships its QNN context binaries only: "
                "--emulate has no QDQ graphs to run on the CPU provider",
                file=file, key="files", value=lock.target, allowed=runnable_here(probe), exit_code=ExitCode.CANNOT_RUN,
                hint="run it on the device, or with --simulator (verification), or emulate the profile it was built from",
            )  # fmt: skip
        return [Diagnostic(message=f"bundle {root} is built for {built_for}; --emulate: its QDQ graphs run here on "
                           "onnxruntime's CPU integer kernels, and every output is labelled emulation",
                           severity="warning", file=file, key=key)]  # fmt: skip
    if probe.qnn_htp_mode == "simulator" and allow_simulator:
        return [Diagnostic(message=f"bundle {root} is built for {built_for}; it runs here on Qualcomm's x86 HTP "
                           "simulator (200-700x slower than the CPU): for verification, not speed",
                           severity="warning", file=file, key=key)]  # fmt: skip
    sim = " or --simulator (Qualcomm's HTP simulator, for verification)" if probe.qnn_htp_mode == "simulator" else ""
    emulate = "--emulate (its QDQ graphs on the CPU, labelled emulation)" if bundle_has_qdq_graphs(root) else ""
    opt_ins = (emulate + sim).removeprefix(" or ")
    raise user_error(
        f"bundle {root} is built for {built_for}, which this machine cannot run: it has no Hexagon NPU "
        f"({probe.machine}, {probe.cpu_model})",
        file=file, key=key, value=lock.target, allowed=runnable_here(probe), exit_code=ExitCode.CANNOT_RUN,
        hint=(f"run it here with {opt_ins}, or " if opt_ins else "") + "build a bundle for this machine: "
        "mllm-deploy build PROFILE --set device.target=host --set device.npu_backend=ort-cpu --out DIR",
    )  # fmt: skip


def _check_consistent(root: Path, lock: BundleLock) -> None:
    """The lockfile describes the artifacts and decode graphs it lists (a hand-edited one does not)."""
    try:
        built = Lockfile.model_validate_json((root / ARTIFACTS_DIR / LOCK).read_text(encoding="utf-8"))
        listed = json.loads((root / ARTIFACTS_DIR / MANIFEST).read_text(encoding="utf-8"))["files"]
        decode = json.loads((root / DECODE_DIR / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError, ValidationError) as exc:
        raise refuse_bundle(
            root, f"its artifacts or decode graphs cannot be read: {str(exc).splitlines()[0]}"
        ) from None
    pairs = {
        "target": (lock.target, built.target), "backend": (lock.backend, built.backend),
        "chunk_size": (lock.chunk_size, built.chunk_size), "htp_arch": (lock.htp_arch, built.htp_arch),
        "soc_model": (lock.soc_model, built.soc_model), "model.identity": (lock.model.identity, built.model_identity),
        "decode_weight_block": (lock.decode_weight_block, decode.get("block")),
        "decode_weight_bits": (lock.decode_weight_bits, decode.get("bits")),
    }  # fmt: skip
    for key, (said, found) in pairs.items():
        if said != found:
            raise refuse_bundle(root, f"its lockfile says {key} = {said!r}, but its artifacts were built with {found!r}",
                          key=key, value=said, allowed=repr(found))  # fmt: skip
    needed = [f"{ARTIFACTS_DIR}/{rel}" for rel in listed] + [f"{ARTIFACTS_DIR}/{LOCK}", f"{ARTIFACTS_DIR}/{MANIFEST}"]
    needed += [f"{DECODE_DIR}/{file}" for name in decode_graph_names(lock.kv_cache.storage)
               for file in (f"{name}.onnx", data_file(name))]  # fmt: skip
    needed.append(lock.model.source if lock.model.format == "gguf" else f"{lock.model.source}/config.json")
    unlisted = [rel for rel in needed if rel not in lock.files]
    if unlisted:
        raise refuse_bundle(root, f"its lockfile does not list {unlisted[0]}" + (f" and {len(unlisted) - 1} more" if len(unlisted) > 1 else ""),
                      key="files")  # fmt: skip
    shipped = f"sha256:{lock.files[lock.model.source].sha256}"  # a trimmed GGUF's identity is its original's
    if lock.model.format == "gguf" and not lock.model.trimmed and lock.model.identity != shipped:
        raise refuse_bundle(
            root, f"its lockfile's model.identity does not match {lock.model.source}", key="model.identity"
        )


def bundle_root(resolved: Resolved) -> Path | None:
    """The bundle directory `resolved`'s profile comes from, or None."""
    base = resolved.loaded.base_dir
    return Path(base) if base is not None and is_bundle(base) else None


def bundle_artifacts(resolved: Resolved, *, opt_in: OptIn | None = None) -> Artifacts | None:
    """The verified artifacts of the bundle `resolved`'s profile comes from (None: not a bundle);
    UserError (exit 3) when the bundle cannot run here (`opt_in`: see `open_bundle`) or its
    profile no longer matches its graphs."""
    root = bundle_root(resolved)
    if root is None:
        return None
    bundle = open_bundle(root, opt_in=opt_in)
    check_built_with(bundle, resolved)
    try:
        return open_entry(bundle.artifacts_dir, None, verify_checksums=False)  # the bundle checked every file
    except EntryProblem as problem:
        raise refuse_bundle(bundle.root, f"its artifacts cannot be used: {problem}") from None


def bundle_decode_graphs(resolved: Resolved, *, opt_in: OptIn | None = None) -> Path | None:
    """The decode graphs directory of the bundle `resolved`'s profile comes from (None: not a bundle)."""
    root = bundle_root(resolved)
    return None if root is None else open_bundle(root, opt_in=opt_in).decode_dir


def check_built_with(bundle: OpenedBundle, resolved: Resolved) -> None:
    """The resolved profile is the one the bundle's graphs were built for (its keys cannot be
    `--set` on a bundle, but this mllm-deploy's defaults could differ from the build's)."""
    lock, profile = bundle.lock, resolved.profile
    built = Lockfile.model_validate_json((bundle.artifacts_dir / LOCK).read_text(encoding="utf-8"))
    pairs: dict[str, tuple[object, object]] = {
        "device.target": (resolved.caps.id, lock.target),
        "device.npu_backend": (resolved.backend, lock.backend),
        "prefill.chunk_size": (profile.prefill.chunk_size, lock.chunk_size),
        "decode.kv_cache": (profile.decode.kv_cache, lock.kv_cache.storage),
        "decode.weight_block": (profile.decode.weight_block, lock.decode_weight_block),
        "decode.weight_bits": (profile.decode.weight_bits, lock.decode_weight_bits),
    }
    now = graph_settings(resolved)
    pairs.update({key: (now[key], value) for key, value in built.settings.items() if key != "calibration.source"})
    for key, (here, then) in pairs.items():
        if here != then:
            raise user_error(
                f"bundle {bundle.root}: the profile resolves {key} to {here!r} here, but the bundle's graphs "
                f"were built with {then!r}", **resolved.loaded.where(key), value=here, allowed=repr(then),
                exit_code=ExitCode.CANNOT_RUN, hint=REBUILD,
            )  # fmt: skip

"""Self-contained deployment bundles: `build PROFILE --out DIR`, then `run DIR` / `up DIR`.

    DIR/bundle.json     BundleInfo (what is inside, the lockfile key)
    DIR/profile.toml    the profile, with model.source pointing at the bundled model
    DIR/model/...       the model file (GGUF: CPU-side weights and tokenizer) or HF directory
    DIR/artifacts/      the verified artifact entry: graphs, QNN context binaries, shadow rows,
                        calibration, latencies, lockfile, manifest

A bundle's artifacts are used as they are: a lockfile that does not match the running
profile/libraries is an error (exit 3, rebuild the bundle), never a silent rebuild.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from mllm_deploy.compile.artifacts import Artifacts, EntryProblem, expected_lock, open_entry
from mllm_deploy.errors import ExitCode, user_error
from mllm_deploy.paths import atomic_write_text, make_build_dir

BUNDLE_INFO = "bundle.json"
BUNDLE_PROFILE = "profile.toml"


class BundleInfo(BaseModel):
    """Contents of a bundle."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    schema_version: int = 1
    """Version of the bundle layout."""
    profile_name: str
    """The profile's `name`."""
    model_source: str
    """`model.source` inside the bundle (relative to it)."""
    backend_label: str
    """What runs the NPU graphs."""
    artifacts_key: str
    """Name of the artifact entry the bundle was copied from."""


def is_bundle(path: str | Path) -> bool:
    """True when `path` is a bundle directory."""
    return Path(path).is_dir() and (Path(path) / BUNDLE_INFO).is_file()


def bundle_profile_path(path: str | Path) -> Path:
    """The profile file to load for a PROFILE argument: DIR/profile.toml for a bundle, else `path`.
    (For the CLI: `load_profile(bundle_profile_path(args.profile), args.overrides)`.)"""
    return Path(path) / BUNDLE_PROFILE if is_bundle(path) else Path(path)


def bundle_artifacts(resolved) -> Artifacts | None:
    """The bundle's artifacts when `resolved`'s profile comes from a bundle, else None."""
    base = resolved.loaded.base_dir
    if base is None or not is_bundle(base):
        return None
    try:
        return open_entry(Path(base) / "artifacts", expected_lock(resolved))
    except EntryProblem as problem:
        raise user_error(f"the bundle's artifacts cannot be used here: {problem}", file=str(base),
                         hint="rebuild it with `mllm-deploy build PROFILE --out DIR`",
                         exit_code=ExitCode.CANNOT_RUN) from None  # fmt: skip


def write_bundle(resolved, artifacts: Artifacts, out_dir: Path) -> Path:
    """Copy model, profile and artifacts into `out_dir` (replaced atomically if it exists)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not is_bundle(out_dir) and any(out_dir.iterdir()):
        raise user_error("--out must be a new or empty directory (or an earlier bundle)", file=str(out_dir))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_build_dir(out_dir.parent, out_dir.name)
    try:
        model = Path(resolved.spec.path)
        (tmp / "model").mkdir()
        if model.is_dir():
            shutil.copytree(model, tmp / "model" / model.name)
        else:
            shutil.copy2(model, tmp / "model" / model.name)
        source = f"model/{model.name}"
        shutil.copytree(artifacts.root, tmp / "artifacts")
        profile = resolved.profile.model_copy(
            update={"model": resolved.profile.model.model_copy(update={"source": source})}
        )
        atomic_write_text(tmp / BUNDLE_PROFILE, profile_to_toml(profile))
        info = BundleInfo(profile_name=profile.name, model_source=source, backend_label=resolved.backend_label,
                          artifacts_key=artifacts.root.name)  # fmt: skip
        atomic_write_text(tmp / BUNDLE_INFO, info.model_dump_json(indent=1))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def profile_to_toml(profile) -> str:
    """A profile as TOML (sections of scalars and string lists; unset values left out)."""
    lines = [f"schema_version = {profile.schema_version}", f"name = {_toml(profile.name)}"]
    data = profile.model_dump()
    for section, values in data.items():
        if not isinstance(values, dict):
            continue
        lines.append(f"\n[{section}]")
        lines += [f"{key} = {_toml(value)}" for key, value in values.items() if value is not None]
    return "\n".join(lines) + "\n"


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")

"""`load_profile`: a TOML file (plus `--set` overrides) -> a validated, located profile."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from mllm_deploy.errors import Diagnostic, Location, UserError
from mllm_deploy.paths import resource_dir
from mllm_deploy.profile.diagnose import diagnostics_from_validation, in_reading_order
from mllm_deploy.profile.lint import profile_warnings
from mllm_deploy.profile.loaded import LoadedProfile, locate
from mllm_deploy.profile.locate import locate_keys
from mllm_deploy.profile.models import Profile
from mllm_deploy.profile.overrides import apply_overrides, leaf_keys
from mllm_deploy.profile.source import parse_toml, printable, read_profile_text

DEFAULT_PROFILE_NAME = "default.toml"


def default_profile_path() -> Path:
    """The built-in default profile shipped with the package."""
    return resource_dir("profiles") / DEFAULT_PROFILE_NAME


def profile_hash(profile: Profile) -> str:
    """sha256 of the effective profile as canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps(profile.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


BUNDLE_INFO_NAME = "bundle.json"  # must agree with mllm_deploy.compile.bundle (a test checks it)
BUNDLE_PROFILE_NAME = "profile.toml"


def load_profile(path: str | Path | None, overrides: Sequence[str] = ()) -> LoadedProfile:
    """Read, parse and validate the profile at `path` (None: the built-in default) with
    `--set KEY=VALUE` overrides. Raises :class:`UserError` (exit 2) carrying every problem.

    A bundle directory written by `mllm-deploy build --out DIR` stands for its `profile.toml`
    (whose relative paths, like the bundle's artifacts, resolve inside the bundle)."""
    file = default_profile_path() if path is None else Path(path)
    if file.is_dir() and (file / BUNDLE_INFO_NAME).is_file():
        file = file / BUNDLE_PROFILE_NAME
    display = printable(str(file))
    text = read_profile_text(file, display)
    try:
        base_dir = file.resolve().parent
    except (OSError, RuntimeError):
        base_dir = file.absolute().parent
    return load_profile_text(text, file=file, base_dir=base_dir, overrides=overrides)


def load_profile_text(
    text: str,
    *,
    file: Path | None = None,
    base_dir: Path | None = None,
    overrides: Sequence[str] = (),
) -> LoadedProfile:
    """Like :func:`load_profile` for profile text already in memory (`file` names it)."""
    display = printable(str(file)) if file is not None else "<profile>"
    overrides = tuple(overrides)
    document = parse_toml(text, display)
    locations = locate_keys(text)
    merged, set_by_overrides, applied, problems = apply_overrides(document, overrides)

    def where(key: str | Sequence[object]) -> Location:
        return locate(key, file=display, locations=locations, overrides=applied)

    try:
        profile = Profile.model_validate(merged)
    except ValidationError as exc:
        raise UserError(in_reading_order(diagnostics_from_validation(exc, where) + problems, overrides)) from None
    except (RecursionError, ValueError) as exc:  # absurdly nested input
        raise UserError([Diagnostic(message=f"cannot validate the profile: {exc}", file=display)]) from None
    if problems:
        raise UserError(problems)
    explicit = frozenset(leaf_keys(document) | set_by_overrides)
    warnings = in_reading_order(profile_warnings(profile, explicit, where), overrides)
    if not document and not overrides:
        warnings.insert(
            0,
            Diagnostic(
                message="the profile sets no keys: every key has its default value",
                severity="warning",
                file=display,
            ),
        )
    return LoadedProfile(
        profile=profile,
        path=file,
        base_dir=base_dir if base_dir is not None else Path.cwd(),
        locations=locations,
        explicit=explicit,
        overrides=overrides,
        warnings=warnings,
        text_hash=profile_hash(profile),
    )

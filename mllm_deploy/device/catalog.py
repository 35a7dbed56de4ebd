"""The device catalog: one TOML data file per device, shipped in `device/catalog/`."""

from __future__ import annotations

import difflib
import tomllib
from functools import lru_cache
from importlib import resources
from pathlib import Path

from pydantic import ValidationError

from mllm_deploy.device.models import Capabilities
from mllm_deploy.errors import Diagnostic, ExitCode, UserError

HOST_ID = "host"


class CatalogError(UserError):
    """A catalog data file shipped with mllm-deploy is broken: a packaging error (exit 1)."""


def catalog_dir() -> Path:
    """The folder holding the catalog TOML files."""
    return Path(str(resources.files("mllm_deploy.device") / "catalog"))


def _broken(path: Path, message: str, key: str | None = None) -> CatalogError:
    diag = Diagnostic(
        message=message,
        file=str(path),
        key=key,
        hint="this is a packaging error in mllm-deploy's device catalog; reinstall the package",
    )
    return CatalogError([diag], exit_code=ExitCode.INTERNAL)


def load_file(path: Path) -> Capabilities:
    """Parse and validate one catalog file; any problem is a CatalogError naming the file."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise _broken(path, f"cannot read device catalog file: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise _broken(path, f"invalid TOML in device catalog file: {exc}") from None
    try:
        caps = Capabilities.model_validate(data)
    except ValidationError as exc:
        diags = [
            Diagnostic(
                message=f"invalid device catalog entry: {err['msg']}",
                file=str(path),
                key=".".join(str(p) for p in err["loc"]) or None,
                value=err.get("input") if err["type"] != "missing" else None,
                hint="this is a packaging error in mllm-deploy's device catalog; reinstall the package",
            )
            for err in exc.errors()
        ]
        raise CatalogError(diags, exit_code=ExitCode.INTERNAL) from None
    if caps.id != path.stem:
        raise _broken(path, f"catalog id {caps.id!r} does not match the file name", key="id")
    return caps


@lru_cache(maxsize=1)
def _load_all(folder: str) -> dict[str, Capabilities]:
    return {p.stem: load_file(p) for p in sorted(Path(folder).glob("*.toml"))}


def catalog_entries(folder: Path | None = None) -> dict[str, Capabilities]:
    """Every catalog entry by id, as stored (the `host` entry holds unprobed defaults)."""
    return _load_all(str(folder or catalog_dir()))


def device_ids() -> list[str]:
    """All valid `device.target` ids, `host` first."""
    ids = sorted(catalog_entries())
    return [HOST_ID] + [i for i in ids if i != HOST_ID] if HOST_ID in ids else ids


def unknown_target(target: str) -> UserError:
    """The error for a target id not in the catalog, with a did-you-mean."""
    ids = device_ids()
    close = difflib.get_close_matches(target.lower(), ids, n=1, cutoff=0.5)
    return UserError(
        [
            Diagnostic(
                message="unknown device target",
                key="device.target",
                value=target,
                allowed=", ".join(ids),
                hint=f"did you mean {close[0]!r}?" if close else "run `mllm-deploy devices` to list them",
            )
        ],
        exit_code=ExitCode.INVALID,
    )

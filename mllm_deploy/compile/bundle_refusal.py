"""One located refusal of a bundle: what every check of `compile.bundle_check` raises."""

from __future__ import annotations

from pathlib import Path
from typing import TypedDict, Unpack

from mllm_deploy.compile.bundle import BUNDLE_INFO
from mllm_deploy.errors import ExitCode, UserError, user_error

REBUILD = "rebuild it on the host: mllm-deploy build PROFILE --out DIR"


class Where(TypedDict, total=False):
    """What a refusal names besides the file: the lockfile field, what was found, what was expected."""

    key: str | None
    value: object
    allowed: str | None


def refuse_bundle(
    root: Path,
    message: str,
    *,
    file: Path | None = None,
    exit_code: ExitCode = ExitCode.CANNOT_RUN,
    hint: str = REBUILD,
    **more: Unpack[Where],
) -> UserError:
    """One refusal of the bundle at `root`, located at `file` (default: its lockfile)."""
    return user_error(f"bundle {root}: {message}", file=str(file or root / BUNDLE_INFO), exit_code=exit_code,
                      hint=hint, **more)  # fmt: skip

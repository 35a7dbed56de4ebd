"""A deployment's profile as `dotted.key -> value`, for the UI's settings view and `/set`."""

from __future__ import annotations

from mllm_deploy.interface.deployment import Deployment


def flatten(value: object, prefix: str = "") -> dict[str, object]:
    """A profile (or any nested dict) as `dotted.key -> value`."""
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for key, inner in value.items():
            out.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def profile_values(deployment: Deployment) -> dict[str, object]:
    return flatten(deployment.profile.model_dump(mode="json"))

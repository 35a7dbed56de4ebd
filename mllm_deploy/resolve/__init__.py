"""The resolve stage: `resolve(loaded, caps, spec) -> Resolved`, the profile checked against a
device and a model (second validation pass), with the memory budget every plan must fit."""

from mllm_deploy.resolve.resolver import Resolved, resolve, resolve_profile

__all__ = ["Resolved", "resolve", "resolve_profile"]

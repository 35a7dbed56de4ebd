"""The float32 reference of a bundle: the model it was built from, found by its identity.

A bundle ships its model trimmed (embedding, head, norms: the graphs hold the linears), so a
float32 baseline (`eval`) or reference (`verify`) needs the original model: the bundle's own
file when it is whole, else `--reference PATH-OR-builtin:NAME`, else an installed built-in
model whose sha256 is the lockfile's identity.
"""

from __future__ import annotations

from pathlib import Path

from mllm_deploy.compile.artifacts import model_identity
from mllm_deploy.compile.bundle_lock import BundleLock
from mllm_deploy.errors import UserError, user_error
from mllm_deploy.model import load_weights, read_spec
from mllm_deploy.model.registry import BUILTIN_MODELS, BUILTIN_PREFIX
from mllm_deploy.model.spec import LlamaWeights


def reference_weights(root: Path, lock: BundleLock, reference: str | None, *, command: str) -> LlamaWeights:
    """Float32 weights of the model the bundle at `root` was built from, checked by its identity;
    a located UserError (key `--reference`) when it is not found or is another model. `command`
    names the command in the hint (`verify`, `eval`). The weights are dequantized from the file
    as they are used (the bundle's commands write nothing big into the cache)."""
    if reference is not None:
        candidates = [reference]
    elif not lock.model.trimmed:
        candidates = [str(root / lock.model.source)]
    else:
        candidates = [
            BUILTIN_PREFIX + m.name for m in BUILTIN_MODELS.values() if f"sha256:{m.sha256}" == lock.model.identity
        ]
    for source in candidates:
        try:
            spec = read_spec(source)
        except UserError:
            if reference is not None:
                raise
            continue  # a built-in model that is not installed here
        found = model_identity(spec)
        if found == lock.model.identity:  # read from its file, nothing written to the weight cache
            return load_weights(spec, use_cache=False, on_demand=True)
        if reference is not None:
            raise user_error(f"--reference {reference} is not the model bundle {root} was built from",
                             key="--reference", value=found, allowed=lock.model.identity)  # fmt: skip
    raise user_error(
        f"bundle {root}: its model is trimmed (the graphs hold the linears), and the float32 reference "
        f"needs the original model ({lock.model.name}, {lock.model.identity})",
        key="--reference", hint=f"give it: mllm-deploy {command} BUNDLE --reference PATH-OR-builtin:NAME",
    )  # fmt: skip

"""`/set KEY=VALUE` in the UI: re-validate with every override so far, and say what must be rebuilt.

The new profile goes through the same `load_profile` -> `resolve_profile` -> backend check as
at start-up, so an invalid value is refused with the same located diagnostic. What changes:

- `decode.*`, `ui.*`, `name`, `model.system_prompt`, `prefill.overflow` (and, on the float
  engine, `prefill.chunk_size`): read by the session on every turn, so nothing is rebuilt —
  except `decode.kv_cache` and `prefill.attention` on the NPU path, which the engine opens with (a reload);
- `prefill.max_context`: a new KV cache (the conversation is prefilled again next turn);
- anything else (model, device, quantization, outliers, ...): the model is reloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mllm_deploy.errors import Diagnostic, UserError
from mllm_deploy.interface.deployment import Deployment, load_deployment
from mllm_deploy.tui.profile_values import profile_values

Rebuild = Literal["nothing", "cache", "model"]

APPLIED_EACH_TURN = ("decode.", "ui.", "name", "model.system_prompt", "prefill.overflow")
FLOAT_ENGINE_EACH_TURN = ("prefill.chunk_size",)  # chunking is free on the float engine; NPU graphs are per chunk size
NEEDS_NEW_CACHE = ("prefill.max_context",)
NPU_ENGINE_SETTINGS = (
    "decode.kv_cache",
    "prefill.attention",
)  # the NPU engine is opened with its KV cache storage and attention


@dataclass(frozen=True)
class Reconfiguration:
    deployment: Deployment
    changed: dict[str, tuple[object, object]]  # dotted key -> (old value, new value)
    rebuild: Rebuild
    new_warnings: list[Diagnostic]

    @property
    def summary(self) -> str:
        if not self.changed:
            return "no change: the profile already has that value"
        keys = ", ".join(f"{k} = {new!r}" for k, (_, new) in self.changed.items())
        what = {
            "nothing": "applies from the next turn; nothing rebuilt",
            "cache": "plan re-resolved, new KV cache; the conversation is prefilled again on the next turn",
            "model": "plan re-resolved, model reloaded; the conversation is prefilled again on the next turn",
        }[self.rebuild]
        return f"{keys}: {what}"


def _matches(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in prefixes)


def rebuild_needed(changed_keys: list[str], *, uses_npu: bool) -> Rebuild:
    """The most that `changed_keys` force to be rebuilt."""
    in_place = APPLIED_EACH_TURN + (() if uses_npu else FLOAT_ENGINE_EACH_TURN)
    needs: Rebuild = "nothing"
    for key in changed_keys:
        if uses_npu and _matches(key, NPU_ENGINE_SETTINGS):
            return "model"
        if _matches(key, in_place):
            continue
        if _matches(key, NEEDS_NEW_CACHE):
            needs = "cache" if needs == "nothing" else needs
        else:
            return "model"
    return needs


def reconfigure(current: Deployment, assignment: str) -> Reconfiguration:
    """The deployment with one more override; raises UserError with located diagnostics."""
    assignment = assignment.strip()
    if "=" not in assignment:
        raise UserError(
            [Diagnostic(message="expected KEY=VALUE, e.g. /set decode.temperature=0.7", value=assignment or None)]
        )
    new = load_deployment(current.profile_arg, (*current.overrides, assignment), opt_in=current.opt_in, to_run=True)
    before, after = profile_values(current), profile_values(new)
    changed = {k: (before.get(k), v) for k, v in after.items() if before.get(k) != v}
    rebuild = rebuild_needed(list(changed), uses_npu=current.resolved.uses_npu or new.resolved.uses_npu)
    old_warnings = {d.render() for d in current.loaded.warnings + current.resolved.warnings}
    new_warnings = [d for d in new.loaded.warnings + new.resolved.warnings if d.render() not in old_warnings]
    return Reconfiguration(new, changed, rebuild, new_warnings)

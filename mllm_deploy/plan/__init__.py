"""The plan stage: `build_plan(resolved) -> Plan`, by an ordered list of passes.

    chunk -> place -> insert_shadow -> schedule

`dump_dir` writes the plan after each pass (`NN-name.json`) for inspection.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mllm_deploy.paths import atomic_write_text
from mllm_deploy.plan.models import Estimate, GraphSpec, Plan, ShadowPlan, Subgraph, TensorSpec
from mllm_deploy.plan.passes import PASSES, PlanInputs
from mllm_deploy.resolve.memory import MemoryBudget, memory_budget

if TYPE_CHECKING:
    from mllm_deploy.resolve import Resolved

__all__ = [
    "Estimate",
    "GraphSpec",
    "MemoryBudget",
    "Plan",
    "ShadowPlan",
    "Subgraph",
    "TensorSpec",
    "build_plan",
    "memory_budget",
    "plan_to_json",
]


def default_prompt_tokens(resolved: Resolved) -> int:
    """Prompt length a plan is drawn for when none is given: 1024 tokens, within the context."""
    return min(1024, resolved.profile.prefill.max_context)


def build_plan(
    resolved: Resolved,
    *,
    prompt_tokens: int | None = None,
    calibrated_shadow_inputs: tuple[tuple[int, str], ...] | None = None,
    dump_dir: Path | None = None,
) -> Plan:
    """The execution plan of `resolved` for a prompt of `prompt_tokens` tokens."""
    profile = resolved.profile
    tokens = prompt_tokens or default_prompt_tokens(resolved)
    plan = Plan(
        profile_name=profile.name,
        model=f"{resolved.spec.name} ({profile.model.source})",
        target=resolved.caps.id,
        backend=resolved.backend,
        backend_label=resolved.backend_label,
        scheduler=profile.scheduler.policy,
        chunk_size=profile.prefill.chunk_size,
        prompt_tokens=tokens,
        n_chunks=0,
        padded_tokens=0,
        cpu_threads=resolved.cpu_threads,
        npu_threads=resolved.npu_threads,
        memory=resolved.memory,
    )
    inputs = PlanInputs(
        profile=profile,
        caps=resolved.caps,
        spec=resolved.spec,
        backend=resolved.backend,
        calibrated_shadow_inputs=calibrated_shadow_inputs,
    )
    for index, (name, run_pass) in enumerate(PASSES, start=1):
        plan = run_pass(plan, inputs)
        if dump_dir is not None:
            atomic_write_text(Path(dump_dir) / f"{index:02d}-{name}.json", plan_to_json(plan))
    return plan


def plan_to_json(plan: Plan) -> str:
    """The plan as stable, indented JSON (also what `plan --json` prints)."""
    return plan.model_dump_json(indent=1) + "\n"

"""`estimate_rows`: a profile on catalogued devices and models, predicted per prompt length.

For each (device, model, sweep setting) the profile is loaded with those overrides and resolved
exactly as `plan` does (a card needs no weights). A plan that would not fit the device's memory
is still priced — the row says `fits: false` and why — by resolving once more with the memory
limits lifted. For each prompt length the plan's DAG is drawn (`build_plan`), priced by the
device's cost model and simulated with the runtime's scheduler (`estimate.simulate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from mllm_deploy.bench.runner import expand_sweeps
from mllm_deploy.device import load_capabilities
from mllm_deploy.device.models import Capabilities
from mllm_deploy.errors import Diagnostic, ExitCode, UserError, user_error
from mllm_deploy.estimate.cost_model import Pricing
from mllm_deploy.estimate.host_calibration import measured_attention, measured_npu_latencies
from mllm_deploy.estimate.simulate import Prediction, simulate_plan
from mllm_deploy.interface.deployment import load_deployment_profile
from mllm_deploy.model import read_spec
from mllm_deploy.plan import build_plan
from mllm_deploy.plan.models import Plan
from mllm_deploy.profile import LoadedProfile
from mllm_deploy.resolve import Resolved, resolve

MB = 1e6


class EstimateRow(BaseModel):
    """One predicted configuration and prompt length (what `estimate --json` prints)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    device: str
    """Catalog id of the device."""
    device_name: str
    """The device's name."""
    model: str
    """Model name and source (a card, a file, a builtin)."""
    settings: dict[str, str]
    """The sweep's values for this row (`--sweep`), like `bench`'s."""
    prompt_tokens: int
    """Prompt length."""
    chunk_size: int
    """`prefill.chunk_size`."""
    scheduler: str
    """`scheduler.policy` simulated."""
    backend: str
    """What plays the NPU."""
    ttft_ms: float
    """Predicted time to first token: the simulated prefill makespan."""
    prefill_tokens_per_s: float
    """`prompt_tokens` over the TTFT."""
    decode_tokens_per_s: float
    """Predicted decode speed with `prompt_tokens` in the KV cache."""
    peak_memory_mb: dict[str, float]
    """Planned peak bytes per processor (`npu`, `cpu`) and `total`, in MB."""
    memory_available_mb: float
    """RAM one app may hold on the device (the cost model's share of RAM), in MB."""
    fits: bool
    """The total fits the app's share of RAM and the NPU graphs its addressable memory."""
    fits_note: str
    """Why it does not fit (empty when it fits)."""
    bound_by: str
    """The cost category that holds most of the critical path: npu compute, memory bandwidth,
    sync overhead, cpu attention, shadow work, cpu other."""
    busy: dict[str, float]
    """Busy fraction of each processor over the prefill (CPU: over its slots)."""
    critical_path: dict[str, object]
    """The critical path: its length in subgraphs, ms per cost category, first and last subgraph."""
    calibration: str
    """Where the prices come from (measured build latencies on this host, or the catalog's figures)."""


@dataclass(frozen=True)
class EstimateRequest:
    """What `estimate` was asked."""

    profile: str | None
    overrides: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)  # empty: the profile's target
    models: list[str] = field(default_factory=list)  # empty: the profile's model
    prompt_tokens: list[int] = field(default_factory=lambda: [64, 256, 1024, 4096])
    sweeps: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Estimated:
    """One priced prompt length: the row and what it was computed from (for `--trace`)."""

    row: EstimateRow
    plan: Plan
    prediction: Prediction
    npu_label: str


def model_override(model: str) -> str:
    """`--model` as a `model.source` override: a card id or a config.json path become `card:...`."""
    text = model.strip()
    if text.startswith(("card:", "builtin:")):
        return text
    if text.endswith(".json"):
        return f"card:{Path(text).expanduser().resolve()}"
    if Path(text).expanduser().exists():  # a .gguf file or a Hugging Face directory
        return str(Path(text).expanduser().resolve())
    return f"card:{text}"


def resolve_for_estimate(loaded: LoadedProfile) -> tuple[Resolved, Capabilities, str]:
    """(resolved, the device's real capabilities, why it does not fit or ""). A plan the resolver
    refuses for memory alone (exit 3) is resolved again with the memory limits lifted."""
    caps = load_capabilities(loaded.profile.device.target)
    spec = read_spec(loaded.profile.model.source, loaded.base_dir)
    try:
        return resolve(loaded, caps, spec), caps, ""
    except UserError as err:
        if err.exit_code != ExitCode.CANNOT_RUN:
            raise
        unlimited = caps.model_copy(
            update={
                "ram_bytes": 0,
                "npu": caps.npu.model_copy(update={"addressable_memory_bytes": 0}) if caps.npu else None,
            }
        )
        try:
            resolved = resolve(loaded, unlimited, spec)
        except UserError:
            raise err from None
        return resolved, caps, "; ".join(d.message for d in err.diagnostics)


def _fits(resolved: Resolved, caps: Capabilities, refusal: str) -> tuple[bool, float, str]:
    cost = caps.cost
    share = cost.app_memory_fraction if cost is not None else 1.0
    available = caps.ram_bytes * share
    notes = [refusal] if refusal else []
    total = resolved.memory.total_bytes
    if caps.ram_bytes and total > available:
        notes.append(f"{total / MB:.0f} MB planned, {available / MB:.0f} MB available to an app on {caps.id}")
    return not notes, available / MB, "; ".join(dict.fromkeys(notes))


def _kv_bytes_per_token(resolved: Resolved) -> int:
    spec = resolved.spec
    dtype_bytes = 1 if resolved.memory.kv_cache_dtype == "int8" else 4
    return spec.kv_cache_bytes(1, dtype_bytes)


def estimate_configuration(
    loaded: LoadedProfile, prompt_tokens: list[int], settings: dict[str, str], *, live: bool = True
) -> list[Estimated]:
    """Rows for one loaded profile (one device, model and setting) at each prompt length. `live`
    (host only): time the attention kernel and re-time a build graph now; else the stored figures."""
    resolved, caps, refusal = resolve_for_estimate(loaded)
    limit = resolved.profile.prefill.max_context
    for n in prompt_tokens:
        if not 1 <= n <= limit:
            raise user_error(
                "--prompt-tokens out of range", value=n, key="prefill.max_context",
                allowed=f"1 to prefill.max_context ({limit}); raise it with --set prefill.max_context=N",
            )  # fmt: skip
    fits, available_mb, note = _fits(resolved, caps, refusal)
    measured, calibration, shadow_inputs, load = measured_npu_latencies(resolved, caps, live=live)
    attention = measured_attention(resolved.spec) if caps.id == "host" and live else None
    if attention is not None:
        calibration += "; CPU attention: the runtime's kernel timed here"
    out = []
    for n in prompt_tokens:
        plan = build_plan(resolved, prompt_tokens=n, calibrated_shadow_inputs=shadow_inputs)
        pricing = Pricing.of(
            caps, plan, resolved.memory, _kv_bytes_per_token(resolved), measured, attention, resolved.spec.q_dim
        )
        prediction = simulate_plan(plan, pricing)
        ttft = prediction.makespan_s
        memory = resolved.memory
        path = prediction.critical_path
        row = EstimateRow(
            device=caps.id,
            device_name=caps.name,
            model=plan.model,
            settings=settings,
            prompt_tokens=n,
            chunk_size=plan.chunk_size,
            scheduler=plan.scheduler,
            backend=plan.backend_label,
            ttft_ms=round(ttft * 1e3, 2),
            prefill_tokens_per_s=round(n / ttft, 1) if ttft > 0 else 0.0,
            decode_tokens_per_s=round(1.0 / (pricing.decode_step_seconds(n) * load), 1),
            peak_memory_mb={
                "npu": round(memory.npu_bytes / MB, 1),
                "cpu": round(memory.cpu_bytes / MB, 1),
                "total": round(memory.total_bytes / MB, 1),
            },
            memory_available_mb=round(available_mb, 1),
            fits=fits,
            fits_note=note,
            bound_by=prediction.bound_by,
            busy=prediction.busy,
            critical_path={
                "subgraphs": len(path),
                "ms_by_category": {k: round(v * 1e3, 2) for k, v in prediction.critical_by_category.items() if v},
                "first": path[0] if path else None,
                "last": path[-1] if path else None,
            },
            calibration=calibration,
        )
        out.append(Estimated(row, plan, prediction, plan.backend_label))
    return out


def estimate_rows(request: EstimateRequest) -> list[Estimated]:
    """Every (device, model, sweep setting, prompt length) of `request`, in that nesting order."""
    if not request.prompt_tokens:
        raise UserError([Diagnostic(message="--prompt-tokens needs at least one length")], exit_code=ExitCode.INVALID)
    configs = expand_sweeps(request.sweeps) if request.sweeps else [{}]
    devices: list[str | None] = list(request.devices) or [None]
    models: list[str | None] = list(request.models) or [None]
    out: list[Estimated] = []
    for device in devices:
        for model in models:
            for settings in configs:
                overrides = list(request.overrides)
                if device is not None:
                    overrides.append(f"device.target={device}")
                if model is not None:
                    overrides.append(f"model.source={model_override(model)}")
                overrides += [f"{k}={v}" for k, v in settings.items()]
                loaded = load_deployment_profile(request.profile, overrides)
                if model is not None:  # another model's context may be shorter than the profile's max_context
                    context = read_spec(loaded.profile.model.source, loaded.base_dir).context
                    if loaded.profile.prefill.max_context > context:
                        overrides.append(f"prefill.max_context={context}")
                        loaded = load_deployment_profile(request.profile, overrides)
                out += estimate_configuration(loaded, request.prompt_tokens, settings)
    return out

"""Predict before deploying: a profile's TTFT, prefill and decode speed, memory and bottleneck on any
catalogued device, for any model card, from the plan's DAG run through the runtime's own scheduler
in simulated time with the device's cost model.

    rows = estimate_rows(EstimateRequest(profile, devices=["sd8gen3"], models=["qwen1.5-1.8b"]))
"""

from __future__ import annotations

from mllm_deploy.estimate.predict import Estimated, EstimateRequest, EstimateRow, estimate_rows

__all__ = ["EstimateRequest", "EstimateRow", "Estimated", "estimate_rows"]

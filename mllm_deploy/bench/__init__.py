"""`mllm-deploy bench`: measured prefill/decode speed, memory and utilization over a sweep of
profile settings; each configuration runs in a fresh process so its peak RSS is its own."""

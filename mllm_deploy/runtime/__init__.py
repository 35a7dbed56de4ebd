"""Runtime: runs an opened engine over KV caches and streams plain events (`mllm_deploy.events`).

Two engines implement `engine.Engine`: the float32 engine (`forward.FloatEngine`, the baseline)
and the NPU path (`dag_engine.DagEngine`: the plan's subgraph DAG on the NPU and CPU executors,
`dag_prefill` + `scheduler` + `executors`, INT8 graphs and shadow corrections from `npu_kernels`
and `shadow`, INT8 decode in `decode_fast`). `generate` turns an engine into one turn's events;
`sampling` and `stop_strings` decide tokens; `telemetry`, `trace` and `report` measure and render.

The runtime never compiles: the interface layer (`mllm_deploy.interface`) obtains the artifacts
(a bundle's, or a build's) and opens the engine. Nothing here imports a front end.
"""

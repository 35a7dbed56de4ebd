"""The float32 reference: the same four per-layer graphs as the NPU path, computed in numpy.

Used by the `none` backend (everything float on the CPU: the baseline) and by tests as the
ground truth the INT8 graphs are compared with. A float graph is the layer's float weights plus
the graph's wiring; it can be held in memory or saved as `.npz` and loaded by path.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mllm_deploy.backends.base import BackendError, GraphHandle, NpuBackend, check_inputs
from mllm_deploy.model.spec import LayerWeights
from mllm_deploy.paths import atomic_write_bytes


@dataclass(frozen=True)
class FloatLinearGraph:
    """Linears sharing one float input; with `swiglu`, (gate, up) → silu(gate)·up."""

    name: str  # "layer0_qkv"
    input_name: str
    output_names: tuple[str, ...]
    weights: tuple[np.ndarray, ...]  # float32 [out, in] each
    biases: tuple[np.ndarray | None, ...]  # float32 [out] or None, one per weight
    chunk_tokens: int
    swiglu: bool = False

    def apply(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """x float32 [chunk, in] → outputs [chunk, out]."""
        products = []
        for w, b in zip(self.weights, self.biases, strict=True):
            y = x @ w.T  # [chunk, out]
            products.append(y + b if b is not None else y)
        if self.swiglu:
            gate, up = products
            return {self.output_names[0]: gate / (1.0 + np.exp(-gate)) * up}
        return dict(zip(self.output_names, products, strict=True))


def float_layer_graphs(layer: LayerWeights, layer_index: int, chunk_tokens: int) -> dict[str, FloatLinearGraph]:
    """The float counterparts of `compile.graphs.build_layer_models`, same names and shapes."""
    p = f"layer{layer_index}"
    return {
        "qkv": FloatLinearGraph(
            f"{p}_qkv",
            "x_norm",
            ("q", "k", "v"),
            (layer.wq, layer.wk, layer.wv),
            (layer.bq, layer.bk, layer.bv),
            chunk_tokens,
        ),
        "o_proj": FloatLinearGraph(f"{p}_o_proj", "attn_out", ("attn_proj",), (layer.wo,), (None,), chunk_tokens),
        "gate_up": FloatLinearGraph(
            f"{p}_gate_up", "x_norm", ("h",), (layer.w_gate, layer.w_up), (None, None), chunk_tokens, swiglu=True
        ),
        "down": FloatLinearGraph(f"{p}_down", "h", ("mlp_out",), (layer.w_down,), (None,), chunk_tokens),
    }


def save_float_graph(graph: FloatLinearGraph, path: Path) -> Path:
    """Write `graph` as an .npz file, atomically."""
    arrays: dict[str, np.ndarray] = {
        "meta": np.array([graph.name, graph.input_name, ",".join(graph.output_names)]),
        "chunk_tokens": np.array(graph.chunk_tokens),
        "swiglu": np.array(graph.swiglu),
    }
    for i, (w, b) in enumerate(zip(graph.weights, graph.biases, strict=True)):
        arrays[f"weight{i}"] = np.asarray(w, np.float32)
        if b is not None:
            arrays[f"bias{i}"] = np.asarray(b, np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def load_float_graph(path: Path) -> FloatLinearGraph:
    with np.load(path, allow_pickle=False) as data:
        name, input_name, outputs = (str(s) for s in data["meta"])
        n = sum(1 for k in data.files if k.startswith("weight"))
        return FloatLinearGraph(
            name,
            input_name,
            tuple(outputs.split(",")),
            tuple(data[f"weight{i}"] for i in range(n)),
            tuple(data[f"bias{i}"] if f"bias{i}" in data.files else None for i in range(n)),
            int(data["chunk_tokens"]),
            bool(data["swiglu"]),
        )


class NumpyFloatBackend(NpuBackend):
    """float32 numpy matmuls (`y = x @ W.T`) on the CPU; numpy's BLAS picks the threads."""

    name = "numpy-float"

    def load(self, graph_path: Path | FloatLinearGraph) -> GraphHandle:
        graph = graph_path if isinstance(graph_path, FloatLinearGraph) else load_float_graph(Path(graph_path))
        width_in = graph.weights[0].shape[1]
        if graph.swiglu:
            outputs = {graph.output_names[0]: (graph.chunk_tokens, graph.weights[1].shape[0])}
        else:
            outputs = {
                n: (graph.chunk_tokens, w.shape[0]) for n, w in zip(graph.output_names, graph.weights, strict=True)
            }
        return GraphHandle(graph.name, {graph.input_name: (graph.chunk_tokens, width_in)}, outputs, graph)

    def run(self, handle: GraphHandle, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = check_inputs(handle, inputs)
        graph: FloatLinearGraph = handle.impl
        if not isinstance(graph, FloatLinearGraph):
            raise BackendError(f"{handle.source} was not loaded by the numpy float backend")
        return graph.apply(feeds[graph.input_name])

    def describe(self) -> dict:
        return {
            "name": self.name,
            "provider": "numpy",
            "device_mode": "cpu float32 (no NPU)",
            "threads": None,  # numpy's BLAS decides
            "numpy": np.__version__,
        }

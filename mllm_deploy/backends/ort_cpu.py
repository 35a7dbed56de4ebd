"""`ort-cpu`: the INT8 QDQ graphs on onnxruntime's CPU provider — an emulated NPU.

onnxruntime fuses each DQ→MatMul→Q unit into an integer kernel (QLinearMatMul, or
MatMulIntegerToFloat for float outputs) that runs on AMX/VNNI where the CPU has them;
`compile.audit.integer_kernel_report` shows which kernels a graph really gets.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from mllm_deploy.backends.base import BackendError, GraphHandle, NpuBackend, check_inputs

CPU_PROVIDER = "CPUExecutionProvider"


Shapes = dict[str, tuple[int, ...]]  # tensor name → static shape


def session_io(session: ort.InferenceSession) -> tuple[Shapes, Shapes]:
    """Static input and output shapes of a session, name → shape."""

    def shapes(values: Sequence[ort.NodeArg]) -> Shapes:
        out: Shapes = {}
        for v in values:
            if not all(isinstance(d, int) and d > 0 for d in v.shape):
                raise BackendError(f"{v.name}: shape {v.shape} is not static")
            out[v.name] = tuple(v.shape)
        return out

    return shapes(session.get_inputs()), shapes(session.get_outputs())


RECORD_ASSIGNMENT = "session.record_ep_graph_assignment_info"


def assigned_node_counts(session: ort.InferenceSession) -> dict[str, int]:
    """provider → number of graph nodes it was assigned (needs RECORD_ASSIGNMENT = "1")."""
    counts: dict[str, int] = {}
    for subgraph in session.get_provider_graph_assignment_info():
        counts[subgraph.ep_name] = counts.get(subgraph.ep_name, 0) + len(subgraph.get_nodes())
    return counts


def session_handle(session: ort.InferenceSession, graph_path: Path, provider: str) -> GraphHandle:
    """A GraphHandle for `session`, refusing a graph any node of which runs outside `provider`."""
    assigned = assigned_node_counts(session)
    if set(assigned) != {provider}:
        raise BackendError(f"{graph_path}: nodes assigned to {assigned}, expected only {provider}")
    inputs, outputs = session_io(session)
    return GraphHandle(str(graph_path), inputs, outputs, session, assigned)


def run_session(handle: GraphHandle, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run an onnxruntime session behind `handle`: checked inputs in, every output by name."""
    feeds = check_inputs(handle, inputs)
    names = list(handle.outputs)
    return dict(zip(names, handle.impl.run(names, feeds), strict=True))


class OrtCpuBackend(NpuBackend):
    """onnxruntime CPUExecutionProvider, `npu_threads` intra-op threads, sequential execution."""

    name = "ort-cpu"

    def __init__(self, npu_threads: int = 1, allow_spinning: bool = False, uint16_accuracy_level: int = 1):
        if npu_threads < 1:
            raise ValueError(f"npu_threads must be >= 1, got {npu_threads}")
        self.npu_threads = npu_threads
        # Spinning worker threads would steal cores from the CPU executors that run attention
        # and outlier corrections in parallel with the emulated NPU, so it is off by default.
        self.allow_spinning = allow_spinning
        # onnxruntime has no integer kernel for uint16 activations: it rewrites DQ(int8 W)→MatMul
        # into MatMulNBits(bits=8), whose default accuracy_level 4 silently re-quantizes the
        # activations to int8 per 32-value block (measured: ~400 uint16 steps off the exact
        # W8A16 result, while QNN HTP is within 3). Level 1 computes in float32 instead, so a
        # uint16 graph gives the W8A16 numbers the NPU would; integer_kernel_report shows it.
        self.uint16_accuracy_level = uint16_accuracy_level

    def session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.npu_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.allow_spinning else "0")
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(self.uint16_accuracy_level))
        options.add_session_config_entry(RECORD_ASSIGNMENT, "1")
        options.log_severity_level = 3
        # 120 sessions (4 graphs x 30 layers) each keeping an arena of their activations cost
        # ~250 MB of peak RSS on the default model; without arenas buffers are freed after a run
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
        return options

    def load(self, graph_path: Path) -> GraphHandle:
        session = ort.InferenceSession(str(graph_path), self.session_options(), providers=[CPU_PROVIDER])
        return session_handle(session, graph_path, CPU_PROVIDER)

    def load_sizes(self, graph_path: Path, sizes: Sequence[int]) -> dict[int, GraphHandle]:
        """The graph at `graph_path` at each static row count of `sizes` (`StaticRowsLoader`),
        sharing one copy of its weights: one onnxruntime session whose first dimension is left
        free, behind one handle per size whose inputs `check_inputs` holds to that size, so only
        the planned static shapes ever run — as the graphs of two sizes in one QNN context binary
        share their weights. Two static sessions would hold the weights twice (measured on the
        default model's 120 graphs: 116 MB more RSS); the free dimension runs the same kernels at
        the same speed, with bit-identical outputs. The session is made from a temporary copy of
        the rewritten file, deleted at once (made from bytes in memory, onnxruntime keeps a second
        copy of the weights: 218 MB more)."""
        model = onnx.load(str(graph_path))
        del model.graph.value_info[:]  # intermediate shapes of the written size: inferred per run
        written = {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim)
                   for v in [*model.graph.input, *model.graph.output]}  # fmt: skip
        for value in [*model.graph.input, *model.graph.output]:
            value.type.tensor_type.shape.dim[0].dim_param = "rows"
        with tempfile.TemporaryDirectory(prefix="mllm-sizes-") as tmp:
            path = Path(tmp) / graph_path.name
            path.write_bytes(model.SerializeToString())
            session = ort.InferenceSession(str(path), self.session_options(), providers=[CPU_PROVIDER])
        assigned = assigned_node_counts(session)
        if set(assigned) != {CPU_PROVIDER}:
            raise BackendError(f"{graph_path}: nodes assigned to {assigned}, expected only {CPU_PROVIDER}")

        def at(rows: int, values: Sequence[ort.NodeArg]) -> Shapes:
            return {v.name: (rows, *written[v.name][1:]) for v in values}

        return {
            rows: GraphHandle(
                f"{graph_path} ({rows} rows)",
                at(rows, session.get_inputs()),
                at(rows, session.get_outputs()),
                session,
                assigned,
            )
            for rows in sizes
        }

    def run(self, handle: GraphHandle, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return run_session(handle, inputs)

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "provider": CPU_PROVIDER,
            "device_mode": "ort-cpu emulation",
            "threads": self.npu_threads,
            "uint16_accuracy_level": self.uint16_accuracy_level,
            "onnxruntime": ort.__version__,
        }

"""Audit NPU graphs before use: a graph that would silently run in float is refused.

Two checks, at two depths:

- `audit_graph` (static, on the ONNX file): `onnx.checker` full check, static shapes, and every
  MatMul/Gemm consumes DequantizeLinear outputs of quantized data — activations from a
  QuantizeLinear to uint8/uint16/int8/int16, weights from an 8/16-bit integer initializer.
  For QNN HTP every MatMul's output must also be re-quantized (QuantizeLinear), because HTP
  takes a MatMul as an INT8 op only as a whole Q/DQ node unit.
- `integer_kernel_report` (dynamic, ort-cpu): lets onnxruntime optimize the graph exactly as a
  session would, saves the optimized graph and lists which kernels really run: integer kernels
  (QLinearMatMul, MatMulIntegerToFloat, ...) versus float matmuls fed by weights.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

import onnx
import onnxruntime as ort
from onnx import TensorProto

from mllm_deploy.backends.ort_cpu import CPU_PROVIDER, OrtCpuBackend

MATMUL_OPS = frozenset({"MatMul", "Gemm"})
QUANTIZED_DTYPES = frozenset({TensorProto.UINT8, TensorProto.INT8, TensorProto.UINT16, TensorProto.INT16})
# onnxruntime CPU kernels that multiply integer data (after QDQ fusion).
INTEGER_KERNELS = frozenset(
    {"QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulInteger", "QGemm", "QAttention"}
)
# Kernels that multiply float activations: the weights may be stored as integers
# (MatMulNBits dequantizes them block-wise) but the activations are not statically quantized.
FLOAT_MATMUL_KERNELS = frozenset({"MatMul", "Gemm", "FusedMatMul", "FusedGemm", "MatMulNBits"})


class GraphAuditError(Exception):
    """A graph that must not be used: it is invalid or would run (part of) its linears in float."""

    def __init__(self, graph: str, problems: list[str]):
        self.graph = graph
        self.problems = problems
        super().__init__(f"graph {graph} refused:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class AuditReport:
    """What the static audit found in an accepted graph."""

    graph: str
    matmuls: int
    activation_dtypes: dict[str, str]  # matmul name → dtype of its quantized activation
    weight_dtypes: dict[str, str]  # matmul name → dtype of its quantized weight
    quantized_outputs: dict[str, bool]  # matmul name → output re-quantized (Q/DQ unit)
    problems: list[str] = field(default_factory=list)


def _dtype_name(elem_type: int) -> str:
    name: str = TensorProto.DataType.Name(elem_type)
    return name.lower()


def audit_graph(model_path: str | Path, *, require_quantized_outputs: bool = False) -> AuditReport:
    """Check `model_path` and raise GraphAuditError listing every problem, or return the report."""
    name = str(model_path)
    try:
        onnx.checker.check_model(name, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise GraphAuditError(name, [f"onnx.checker: {exc}"]) from exc
    model = onnx.load(name, load_external_data=False)
    graph = model.graph
    problems: list[str] = []

    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        if not dims or any(d.dim_value <= 0 for d in dims):
            problems.append(f"{value.name}: shape is not static")

    initializers = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for inp in node.input:
            consumers.setdefault(inp, []).append(node)

    activation_dtypes: dict[str, str] = {}
    weight_dtypes: dict[str, str] = {}
    quantized_outputs: dict[str, bool] = {}
    matmuls = [n for n in graph.node if n.op_type in MATMUL_OPS]
    for mm in matmuls:
        label = mm.name or mm.output[0]
        for role, tensor in zip(("activation", "weight"), mm.input[:2], strict=False):
            dq = producer.get(tensor)
            if dq is None or dq.op_type != "DequantizeLinear":
                how = (
                    "a graph input"
                    if dq is None and tensor not in initializers
                    else ("a float initializer" if dq is None else f"{dq.op_type} {dq.name!r}")
                )
                problems.append(
                    f"{label}: {role} input {tensor!r} comes from {how}, not DequantizeLinear (float matmul)"
                )
                continue
            source = dq.input[0]
            if source in initializers:
                dtype = initializers[source].data_type
            elif source in producer and producer[source].op_type == "QuantizeLinear":
                q = producer[source]
                zp = initializers.get(q.input[2]) if len(q.input) > 2 and q.input[2] else None
                dtype = zp.data_type if zp is not None else TensorProto.UINT8
            else:
                problems.append(f"{label}: {role} {tensor!r} dequantizes {source!r}, which is not quantized data")
                continue
            if dtype not in QUANTIZED_DTYPES:
                problems.append(f"{label}: {role} is {_dtype_name(dtype)}, not an 8/16-bit integer type")
                continue
            (activation_dtypes if role == "activation" else weight_dtypes)[label] = _dtype_name(dtype)
        outs = consumers.get(mm.output[0], [])
        quantized_outputs[label] = bool(outs) and all(c.op_type == "QuantizeLinear" for c in outs)
        if require_quantized_outputs and not quantized_outputs[label]:
            problems.append(f"{label}: output is not re-quantized (QNN HTP would not run it as an INT8 op)")

    if not matmuls:
        problems.append("graph has no MatMul/Gemm: nothing for the NPU to do")
    if problems:
        raise GraphAuditError(name, problems)
    return AuditReport(name, len(matmuls), activation_dtypes, weight_dtypes, quantized_outputs)


class FloatMatmul(TypedDict):
    """A matmul kernel that takes float activations, in an `integer_kernel_report`."""

    name: str
    op_type: str
    attributes: dict[str, int]  # its INT attributes, e.g. MatMulNBits' bits and accuracy_level


class KernelReport(TypedDict):
    """What `integer_kernel_report` returns (and `kernels.json` holds per graph kind)."""

    model: str
    provider: str
    op_counts: dict[str, int]
    integer_kernels: dict[str, int]
    float_matmuls: list[FloatMatmul]
    all_linears_integer: bool


def integer_kernel_report(model_path: str | Path, threads: int = 1, uint16_accuracy_level: int = 1) -> KernelReport:
    """Optimize `model_path` with exactly the session options of the `ort-cpu` backend, save
    the optimized graph and report the kernels that really run.

    Returns {"model", "provider", "op_counts", "integer_kernels", "float_matmuls",
    "all_linears_integer"}; `float_matmuls` lists matmul kernels that take float activations
    (with their attributes, e.g. MatMulNBits' bits and accuracy_level).
    """

    backend = OrtCpuBackend(npu_threads=threads, uint16_accuracy_level=uint16_accuracy_level)
    with tempfile.TemporaryDirectory(prefix="mllm-deploy-opt-") as tmp:
        optimized_path = Path(tmp) / "optimized.onnx"
        options = backend.session_options()  # log level 3: the "hardware specific" warning is expected
        options.optimized_model_filepath = str(optimized_path)
        session = ort.InferenceSession(str(model_path), options, providers=[CPU_PROVIDER])
        providers = session.get_providers()
        optimized = onnx.load(str(optimized_path))
    nodes = list(optimized.graph.node)
    op_counts = Counter(n.op_type for n in nodes)
    integer = {op: c for op, c in op_counts.items() if op in INTEGER_KERNELS}
    float_mms: list[FloatMatmul] = [
        {
            "name": n.name,
            "op_type": n.op_type,
            "attributes": {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute if a.type == a.INT},
        }
        for n in nodes
        if n.op_type in FLOAT_MATMUL_KERNELS
    ]
    return {
        "model": str(model_path),
        "provider": providers[0],
        "op_counts": dict(op_counts),
        "integer_kernels": integer,
        "float_matmuls": float_mms,
        "all_linears_integer": bool(integer) and not float_mms,
    }

"""The decode graphs' weights on disk: each graph's linear weights in a data file beside it, where
onnxruntime loads them (ONNX external data) and the CPU side reads rows of them too.

    <dir>/<graph>.onnx          the graph, its linears' initializers pointing into the data file
    <dir>/<graph>.onnx.data     every `<where>.wq` / `.ws` / `.wo` initializer's raw bytes, 64-byte aligned
    <dir>/manifest.json         ..."weights": {graph: {initializer: WeightRef}} (`compile.decode_cache`)

A bundle holds each weight once: the tied embedding's rows are the head's codes and scales (the
head is 8-bit blocks of 32, exactly a GGUF's Q8_0 embedding: `embedding_rows`), and a shadowed
linear's cold rows are the 4-bit step graph's blocks where those reproduce them exactly
(`compile.shadow_store`). Readers need no onnx: a `WeightRef` is a file offset, a shape and a dtype.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mllm_deploy.paths import atomic_write_bytes

if TYPE_CHECKING:  # onnx is loaded only by what saves graphs: bundle checks and readers import this module
    import onnx

DATA_SUFFIX = ".onnx.data"
ALIGN = 64
_WEIGHT_SUFFIXES = (".wq", ".ws", ".wo")


class WeightRef(BaseModel):
    """Where one initializer's bytes sit in its graph's data file."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    offset: int = Field(ge=0)
    """Byte offset in the data file."""
    shape: list[int]
    """Array shape (C order)."""
    dtype: str
    """numpy dtype name (`uint8`, `float32`)."""


def data_file(graph: str) -> str:
    """The data file name of graph `graph` (e.g. `head.onnx.data`)."""
    return f"{graph}{DATA_SUFFIX}"


def save_decode_graph(model: onnx.ModelProto, directory: Path, graph: str) -> dict[str, WeightRef]:
    """Write `model` as `directory/<graph>.onnx` with its linears' weights moved to
    `<graph>.onnx.data` (ONNX external data, which onnxruntime reads); returns where each is."""
    import onnx  # noqa: PLC0415 - deferred: heavy, needed only to write graphs
    from onnx import TensorProto, numpy_helper  # noqa: PLC0415

    directory = Path(directory)
    refs: dict[str, WeightRef] = {}
    chunks: list[bytes] = []
    size = 0
    for tensor in model.graph.initializer:
        if not tensor.name.endswith(_WEIGHT_SUFFIXES):
            continue
        array = numpy_helper.to_array(tensor)
        pad = -size % ALIGN
        chunks.append(b"\0" * pad)
        size += pad
        raw = np.ascontiguousarray(array).tobytes()
        refs[tensor.name] = WeightRef(offset=size, shape=list(array.shape), dtype=array.dtype.name)
        chunks.append(raw)
        size += len(raw)
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", data_file(graph)), ("offset", str(refs[tensor.name].offset)),
                           ("length", str(len(raw)))):  # fmt: skip
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    atomic_write_bytes(directory / data_file(graph), b"".join(chunks))
    onnx.save_model(model, directory / f"{graph}.onnx")
    return refs


def weight_array(directory: Path, graph: str, ref: WeightRef) -> np.ndarray:
    """The initializer at `ref` of `directory/<graph>.onnx.data`, memory-mapped read-only."""
    return np.memmap(Path(directory) / data_file(graph), dtype=ref.dtype, mode="r", offset=ref.offset,
                     shape=tuple(ref.shape))  # fmt: skip

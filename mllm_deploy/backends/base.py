"""The interface every NPU backend implements: load a graph, run it, describe yourself.

What each backend supports is declared once, in `registry`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np


class BackendError(RuntimeError):
    """A backend could not load or run a graph (never silently worked around)."""


@dataclass
class GraphHandle:
    """A loaded graph, ready to run on the backend that loaded it."""

    source: str  # the graph file (or in-memory graph's name) it came from
    inputs: dict[str, tuple[int, ...]]  # float inputs, name → static shape
    outputs: dict[str, tuple[int, ...]]
    impl: Any = field(repr=False)  # the backend's own object (an InferenceSession, ...)
    assigned_nodes: dict[str, int] = field(default_factory=dict)  # provider → nodes it runs


class NpuBackend(Protocol):
    """One processor that runs static-shape linear graphs (the logical `npu`)."""

    name: str

    def load(self, graph_path: Path) -> GraphHandle:
        """Prepare the graph at `graph_path` for repeated runs."""
        ...

    def run(self, handle: GraphHandle, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; `inputs` are float32 [chunk, width] arrays keyed by input name."""
        ...

    def describe(self) -> dict[str, object]:
        """{"name", "provider", "device_mode", "threads", ...}: what really runs the graphs."""
        ...


@runtime_checkable
class StaticRowsLoader(Protocol):
    """A backend that loads a QDQ graph at several static row counts sharing its weights (the
    tail chunks' graphs: the same nodes and weights, another static first dimension)."""

    def load_sizes(self, graph_path: Path, sizes: Sequence[int]) -> dict[int, GraphHandle]:
        """Prepare the graph at `graph_path` at each row count of `sizes`: rows → handle."""
        ...


@runtime_checkable
class ContextCompiler(Protocol):
    """A backend that compiles graphs ahead of time into context binaries for a target SoC
    (those whose registry entry says `context_binaries`)."""

    def compile_context(self, graph_path: Path, context_path: Path) -> Path:
        """Compile the graph at `graph_path`; returns the model file that loads the binary."""
        ...


def check_inputs(handle: GraphHandle, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Exactly the graph's inputs, float32, C-contiguous, static shapes; BackendError otherwise."""
    if set(inputs) != set(handle.inputs):
        raise BackendError(f"{handle.source}: expected inputs {sorted(handle.inputs)}, got {sorted(inputs)}")
    checked = {}
    for name, shape in handle.inputs.items():
        value = np.ascontiguousarray(inputs[name], dtype=np.float32)
        if value.shape != shape:
            raise BackendError(f"{handle.source}: input {name!r} has shape {value.shape}, graph needs {shape}")
        checked[name] = value
    return checked

"""The one table of a block's linear layers: which linears read the same input and so run as one
static NPU graph (a *graph kind*), what that input is called, which weights they use, and their
shapes from the model config. The plan, the compiler, the calibration, the runtime's kernels and
the memory budget all read it; none spells the kinds out again.

    for group in LINEAR_GROUPS:                       # qkv, o_proj, gate_up, down (data-flow order)
        group.kind, group.graph_input, group.linears  # "qkv", "x_norm", ("attn_q", "attn_k", "attn_v")
    group_shapes(spec, "gate_up")                     # {"ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden)}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from mllm_deploy.model.spec import LayerWeights, ModelSpec

GraphKind = Literal["qkv", "o_proj", "gate_up", "down"]
"""A group of linears that read one input, run as one static NPU graph (and one plan subgraph)."""

LinearName = Literal["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
"""One linear of a block, by its GGUF tensor name (what `ModelSpec.linear_shapes` keys)."""


@dataclass(frozen=True)
class LinearGroup:
    """The linears one graph kind runs, in the order of the graph's outputs."""

    kind: GraphKind
    graph_input: str  # the graph's (and the plan subgraph's) input tensor
    linears: tuple[LinearName, ...]  # GGUF names, in output order
    weights: tuple[str, ...]  # the matching `LayerWeights` attributes

    def weight_arrays(self, layer: LayerWeights) -> tuple[object, ...]:
        """The float32 (out, in) weight matrices of this group in `layer`, in output order."""
        return tuple(getattr(layer, name) for name in self.weights)


LINEAR_GROUPS: tuple[LinearGroup, ...] = (
    LinearGroup("qkv", "x_norm", ("attn_q", "attn_k", "attn_v"), ("wq", "wk", "wv")),
    LinearGroup("o_proj", "attn_out", ("attn_output",), ("wo",)),
    LinearGroup("gate_up", "x_norm", ("ffn_gate", "ffn_up"), ("w_gate", "w_up")),
    LinearGroup("down", "h", ("ffn_down",), ("w_down",)),
)
"""Every linear of a block exactly once, grouped by graph kind, in data-flow order."""

GRAPH_KINDS: tuple[GraphKind, ...] = tuple(group.kind for group in LINEAR_GROUPS)
LINEAR_GROUP: dict[str, LinearGroup] = {group.kind: group for group in LINEAR_GROUPS}

if get_args(GraphKind) != GRAPH_KINDS or sorted(n for g in LINEAR_GROUPS for n in g.linears) != sorted(
    get_args(LinearName)
):  # one fact: the types and the table agree
    raise RuntimeError("LINEAR_GROUPS disagrees with GraphKind / LinearName")


def group_shapes(spec: ModelSpec, kind: str) -> dict[LinearName, tuple[int, int]]:
    """(out, in) of each linear of graph kind `kind`, from the model config, in output order."""
    shapes = spec.linear_shapes()
    return {name: shapes[name] for name in LINEAR_GROUP[kind].linears}


def group_in_features(spec: ModelSpec, kind: str) -> int:
    """Width of the input every linear of `kind` reads."""
    return next(iter(group_shapes(spec, kind).values()))[1]

"""The execution plan: static graphs, the subgraph DAG of one prefill, memory and an estimate."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mllm_deploy.resolve.memory import MemoryBudget

ProcessorName = Literal["cpu", "npu"]
SubgraphKind = Literal[
    "embed",  # token ids -> hidden states (CPU gather)
    "attn_norm",  # residual add + RMSNorm before attention
    "qkv",  # Q, K, V projections
    "attention",  # RoPE, KV-cache append, GQA over every earlier token
    "o_proj",  # attention output projection
    "ffn_norm",  # residual add + RMSNorm before the MLP
    "gate_up",  # silu(x W_gate^T) * (x W_up^T)
    "down",  # MLP down projection
    "shadow",  # CPU float correction for the outliers of one linear's input
    "final_norm",  # residual add + final RMSNorm (last real token)
    "lm_head",  # output projection to vocabulary logits
]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class TensorSpec(_Frozen):
    """One input or output of a subgraph."""

    name: str
    """Tensor name, e.g. `x_norm`."""

    shape: tuple[int, ...]
    """Static shape; the first dimension of chunk tensors is `prefill.chunk_size`."""

    dtype: str
    """Element type at the subgraph boundary: `float32`, `uint8`, `uint16`, `int32`."""

    def render(self) -> str:
        return f"{self.name}:{self.dtype}[{','.join(str(d) for d in self.shape)}]"


class GraphSpec(_Frozen):
    """A static-shape graph the compiler builds once and every chunk reuses (chunk-sharing)."""

    id: str
    """`L{layer}.{kind}`, e.g. `L3.gate_up`."""

    layer: int
    """Transformer layer (-1 for graphs outside the layers, e.g. the output head)."""

    kind: SubgraphKind
    """What the graph computes."""

    processor: ProcessorName
    """Where it runs."""

    weight_bytes: int
    """Bytes of quantized weights and scales the graph holds."""

    ops: int
    """Operations (2 x multiply-accumulates) per chunk."""

    used_by_chunks: int
    """How many chunks of the planned prompt share this one graph."""


class Subgraph(_Frozen):
    """G(chunk, layer, kind): one unit of prefill work placed on one processor."""

    id: str
    """`c{chunk}.L{layer}.{kind}` (`.{linear}` appended for shadow subgraphs)."""

    chunk: int
    """Prompt chunk index."""

    layer: int
    """Transformer layer; -1 before the first layer (embed), `n_layers` after the last."""

    kind: SubgraphKind
    """What it computes."""

    processor: ProcessorName
    """Where it runs."""

    graph: str | None
    """Id of the shared static graph it executes, if any."""

    inputs: list[TensorSpec]
    """Inputs with static shapes and dtypes."""

    outputs: list[TensorSpec]
    """Outputs with static shapes and dtypes."""

    ops: int
    """Operations (2 x multiply-accumulates) it performs."""

    estimate_ms: float
    """Nominal time from the device's peak throughput (a lower bound, not a measurement)."""


class ShadowPlan(_Frozen):
    """Which layers keep CPU outlier correction."""

    policy: Literal["none", "clip", "shadow"]
    """`outliers.policy`."""

    layers: list[int]
    """Layers with at least one shadowed linear."""

    linears: list[str]
    """Shadowed linear inputs as `L{layer}.{kind}` (kind: qkv, o_proj, gate_up, down)."""

    source: Literal["calibration", "provisional"]
    """`calibration`: linear inputs ranked by their measured pruning damage (the residual
    stream's change with only that input on a max-abs grid); `provisional`: no calibration yet —
    kinds in the usual order of that damage, spread over the layers — until `build` measures them."""

    hot_channel_fraction: float
    """Largest share of input channels whose float weight rows stay in memory."""


class Estimate(_Frozen):
    """Prefill time from nominal peak throughput. A lower bound: real kernels, memory traffic
    and synchronisation are slower; `bench` measures the real figure."""

    label: str
    """Says what this number is and is not."""

    prompt_tokens: int
    """Prompt length the estimate is for."""

    npu_ms: float
    """Sum of NPU subgraph estimates."""

    cpu_ms: float
    """Sum of CPU subgraph estimates."""

    sequential_ms: float
    """NPU and CPU work one after the other."""

    overlapped_ms: float
    """Perfect NPU/CPU overlap: the busier processor's total (what out-of-order approaches)."""

    prefill_tokens_per_s: float
    """`prompt_tokens` over the policy's estimate (sequential or overlapped)."""


class Plan(_Frozen):
    """How one profile runs on one device: built by an ordered list of passes."""

    profile_name: str
    """`name` of the profile."""

    model: str
    """Model name and source."""

    target: str
    """Device id."""

    backend: str
    """Resolved NPU backend (`qnn-htp`, `ort-cpu`, `none`)."""

    backend_label: str
    """What plays the NPU, e.g. `ort-cpu emulation (AMX INT8)`."""

    scheduler: str
    """`scheduler.policy`."""

    chunk_size: int
    """Tokens per chunk."""

    prompt_tokens: int
    """Prompt length this plan's DAG is drawn for."""

    n_chunks: int
    """Chunks of `chunk_size` covering the prompt."""

    padded_tokens: int
    """Padding rows over all chunks (the last full chunk, or the tail chunks)."""

    tail_chunk_size: int = 0
    """Rows of the tail graphs this plan may use (`prefill.tail_chunk_size` where the backend can
    load the graphs at that second static size), else 0."""

    chunk_rows: list[int] = Field(default_factory=list)
    """Static rows of each chunk in order: full chunks of `chunk_size`, then any tail chunks."""

    chunk_choice: str = ""
    """How the cost model covered the prompt's last tokens, in words."""

    cpu_threads: int
    """Threads for CPU subgraphs."""

    npu_threads: int
    """Threads of the emulated NPU (ort-cpu), else 0."""

    passes: list[str] = Field(default_factory=list)
    """Passes applied so far, in order."""

    graphs: list[GraphSpec] = Field(default_factory=list)
    """Static graphs to compile (shared by every chunk)."""

    subgraphs: list[Subgraph] = Field(default_factory=list)
    """Every subgraph of the prefill DAG."""

    edges: list[tuple[str, str]] = Field(default_factory=list)
    """Dependencies (from, to): `to` may start when `from` has finished."""

    shadow: ShadowPlan | None = None
    """Shadow outlier execution, after `insert_shadow`."""

    memory: MemoryBudget
    """Bytes per processor."""

    estimate: Estimate | None = None
    """Nominal prefill time, after `schedule`."""

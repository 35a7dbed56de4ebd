"""CPU decode with INT8 weights: one onnxruntime graph per token (MatMulNBits + GroupQueryAttention).

The graphs and their 8-bit blocks are built by the compiler (`compile.decode_graphs`, see there
for what a token runs and why blocks of 64; cached on disk by `compile.decode_cache`); this module
runs them over a KV cache.

The KV cache's heads-major layout is GroupQueryAttention's BNSH, so each layer's past and present
K/V are bound (onnxruntime IO binding) to the same numpy buffer the prefill writes: the graph
reads the cache where it lies and appends one position, nothing is copied. The head is its own
graph because the DAG prefill uses it too for the last prompt token's logits. A decoder opens
the step graph its caches need (`step` over float32, `step_kv8` over int8).

Why one graph: the earlier form (a graph per layer, attention in numpy between them) spent
~16 ms of a 27 ms token in 32 onnxruntime calls and ~11 ms in numpy attention at 1,024 tokens
of context (cProfile, 64 tokens); one call lets onnxruntime's threads stay busy across layers.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mllm_deploy.compile.decode_graphs import kv_names, kv_scale_names
from mllm_deploy.forward.kv_cache import KVCache
from mllm_deploy.forward.rope import RopeTables
from mllm_deploy.model.spec import ModelSpec
from mllm_deploy.runtime.file_rows import FileRows


def _graph_attribute(graphs: Path | dict, attribute: str, key: str) -> int:
    """A `MatMulNBits` attribute of the step graph's weights: a cached directory's manifest says it
    (`key`), built graphs carry it in their nodes."""
    if isinstance(graphs, dict):
        step = graphs["step"] if "step" in graphs else graphs["step_kv8"]
        return next(a.i for n in step.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
                    if a.name == attribute)  # fmt: skip
    return int(json.loads((Path(graphs) / "manifest.json").read_text())[key])


def graph_block(graphs: Path | dict) -> int:
    """Values per block of decode graphs' weights."""
    return _graph_attribute(graphs, "block_size", "block")


def graph_bits(graphs: Path | dict) -> int:
    """Bits per weight of decode graphs' step (`decode.weight_bits`)."""
    return _graph_attribute(graphs, "bits", "bits")


class _CacheBinding:
    """The step graph's IO binding onto one KVCache: past and present K/V of every layer are the
    cache's own buffers (and its scales, for int8); the small per-token inputs live in arrays
    rewritten in place."""

    def __init__(self, session: ort.InferenceSession, cache: KVCache, rope: RopeTables, hidden: int):
        self.cache_arrays = (cache.k, cache.v)
        self.rope_tables = (rope.cos, rope.sin)
        self.x = np.zeros((1, 1, hidden), np.float32)
        self.seqlens_k = np.zeros(1, np.int32)
        self.total_length = np.zeros((), np.int32)
        self.x_final = np.zeros((1, 1, hidden), np.float32)
        self.io = session.io_binding()
        self._values: list[ort.OrtValue] = []  # they must outlive the binding
        for name, array in (("x", self.x), ("seqlens_k", self.seqlens_k), ("total_length", self.total_length),
                            ("cos", rope.cos), ("sin", rope.sin)):  # fmt: skip
            self.io.bind_ortvalue_input(name, self._share(array))
        for layer in range(cache.n_layers):
            past_k, past_v, present_k, present_v = kv_names(layer)
            for array, past, present in (
                (cache.k[layer][None], past_k, present_k),
                (cache.v[layer][None], past_v, present_v),
            ):
                value = self._share(array)
                self.io.bind_ortvalue_input(past, value)
                self.io.bind_ortvalue_output(present, value)
            if cache.scales is not None:
                for scales, name in zip((cache.scales.k, cache.scales.v), kv_scale_names(layer), strict=True):
                    self.io.bind_ortvalue_input(
                        name, self._share(np.ascontiguousarray(scales[layer][None, :, None, :]))
                    )
        self.io.bind_ortvalue_output("x_final", self._share(self.x_final))

    def _share(self, array: np.ndarray) -> ort.OrtValue:
        """An OrtValue over `array`'s own memory (no copy), kept alive with the binding."""
        value = ort.OrtValue.ortvalue_from_numpy(array)
        self._values.append(value)
        return value

    def serves(self, cache: KVCache, rope: RopeTables) -> bool:
        """Still bound to this cache's buffers and the current RoPE tables."""
        return (self.cache_arrays[0] is cache.k and self.cache_arrays[1] is cache.v
                and self.rope_tables[0] is rope.cos and self.rope_tables[1] is rope.sin)  # fmt: skip


class Int8Decoder:
    """Decode steps over a KVCache with the step graph; `decode_step` mirrors FloatEngine's."""

    def __init__(self, spec: ModelSpec, tok_embd: np.ndarray, rope: RopeTables, graphs: Path | dict, threads: int):
        self.spec = spec
        self.tok_embd = tok_embd if isinstance(tok_embd, FileRows) else FileRows(tok_embd)  # [vocab, hidden]
        self.rope = rope
        self.threads = threads
        self.block, self.bits = graph_block(graphs), graph_bits(graphs)
        self.name = f"cpu-int{self.bits}-ort-gqa b{self.block}"  # what decodes, as reports and the bench show it
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Spinning keeps the pool's threads awake between the ~60 small kernels of a token
        # (decode runs alone, so they take no core from other work); measured per layer on this
        # host at 2 threads: 107 us spinning, 214 us without.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if threads > 1 else "0")
        # ...but not after a run: a pool still spinning steals the cores from the next session
        # (the head after the step) or from Python
        options.add_session_config_entry("session.force_spinning_stop", "1")
        options.enable_cpu_mem_arena = False  # [1, width] tensors: an arena costs RSS and saves little
        options.enable_mem_pattern = False
        options.log_severity_level = 3
        self._options, self._graphs = options, graphs
        self.sessions: dict[str, ort.InferenceSession] = {}  # opened on first use: a float32 or int8 KV step, the head
        self._session("head")
        # One binding per live cache, dropped with it: a binding holds its cache's buffers, so a
        # plain attribute kept the previous cache's K/V (50 MB at 1,024 positions) alive while
        # the next cache was filled, which was the bench's peak RSS from its second run on.
        self._bindings: weakref.WeakKeyDictionary[KVCache, _CacheBinding] = weakref.WeakKeyDictionary()

    def _session(self, name: str) -> ort.InferenceSession:
        if name not in self.sessions:
            graphs = self._graphs
            source = (
                graphs[name].SerializeToString() if isinstance(graphs, dict) else str(Path(graphs) / f"{name}.onnx")
            )
            self.sessions[name] = ort.InferenceSession(source, self._options, providers=["CPUExecutionProvider"])
        return self.sessions[name]

    def lm_head(self, x_final: np.ndarray) -> np.ndarray:
        """x_final [1, hidden] (already normed) -> logits [1, vocab]."""
        x = np.ascontiguousarray(x_final, np.float32).reshape(1, self.spec.hidden)
        return self.sessions["head"].run(["logits"], {"x_final": x})[0]

    def decode_step(self, cache: KVCache, token_id: int) -> np.ndarray:
        """Append one token at position `cache.length`; return next-token logits [vocab]."""
        pos = cache.length
        if pos >= cache.capacity:
            raise ValueError("KV cache full")
        cache.reserve(pos + 1)
        self.rope.ensure(max(pos + 1, cache.allocated))
        step = self._session("step" if cache.scales is None else "step_kv8")
        binding = self._bindings.get(cache)
        if binding is None or not binding.serves(cache, self.rope):
            self._bindings.pop(cache, None)  # a grown cache: let the old buffers go first
            binding = self._bindings[cache] = _CacheBinding(step, cache, self.rope, self.spec.hidden)
        binding.x[0, 0] = self.tok_embd[int(token_id)]
        binding.seqlens_k[0] = pos
        binding.total_length[...] = pos + 1
        step.run_with_iobinding(binding.io)
        cache.advance([int(token_id)])
        return self.lm_head(binding.x_final)[0]

"""Prefill attention of a chunk over every earlier position: onnxruntime's GroupQueryAttention kernel.

    out = chunk_attention(q, keys, values, start, n_kv_heads)
    # q [T, heads, head_dim] rotated, row t at position start + t
    # keys, values [kv_heads, L, head_dim] (L = start + real rows) -> out [T, heads * head_dim]

Both paths attend with this kernel (the float baseline and the NPU path's CPU side, through
`layers.causal_attention`). It is onnxruntime's CPU `com.microsoft.GroupQueryAttention` (the
decode graphs' op), in a one-node graph built in memory: per query head one GEMM for the scores,
a fused vectorised softmax over each row's visible keys, one GEMM with the values, and the output
written straight into `[T, heads * head_dim]` rows (no transposes). Against the numpy kernel it
replaced (grouped heads in one matmul per KV head, -inf mask, numpy `exp`, normalise after PV),
measured by `scripts/bench_attention.py` (numbers in docs/method.md, "Prefill attention"): numpy's
`exp` alone costs ~0.45 ns an element, its max/subtract/sum passes each stream the whole score
matrix through memory, and onnxruntime's softmax does all of it in one pass per row.

How a chunk is fed:

- The query rows run in blocks of `ROW_BLOCK`: a block sees keys up to its last row only, so the
  chunk's own keys that lie in every row's future (half the chunk-by-chunk square) are never
  multiplied, and a block's score rows stay in the core's cache.
- Past and present K/V share one scratch buffer `[1, kv_heads, positions, head_dim]` per thread
  (the op's "past_present_share_buffer" mode): the earlier positions are copied into it once per
  call (the cache is `[kv_heads, capacity, head_dim]`, so a layer's window is strided), each
  block's own rows are written into it by the kernel, and the next block reads them there.
- Padding rows of a padded chunk (rows n_real..T-1; no key of theirs is real) see every real key,
  as before: an additive bias puts -inf on the padding keys' columns. (With a window, a padding
  row sees the real keys its window reaches; none: its output is zeros.)
- Threads: as many as BLAS may use at the call (`threadpoolctl`), so the DAG's CPU tasks (one
  BLAS thread each, two side by side) run it on their own thread, and the float engine's
  sequential forward on all of `cpu_threads` (onnxruntime splits the heads between them).

Room for other models: `scale` (default 1/sqrt(head_dim)) and `window` (sliding-window attention:
each query sees its `window` most recent positions, itself included, as Hugging Face's
`sliding_window`) are parameters of the kernel. onnxruntime's kernel takes head dims that are
multiples of 8 (64, 128, 256 ...); others (tests' tiny models), and chunks of fewer than
`ORT_MIN_ROWS` rows, run the same attention in numpy.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from threadpoolctl import ThreadpoolController

ROW_BLOCK = 128
"""Query rows per kernel call (see the module docstring; measured by scripts/bench_attention.py)."""

ORT_HEAD_DIM_MULTIPLE = 8
"""onnxruntime's kernel needs head_dim a multiple of this; other head dims run the numpy version."""

ORT_MIN_ROWS = 24
"""Fewer query rows (a decode step's one) run the numpy version: onnxruntime's ~70 us a call
cost more than it saves (measured, thread CPU time, L = 256 / 1,024: 1 row 44 / 169 us numpy,
113 / 241 us onnxruntime; 16 rows 203 / 749 vs 236 / 719; 32 rows 370 / 1,505 vs 361 / 1,396)."""

MS_DOMAIN = "com.microsoft"
OPSET = 21


@dataclass(frozen=True)
class _Layout:
    n_heads: int
    n_kv_heads: int
    head_dim: int
    scale: float
    window: int | None
    threads: int


def chunk_attention(
    q: np.ndarray,
    keys: np.ndarray,
    values: np.ndarray,
    start: int,
    n_kv_heads: int,
    *,
    scale: float | None = None,
    window: int | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """Causal grouped-query attention of a chunk over every earlier position and within itself.

    q [T, n_heads, head_dim] float32, rotated, row t at position `start + t`; keys, values
    [n_kv_heads, L, head_dim] (positions 0 .. L-1, L = start + real rows, any strides). Query t
    sees keys j <= start + t (and j > start + t - window with `window`); padding rows
    (start + t >= L) see every real key and are for the caller to discard. `threads`: default,
    the BLAS limit in force. Returns [T, n_heads * head_dim] float32.
    """
    n_rows, n_heads, head_dim = q.shape
    n_keys = keys.shape[1]
    n_real = n_keys - start
    if keys.shape != (n_kv_heads, n_keys, head_dim) or values.shape != keys.shape:
        raise ValueError(f"keys {keys.shape} / values {values.shape} for q {q.shape} and {n_kv_heads} KV heads")
    if not 1 <= n_real <= n_rows or n_heads % n_kv_heads:
        raise ValueError(f"{n_real} real rows of {n_rows} at start {start}, {n_heads} heads over {n_kv_heads}")
    if window is not None and window < 1:
        raise ValueError(f"attention window must be >= 1, got {window}")
    layout = _Layout(
        n_heads,
        n_kv_heads,
        head_dim,
        float(1.0 / np.sqrt(head_dim)) if scale is None else float(scale),
        window,
        max(1, threads if threads is not None else _blas_threads()),
    )
    if head_dim % ORT_HEAD_DIM_MULTIPLE or n_rows < ORT_MIN_ROWS:
        return _numpy_attention(q, keys, values, start, layout)
    return _kernel(layout)(q, keys, values, start)


def _numpy_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, start: int, layout: _Layout) -> np.ndarray:
    """The same attention in numpy (head dims onnxruntime's kernel refuses): per KV head one
    matmul over its group's query rows, -inf on the hidden keys, exp, weights times values, then
    normalised."""
    n_rows, n_heads, head_dim = q.shape
    kv_heads, n_keys = layout.n_kv_heads, keys.shape[1]
    group = n_heads // kv_heads
    q_grouped = q.reshape(n_rows, kv_heads, group, head_dim).transpose(1, 2, 0, 3) * np.float32(layout.scale)
    scores = q_grouped.reshape(kv_heads, group * n_rows, head_dim) @ keys.transpose(0, 2, 1)  # [kv, group*T, L]
    position = start + np.arange(n_rows)[:, None]  # [T, 1]
    hidden = np.arange(n_keys)[None, :] > position  # [T, L]
    if layout.window is not None:
        hidden |= np.arange(n_keys)[None, :] <= position - layout.window
    scores.reshape(kv_heads, group, n_rows, n_keys)[..., hidden] = -np.inf
    row_max = scores.max(axis=-1, keepdims=True)
    row_max[row_max == -np.inf] = 0.0  # a padding row whose window holds no real key: zeros, as onnxruntime
    scores -= row_max
    np.exp(scores, out=scores)
    out = scores @ values  # [kv, group*T, head_dim]
    weight = scores.sum(axis=-1, keepdims=True)
    out /= np.where(weight > 0, weight, np.float32(1.0))
    return out.reshape(kv_heads, group, n_rows, head_dim).transpose(2, 0, 1, 3).reshape(n_rows, n_heads * head_dim)


class _Kernel:
    """One onnxruntime session of the one-node GroupQueryAttention graph of a head layout."""

    def __init__(self, layout: _Layout):
        # deferred on purpose: onnxruntime is heavy, and only a prefill needs this kernel
        import onnxruntime as ort  # noqa: PLC0415

        self.layout = layout
        options = ort.SessionOptions()
        options.intra_op_num_threads = layout.threads
        options.inter_op_num_threads = 1
        # attention runs among other CPU tasks: a pool spinning between calls would steal their cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        self._ort = ort
        self.session = ort.InferenceSession(
            _model(layout, with_bias=False).SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        self.session_bias = ort.InferenceSession(
            _model(layout, with_bias=True).SerializeToString(), options, providers=["CPUExecutionProvider"]
        )

    def __call__(self, q: np.ndarray, keys: np.ndarray, values: np.ndarray, start: int) -> np.ndarray:
        lay = self.layout
        n_rows, n_keys = q.shape[0], keys.shape[1]
        n_real = n_keys - start
        q_width, kv_width = lay.n_heads * lay.head_dim, lay.n_kv_heads * lay.head_dim
        positions = start + n_rows
        k_window, v_window, own_k, own_v = _buffers(lay.n_kv_heads, positions, lay.head_dim, n_rows)
        k_window[0, :, :start] = keys[:, :start]  # [kv_heads, start, head_dim]
        v_window[0, :, :start] = values[:, :start]
        own_k[:n_real] = keys[:, start:].transpose(1, 0, 2)  # [n_real, kv_heads, head_dim]
        own_v[:n_real] = values[:, start:].transpose(1, 0, 2)
        if n_real < n_rows:  # padding keys: never seen (bias), but finite
            own_k[n_real:] = 0.0
            own_v[n_real:] = 0.0
        q_rows = np.ascontiguousarray(q, np.float32).reshape(1, n_rows, q_width)
        out = np.empty((1, n_rows, q_width), np.float32)
        ort = self._ort
        k_value = ort.OrtValue.ortvalue_from_numpy(k_window)
        v_value = ort.OrtValue.ortvalue_from_numpy(v_window)
        own_k2 = own_k.reshape(1, n_rows, kv_width)
        own_v2 = own_v.reshape(1, n_rows, kv_width)
        for r0 in range(0, n_rows, ROW_BLOCK):
            r1 = min(n_rows, r0 + ROW_BLOCK)
            padded = r1 > n_real
            session = self.session_bias if padded else self.session
            io = session.io_binding()
            feeds: list[tuple[str, Any]] = [
                ("query", q_rows[:, r0:r1]),
                ("key", own_k2[:, r0:r1]),
                ("value", own_v2[:, r0:r1]),
                ("seqlens_k", np.array([start + r1 - 1], np.int32)),
                ("total_sequence_length", np.array(start + r1, np.int32)),
            ]
            if padded:
                bias = np.zeros((1, 1, r1 - r0, start + r1), np.float32)
                bias[..., n_keys:] = -np.inf  # the padding keys' columns
                feeds.append(("attention_bias", bias))
            values_held = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for _, a in feeds]
            for (name, _), value in zip(feeds, values_held, strict=True):
                io.bind_ortvalue_input(name, value)
            io.bind_ortvalue_input("past_key", k_value)
            io.bind_ortvalue_input("past_value", v_value)
            io.bind_ortvalue_output("present_key", k_value)
            io.bind_ortvalue_output("present_value", v_value)
            out_value = ort.OrtValue.ortvalue_from_numpy(out[:, r0:r1])
            io.bind_ortvalue_output("output", out_value)
            session.run_with_iobinding(io)
        return out.reshape(n_rows, q_width)


def _model(layout: _Layout, *, with_bias: bool) -> Any:
    # deferred on purpose: onnx is heavy, and only a prefill needs this graph
    from onnx import TensorProto, helper  # noqa: PLC0415

    f32, i32 = TensorProto.FLOAT, TensorProto.INT32
    q_width, kv_width = layout.n_heads * layout.head_dim, layout.n_kv_heads * layout.head_dim
    cache: list[str | int | None] = [1, layout.n_kv_heads, "positions", layout.head_dim]
    inputs = [
        helper.make_tensor_value_info("query", f32, [1, "rows", q_width]),
        helper.make_tensor_value_info("key", f32, [1, "rows", kv_width]),
        helper.make_tensor_value_info("value", f32, [1, "rows", kv_width]),
        helper.make_tensor_value_info("past_key", f32, cache),
        helper.make_tensor_value_info("past_value", f32, cache),
        helper.make_tensor_value_info("seqlens_k", i32, [1]),
        helper.make_tensor_value_info("total_sequence_length", i32, []),
    ]
    names = [i.name for i in inputs]
    if with_bias:
        inputs.append(helper.make_tensor_value_info("attention_bias", f32, [1, 1, "rows", "total"]))
        names += ["", "", "", "attention_bias"]  # cos_cache, sin_cache, position_ids unused
    outputs = [
        helper.make_tensor_value_info("output", f32, [1, "rows", q_width]),
        helper.make_tensor_value_info("present_key", f32, cache),
        helper.make_tensor_value_info("present_value", f32, cache),
    ]
    node = helper.make_node(
        "GroupQueryAttention",
        names,
        [o.name for o in outputs],
        domain=MS_DOMAIN,
        num_heads=layout.n_heads,
        kv_num_heads=layout.n_kv_heads,
        scale=layout.scale,
        # onnxruntime's window counts the query's own position too (checked against numpy in the tests)
        local_window_size=-1 if layout.window is None else layout.window,
    )
    graph = helper.make_graph([node], "chunk_attention", inputs, outputs)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="mllm-deploy",
    )
    model.ir_version = 10
    return model


_KERNELS: dict[_Layout, _Kernel] = {}
_KERNELS_LOCK = threading.Lock()
_LOCAL = threading.local()
_BLAS: list[Any] = []


def _kernel(layout: _Layout) -> _Kernel:
    kernel = _KERNELS.get(layout)
    if kernel is None:
        with _KERNELS_LOCK:
            kernel = _KERNELS.get(layout)
            if kernel is None:
                kernel = _KERNELS[layout] = _Kernel(layout)
    return kernel


def _blas_threads() -> int:
    """Threads BLAS may use now (the limit a caller set with threadpoolctl, else its default)."""
    if not _BLAS:
        _BLAS.extend(ThreadpoolController().select(user_api="blas").lib_controllers)
    return max((c.get_num_threads() for c in _BLAS), default=1) or 1


def _buffers(
    n_kv_heads: int, positions: int, head_dim: int, n_rows: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """This thread's scratch: K and V windows [1, kv_heads, positions, head_dim], own K and V rows
    [n_rows, kv_heads, head_dim] (grown on demand, reused: fresh megabytes per call fault in)."""
    window = n_kv_heads * positions * head_dim
    own = n_rows * n_kv_heads * head_dim
    need = 2 * window + 2 * own
    buffer = getattr(_LOCAL, "buffer", None)
    if buffer is None or buffer.size < need:
        buffer = _LOCAL.buffer = np.empty(need, np.float32)
    k = buffer[:window].reshape(1, n_kv_heads, positions, head_dim)
    v = buffer[window : 2 * window].reshape(1, n_kv_heads, positions, head_dim)
    own_k = buffer[2 * window : 2 * window + own].reshape(n_rows, n_kv_heads, head_dim)
    own_v = buffer[2 * window + own : need].reshape(n_rows, n_kv_heads, head_dim)
    return k, v, own_k, own_v

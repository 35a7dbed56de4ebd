"""Compare prefill attention kernels on the default model's head layout, in one run.

One chunk of `--chunk` query rows (default 256) against L = start + chunk keys, for each L in
`--keys`, at SmolLM2-135M's layout (9 query heads over 3 KV heads, head_dim 64; `--heads`,
`--kv-heads`, `--head-dim` for another model), on 1 and 2 threads. Candidates, called in turn
round after round so that a busy machine's load falls on all of them alike:

- `numpy`: the kernel before issue 17 (grouped heads in one matmul per KV head, -inf mask,
  numpy exp, normalise after PV), copied here as it was;
- `ort-gqa/rows=N`: `forward.attention.chunk_attention` (onnxruntime's GroupQueryAttention)
  with the query rows in calls of N rows (N = chunk: one call; the runtime uses ROW_BLOCK).

Every candidate's output is checked against the numpy kernel first (max relative difference
printed). GFLOP/s counts the causal work only, 4 * heads * head_dim * (visible keys summed over
the rows), so skipping masked keys is not counted as speed. The last lines sum the chunks of a
whole prompt (`--prompts`): the attention a prefill of that many tokens costs in one layer.

Time: on one thread the calling thread's CPU time (`time.thread_time`: numpy's BLAS and
onnxruntime with one intra-op thread both compute on the calling thread), which a shared, loaded
machine disturbs far less than wall time; on two threads wall time (best of the rounds).

    .venv/bin/python scripts/bench_attention.py [--chunk 256] [--keys 256,512,1024,2048,4096]
        [--threads 1,2] [--rounds 7] [--row-blocks 32,64,128]
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable

import numpy as np
from threadpoolctl import threadpool_limits

from mllm_deploy.forward import attention

Kernel = Callable[[np.ndarray, np.ndarray, np.ndarray, int, int], np.ndarray]

_SCRATCH = threading.local()


def numpy_before(q: np.ndarray, keys: np.ndarray, values: np.ndarray, start: int, n_kv_heads: int) -> np.ndarray:
    """`forward.layers.causal_attention` as it was before issue 17 (commit 7778a3e)."""
    n_rows, n_heads, head_dim = q.shape
    n_keys = keys.shape[1]
    group = n_heads // n_kv_heads
    q_by_head = q.reshape(n_rows, n_kv_heads, group, head_dim).transpose(1, 2, 0, 3)
    q_by_head = q_by_head * np.float32(1.0 / np.sqrt(head_dim))
    q_grouped = q_by_head.reshape(n_kv_heads, group * n_rows, head_dim)
    size = n_kv_heads * group * n_rows * n_keys
    buffer = getattr(_SCRATCH, "buffer", None)
    if buffer is None or buffer.size < size:
        buffer = _SCRATCH.buffer = np.empty(size, np.float32)
    scores = np.matmul(q_grouped, keys.transpose(0, 2, 1), out=buffer[:size].reshape(n_kv_heads, -1, n_keys))
    n_new = n_keys - start
    if n_new > 1:
        future = np.arange(n_new)[None, :] > np.arange(n_rows)[:, None]
        mask = np.where(future, np.float32(-np.inf), np.float32(0.0)).astype(np.float32)
        scores.reshape(n_kv_heads, group, n_rows, n_keys)[..., start:] += mask
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    denom = scores.sum(axis=-1, keepdims=True)
    out = scores @ values
    out /= denom
    out = out.reshape(n_kv_heads, group, n_rows, head_dim).transpose(2, 0, 1, 3)
    return out.reshape(n_rows, n_heads * head_dim)


def ort_gqa(row_block: int, threads: int) -> Kernel:
    def run(q, keys, values, start, n_kv_heads):
        attention.ROW_BLOCK = row_block
        return attention.chunk_attention(q, keys, values, start, n_kv_heads, threads=threads)

    return run


def causal_flops(rows: int, start: int, heads: int, head_dim: int) -> float:
    visible = rows * start + rows * (rows + 1) / 2
    return 4.0 * heads * head_dim * visible


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--keys", default="256,512,1024,2048,4096")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--row-blocks", default="32,64,128", help="rows per call of the onnxruntime kernel (plus one call)")
    ap.add_argument("--prompts", default="1024,4096", help="prompt lengths whose chunks are summed at the end")
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    args = ap.parse_args()
    chunk, heads, kv_heads, dim = args.chunk, args.heads, args.kv_heads, args.head_dim
    lengths = sorted({int(x) for x in args.keys.split(",")} | {
        (c + 1) * chunk for p in args.prompts.split(",") for c in range(int(p) // chunk)})  # fmt: skip
    rng = np.random.default_rng(0)
    print(f"chunk {chunk} rows, {heads} heads over {kv_heads} KV heads, head_dim {dim}; best of {args.rounds} rounds")
    for threads in (int(x) for x in args.threads.split(",")):
        clock = time.thread_time if threads == 1 else time.perf_counter
        kernels: dict[str, Kernel] = {"numpy": numpy_before}
        for rows in sorted({int(x) for x in args.row_blocks.split(",")} | {chunk}):
            kernels[f"ort-gqa/rows={rows}"] = ort_gqa(rows, threads)
        best: dict[tuple[str, int], float] = {}
        with threadpool_limits(limits=threads, user_api="blas"):
            for n_keys in lengths:
                start = n_keys - chunk
                q = rng.standard_normal((chunk, heads, dim), dtype=np.float32)
                keys = 2 * rng.standard_normal((kv_heads, n_keys, dim), dtype=np.float32)
                values = rng.standard_normal((kv_heads, n_keys, dim), dtype=np.float32)
                ref = numpy_before(q, keys, values, start, kv_heads).copy()
                for name, kernel in kernels.items():
                    err = float(np.abs(kernel(q, keys, values, start, kv_heads) - ref).max() / np.abs(ref).max())
                    if err > 1e-5:
                        raise SystemExit(f"{name} at L={n_keys}: max relative difference {err:.2e}")
                for _ in range(args.rounds):
                    for name, kernel in kernels.items():
                        t0 = clock()
                        kernel(q, keys, values, start, kv_heads)
                        t = clock() - t0
                        best[name, n_keys] = min(best.get((name, n_keys), np.inf), t)
        clock_name = "thread CPU time" if threads == 1 else "wall time"
        print(f"\n{threads} thread(s), {clock_name}: ms per chunk (GFLOP/s)")
        print(f"{'L':>6} " + " ".join(f"{name:>22}" for name in kernels))
        for n_keys in (int(x) for x in args.keys.split(",")):
            flops = causal_flops(chunk, n_keys - chunk, heads, dim)
            cells = [f"{best[name, n_keys] * 1e3:9.2f} ({flops / best[name, n_keys] / 1e9:5.1f})" for name in kernels]
            print(f"{n_keys:>6} " + " ".join(f"{c:>22}" for c in cells))
        for prompt in (int(x) for x in args.prompts.split(",")):
            ends = [(c + 1) * chunk for c in range(prompt // chunk)]
            flops = sum(causal_flops(chunk, e - chunk, heads, dim) for e in ends)
            cells = []
            for name in kernels:
                seconds = sum(best[name, e] for e in ends)
                cells.append(f"{seconds * 1e3:9.1f} ({flops / seconds / 1e9:5.1f})")
            print(f"{'p' + str(prompt):>6} " + " ".join(f"{c:>22}" for c in cells) + "   <- one layer's prefill, ms")


if __name__ == "__main__":
    main()

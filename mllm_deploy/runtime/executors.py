"""The two processors as executors: worker threads that run subgraphs and report measured spans.

    completions = queue.Queue()
    npu = ProcessorExecutor("npu", threads=1)            # one in-order queue, as on the hardware
    cpu = ProcessorExecutor("cpu", threads=cpu_threads)
    npu.submit("c0.L0.qkv", work, completions)             # work() runs on the NPU's thread
    msg = completions.get()                                # Started, then Finished (with t_start/t_end)

The work of an `npu` task is an onnxruntime `run()` on the NPU backend (which releases the GIL);
CPU work is numpy (BLAS and ufuncs release the GIL), so the threads really run side by side.
Busy time is measured around each task with `time.perf_counter()`; nothing is estimated.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class TaskStarted:
    task_id: str
    processor: str
    t_start: float


@dataclass(frozen=True)
class TaskFinished:
    task_id: str
    processor: str
    t_start: float
    t_end: float
    error: BaseException | None = None


Completion = TaskStarted | TaskFinished
_STOP = object()


class ProcessorExecutor:
    """`threads` worker threads draining one FIFO of submitted work (threads=1: in order,
    one task at a time). Threads start lazily and live until `shutdown()`."""

    def __init__(self, processor: str, threads: int = 1):
        if threads < 1:
            raise ValueError(f"{processor} executor needs at least one thread, got {threads}")
        self.processor = processor
        self.threads = threads
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.busy_seconds = 0.0  # measured, summed over tasks (all threads)
        self.tasks_run = 0

    def _ensure_started(self) -> None:
        with self._lock:
            while len(self._workers) < self.threads:
                worker = threading.Thread(
                    target=self._loop, name=f"mllm-{self.processor}-{len(self._workers)}", daemon=True
                )
                worker.start()
                self._workers.append(worker)

    def submit(self, task_id: str, work: Callable[[], None], completions: queue.Queue) -> None:
        """Queue `work`; `completions` receives TaskStarted, then TaskFinished."""
        self._ensure_started()
        self._work.put((task_id, work, completions))

    def _loop(self) -> None:
        while True:
            item = self._work.get()
            if item is _STOP:
                return
            task_id, work, completions = item
            t_start = time.perf_counter()
            completions.put(TaskStarted(task_id, self.processor, t_start))
            error = None
            try:
                work()
            except BaseException as exc:
                error = exc
            t_end = time.perf_counter()
            with self._lock:
                self.busy_seconds += t_end - t_start
                self.tasks_run += 1
            completions.put(TaskFinished(task_id, self.processor, t_start, t_end, error))

    def shutdown(self) -> None:
        """Stop the threads after the work already queued."""
        with self._lock:
            workers, self._workers = self._workers, []
        for _ in workers:
            self._work.put(_STOP)
        for worker in workers:
            worker.join()

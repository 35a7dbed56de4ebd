"""Chrome trace-event JSON of a run (opens in Perfetto / chrome://tracing): one lane per processor.

    recorder = TraceRecorder(npu_label="ort-cpu emulation (AMX INT8)")
    for event in session.send(...):
        recorder.observe(event)
    recorder.write(path)

Lanes: "NPU (<what played it>)" and "CPU" (extra lanes "CPU 2", ... only when CPU subgraphs
really overlapped, i.e. cpu_threads > 1). Prefill subgraphs are complete ("X") events with their
measured start and end; each decode step is a slice on the CPU lane from the previous token to
this one; committed chunks and the first token are instant events. Times are microseconds since
the first recorded event.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mllm_deploy.events import ChunkDone, GenerationDone, PrefillDone, SubgraphFinished, TokenEmitted
from mllm_deploy.paths import atomic_write_text

PID = 1
NPU_TID, CPU_TID = 1, 2


class TraceRecorder:
    def __init__(self, npu_label: str | None = None, clock=time.perf_counter):
        self.npu_label = npu_label
        self.clock = clock
        self._spans: list[tuple[str, str, float, float, dict]] = []  # (processor, name, start, end, args)
        self._instants: list[tuple[str, float, dict]] = []
        self._last_mark: float | None = None  # end of prefill or the previous token
        self._saw_subgraphs = False

    def observe(self, event: object, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        if isinstance(event, SubgraphFinished):
            args = {"chunk": event.chunk, "layer": event.layer, "kind": event.kind}
            self._spans.append((event.processor, event.id, event.t_start, event.t_end, args))
            self._saw_subgraphs = True
        elif isinstance(event, ChunkDone):
            if not self._saw_subgraphs:  # the float engine: a chunk is one CPU span
                self._spans.append(
                    ("cpu", f"prefill chunk {event.index + 1}/{event.n_chunks}", now - event.seconds, now, {})
                )
            self._instants.append(
                (f"chunk {event.index + 1}/{event.n_chunks} committed", now, {"tokens": event.tokens})
            )
            self._last_mark = now
        elif isinstance(event, PrefillDone):
            self._last_mark = now
        elif isinstance(event, TokenEmitted):
            if event.index == 0:
                self._instants.append(("first token", now, {"token_id": event.token_id}))
            elif self._last_mark is not None:
                self._spans.append(("cpu", f"decode {event.index}", self._last_mark, now, {"token_id": event.token_id}))
            self._last_mark = now
        elif isinstance(event, GenerationDone):
            self._last_mark = None

    @property
    def span_count(self) -> int:
        return len(self._spans)

    def to_json(self) -> dict:
        times = [s[2] for s in self._spans] + [i[1] for i in self._instants]
        t0 = min(times) if times else 0.0
        us = lambda t: round((t - t0) * 1e6, 3)
        lanes = self._cpu_lanes()
        events: list[dict] = []
        names = {NPU_TID: f"NPU ({self.npu_label})" if self.npu_label else "NPU"}
        for (processor, name, start, end, args), lane in zip(self._spans, lanes, strict=True):
            tid = NPU_TID if processor == "npu" else CPU_TID + lane
            if processor != "npu":
                names[tid] = "CPU" if lane == 0 else f"CPU {lane + 1}"
            events.append(
                {
                    "name": name,
                    "cat": processor,
                    "ph": "X",
                    "pid": PID,
                    "tid": tid,
                    "ts": us(start),
                    "dur": round((end - start) * 1e6, 3),
                    "args": args,
                }
            )
        for name, t, args in self._instants:
            events.append({"name": name, "ph": "i", "s": "p", "pid": PID, "tid": CPU_TID, "ts": us(t), "args": args})
        names.setdefault(CPU_TID, "CPU")
        meta = [{"name": "process_name", "ph": "M", "pid": PID, "args": {"name": "mllm-deploy"}}]
        for tid, label in sorted(names.items()):
            meta.append({"name": "thread_name", "ph": "M", "pid": PID, "tid": tid, "args": {"name": label}})
            meta.append({"name": "thread_sort_index", "ph": "M", "pid": PID, "tid": tid, "args": {"sort_index": tid}})
        return {"traceEvents": meta + events, "displayTimeUnit": "ms"}

    def _cpu_lanes(self) -> list[int]:
        """A lane per span: NPU spans 0; CPU spans packed so no lane holds overlapping spans."""
        order = sorted(range(len(self._spans)), key=lambda i: self._spans[i][2])
        lane_end: list[float] = []
        lanes = [0] * len(self._spans)
        for i in order:
            processor, _, start, end, _ = self._spans[i]
            if processor == "npu":
                continue
            for lane, busy_until in enumerate(lane_end):
                if busy_until <= start:
                    lane_end[lane] = end
                    lanes[i] = lane
                    break
            else:
                lanes[i] = len(lane_end)
                lane_end.append(end)
        return lanes

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_json()))
        return path

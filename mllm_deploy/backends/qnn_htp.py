"""`qnn-htp`: onnxruntime-qnn's HTP backend (Hexagon NPU; Qualcomm's simulator on x86-64).

onnxruntime-qnn 2.x is a plugin execution provider: its library is registered with
onnxruntime once per process, the QNN EP device is picked from `ort.get_ep_devices()`, and a
session gets it through `SessionOptions.add_provider_for_devices(devices, options)`.

Options we set (names as parsed by onnxruntime-qnn's QnnEp):
    backend_type = "htp"           the HTP backend library (libQnnHtp.so)
    htp_arch     = "75" ...        HTP generation the graph is prepared for (68/69/73/75/79/81)
    soc_model    = "57" ...        Qualcomm SoC id (e.g. 43 8 Gen 2, 57 8 Gen 3); optional
    htp_performance_mode           "burst" etc., only where the real NPU is present
and the session config entries
    session.disable_cpu_ep_fallback = "1"   a node QNN cannot take is an error, never silent
                                             CPU execution (this also stops QNN from
                                             offloading the graph-input Q / output DQ to CPU)
    ep.context_enable / ep.context_embed_mode   ahead-of-time context binaries (compile_context)

On x86-64 the same wheel runs graphs in Qualcomm's HTP simulator: bit-faithful to the NPU's
integer arithmetic but hundreds of times slower than the CPU, so only tiny graphs belong there.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mllm_deploy.backends.base import BackendError, GraphHandle, NpuBackend
from mllm_deploy.backends.ort_cpu import RECORD_ASSIGNMENT, run_session, session_handle
from mllm_deploy.backends.registry import HTP_ARCHS

QNN_PROVIDER = "QNNExecutionProvider"

_register_lock = threading.Lock()
_registered = False


_stdout_lock = threading.Lock()


@contextlib.contextmanager
def native_stdout_to_stderr() -> Iterator[None]:
    """Point file descriptor 1 at stderr while QNN's native libraries run: they print log lines
    (e.g. "# LIBNATIVE: No alternate configuration present in libnative_tls.conf ...") to stdout,
    which would corrupt the data a command prints there (`run --json`)."""
    with _stdout_lock:
        sys.stdout.flush()
        saved = os.dup(1)
        try:
            os.dup2(2, 1)
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def register_qnn_plugin() -> None:
    """Register onnxruntime-qnn's EP library with onnxruntime (once per process)."""
    global _registered
    with _register_lock:
        if _registered:
            return
        try:
            # deferred on purpose: onnxruntime-qnn is optional (not on macOS); its absence is a BackendError
            import onnxruntime_qnn  # noqa: PLC0415
        except ImportError as exc:
            raise BackendError("qnn-htp needs the onnxruntime-qnn package (pip install onnxruntime-qnn)") from exc
        try:
            ort.register_execution_provider_library(QNN_PROVIDER, onnxruntime_qnn.get_library_path())
        except Exception as exc:  # onnxruntime raises a plain Fail for a second registration
            if "already registered" not in str(exc):
                raise BackendError(f"cannot register the QNN EP library: {exc}") from exc
        _registered = True


def qnn_ep_devices() -> list[ort.OrtEpDevice]:
    """The OrtEpDevice entries the QNN EP offers (a CPU-type device under the x86 simulator,
    an NPU-type device on a Snapdragon)."""
    register_qnn_plugin()
    return [d for d in ort.get_ep_devices() if d.ep_name == QNN_PROVIDER]


class QnnHtpBackend(NpuBackend):
    """Graphs on QNN HTP with CPU fallback disabled."""

    name = "qnn-htp"

    def __init__(
        self,
        htp_arch: int,
        soc_model: int | None = None,
        performance_mode: str | None = None,
        extra_options: dict[str, str] | None = None,
    ):
        if htp_arch not in HTP_ARCHS:
            raise ValueError(f"htp_arch must be one of {tuple(HTP_ARCHS)}, got {htp_arch}")
        self.htp_arch = htp_arch
        self.soc_model = soc_model
        self.performance_mode = performance_mode
        self.extra_options = dict(extra_options or {})
        devices = qnn_ep_devices()
        if not devices:
            raise BackendError("onnxruntime-qnn is registered but offers no QNN device")
        self.devices = devices
        self.simulated = all(d.device.type != ort.OrtHardwareDeviceType.NPU for d in devices)

    def provider_options(self) -> dict[str, str]:
        options = {"backend_type": "htp", "htp_arch": str(self.htp_arch)}
        if self.soc_model is not None:
            options["soc_model"] = str(self.soc_model)
        if self.performance_mode is not None:
            options["htp_performance_mode"] = self.performance_mode
        options.update(self.extra_options)
        return options

    def session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        options.add_session_config_entry(RECORD_ASSIGNMENT, "1")
        options.log_severity_level = 3
        options.add_provider_for_devices(self.devices, self.provider_options())
        return options

    def load(self, graph_path: Path) -> GraphHandle:
        """Load a QDQ graph (QNN prepares it now) or a context model from `compile_context`."""
        try:
            with native_stdout_to_stderr():
                session = ort.InferenceSession(str(graph_path), self.session_options())
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise BackendError(f"QNN HTP cannot run {graph_path}: {exc}") from exc
        return session_handle(session, graph_path, QNN_PROVIDER)

    def run(self, handle: GraphHandle, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return run_session(handle, inputs)

    def compile_context(self, graph_path: Path, context_path: Path) -> Path:
        """Prepare `graph_path` for this htp_arch/soc_model ahead of time and write a context
        model (one EPContext node with the QNN context binary embedded) to `context_path`,
        atomically. `load(context_path)` then skips QNN graph preparation."""
        context_path = Path(context_path)
        context_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = context_path.with_name(f".{context_path.name}.{os.getpid()}.tmp")
        try:
            compiler = ort.ModelCompiler(
                self.session_options(),
                str(graph_path),
                embed_compiled_data_into_model=True,
                flags=ort.OrtCompileApiFlags.ERROR_IF_NO_NODES_COMPILED,
            )
            with native_stdout_to_stderr():
                compiler.compile_to_file(str(tmp))
            os.replace(tmp, context_path)
        except Exception as exc:
            raise BackendError(f"QNN context compile of {graph_path} failed: {exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)
        return context_path

    def describe(self) -> dict[str, object]:
        import onnxruntime_qnn  # noqa: PLC0415  (present: the constructor registered it)

        mode = f"QNN HTP simulator v{self.htp_arch}" if self.simulated else "QNN HTP device"
        return {
            "name": self.name,
            "provider": QNN_PROVIDER,
            "device_mode": mode,
            "threads": None,  # the HTP runs its own threads; the simulator is single-graph
            "htp_arch": self.htp_arch,
            "soc_model": self.soc_model,
            "onnxruntime": ort.__version__,
            "onnxruntime_qnn": onnxruntime_qnn.__version__,
        }


# --- what a context binary records about the SoC it was compiled for ----------------------------

EP_COMPATIBILITY_KEY = f"ep_compatibility_info.{QNN_PROVIDER}"
"""The model metadata key onnxruntime writes into an EPContext model at compile time."""


@dataclass(frozen=True)
class ContextCompatibility:
    """A context binary's recorded target, from its `ep_compatibility_info` metadata."""

    raw: str  # e.g. "v2:6:2.51.0:5.51.0:75:57:0:0"
    qnn_sdk: str | None  # QNN SDK version that compiled it ("2.51.0"); None: not in a form we read
    htp_arch: int | None  # HTP architecture it was prepared for (75); None: not in a form we read
    soc_model: int | None  # QNN soc_model id (57); None: compiled without one (recorded 0) or unread


def read_context_compatibility(path: Path) -> ContextCompatibility | None:
    """The `ep_compatibility_info` a QNN context model records (None: it records none), read from
    the ONNX file's top-level `metadata_props` without parsing the graph: the protobuf wire format
    is walked over a memory map, and the graph (which embeds the context binary) is skipped by its
    length. The value's fields, as onnxruntime-qnn 2.7.0 (QNN 2.51) writes them and as checked by
    compiling one graph for (arch, soc) = (73, 43), (68, 35), (79, 69) and (75, unset), where only
    the 5th and 6th fields changed: `v2 : ? : QNN SDK : HTP backend : htp_arch : soc_model (0 =
    unset) : ? : ?`. Another leading version gives `htp_arch` None (not in a form we read).
    OSError if the file cannot be read; ValueError if it is not a protobuf message."""
    if Path(path).stat().st_size == 0:
        raise ValueError("the file is empty")
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            for entry in _length_delimited(buf, 0, len(buf), field=14):  # ModelProto.metadata_props
                key = value = b""
                for number, data in _fields(buf, *entry):  # StringStringEntryProto: key = 1, value = 2
                    key, value = (data, value) if number == 1 else (key, data if number == 2 else value)
                if key.decode(errors="replace") == EP_COMPATIBILITY_KEY:
                    return _parse_compatibility(value.decode(errors="replace"))
        except IndexError:
            raise ValueError("the file ends inside a protobuf field") from None
    return None


def _parse_compatibility(raw: str) -> ContextCompatibility:
    parts = raw.split(":")
    if len(parts) < 6 or parts[0] != "v2" or not (parts[4].isdigit() and parts[5].isdigit()):
        return ContextCompatibility(raw, None, None, None)
    return ContextCompatibility(raw, parts[2], int(parts[4]), int(parts[5]) or None)


def _varint(buf: mmap.mmap, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: mmap.mmap, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(field number, bytes) of every length-delimited field of the message in buf[start:end]."""
    for number, (lo, hi) in _walk(buf, start, end):
        yield number, bytes(buf[lo:hi])


def _length_delimited(buf: mmap.mmap, start: int, end: int, *, field: int) -> Iterator[tuple[int, int]]:
    """(start, end) of every length-delimited `field` of the message in buf[start:end]."""
    for number, span in _walk(buf, start, end):
        if number == field:
            yield span


def _walk(buf: mmap.mmap, pos: int, end: int) -> Iterator[tuple[int, tuple[int, int]]]:
    """The length-delimited fields of one protobuf message, as (number, (start, end)); others skipped."""
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(buf, pos)
            yield number, (pos, pos + length)
            pos += length
        else:
            raise ValueError(f"unexpected protobuf wire type {wire} at byte {pos}")

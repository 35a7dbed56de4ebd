"""A strict reader of the GGUF container: metadata, tensor table, raw tensor bytes.

We parse the header ourselves (the published GGUF v2/v3 layout) rather than with
`gguf.GGUFReader`, which builds numpy views for every string of the vocabulary and takes
~3 s to open the default model; this reader takes ~0.1 s and checks every bound, so a
truncated or corrupt file becomes a `UserError` naming the file and the problem.
Dequantization is `gguf.quants.dequantize`.

Layout (little-endian): magic "GGUF", u32 version, u64 tensor count, u64 kv count;
kv pairs (string key, u32 value type, value); tensor infos (string name, u32 n_dims,
u64 dims[n_dims] fastest first, u32 ggml type, u64 offset); padding to `general.alignment`
(default 32); tensor data.
"""

from __future__ import annotations

import contextlib
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, TypeAlias

import gguf
import numpy as np
import numpy.typing as npt

from mllm_deploy.errors import user_error
from mllm_deploy.model.spec import F32Array

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# value type id -> (struct format, size) for scalars; 8 = string, 9 = array
_SCALARS = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}  # fmt: skip
_NUMPY_OF = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "?",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_STRING, _ARRAY = 8, 9

GGUFValue: TypeAlias = "int | float | str | npt.NDArray[np.generic] | list[GGUFValue]"
"""A metadata value: a scalar (bool is an int), a string, a numeric array, or an array of
strings or of arrays."""


class _Truncated(Exception):
    pass


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (slowest first): (out, in) for a linear
    ggml_type: gguf.GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))


class GGUFFile:
    """An opened GGUF file: `metadata` (key -> python value), `tensors` (name -> info)."""

    _pos: int  # the parse cursor: a byte offset in the file

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                size = self.path.stat().st_size
                if size == 0:
                    raise user_error("the file is empty, not a GGUF model", file=str(self.path))
                self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise user_error(f"cannot read the GGUF file: {exc.strerror or exc}", file=str(self.path)) from None
        self.file_bytes = size
        try:
            self._parse()
        except _Truncated:
            raise user_error(
                "truncated GGUF file: the header ends before its metadata does (incomplete download?)",
                file=str(self.path),
            ) from None

    # -- parsing -------------------------------------------------------------------------
    def _take(self, fmt: str, size: int) -> int | float:
        """One little-endian scalar (`fmt` a struct format of `size` bytes) at the cursor."""
        end = self._pos + size
        if end > self.file_bytes:
            raise _Truncated
        value: int | float = struct.unpack_from(fmt, self._map, self._pos)[0]
        self._pos = end
        return value

    def _u32(self) -> int:
        return int(self._take("<I", 4))

    def _u64(self) -> int:
        return int(self._take("<Q", 8))

    def _string(self) -> str:
        n = self._u64()
        end = self._pos + n
        if end > self.file_bytes:
            raise _Truncated
        raw = self._map[self._pos : end]
        self._pos = end
        return raw.decode("utf-8", errors="replace")

    def _value(self, vtype: int) -> GGUFValue:
        if vtype in _SCALARS:
            return self._take(*_SCALARS[vtype])
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            etype = self._u32()
            count = self._u64()
            if etype in _NUMPY_OF:
                dt = np.dtype(_NUMPY_OF[etype])
                end = self._pos + count * dt.itemsize
                if end > self.file_bytes:
                    raise _Truncated
                arr = np.frombuffer(self._map, dtype=dt, count=count, offset=self._pos).copy()
                self._pos = end
                return arr
            if etype == _STRING:
                return [self._string() for _ in range(count)]
            if etype == _ARRAY:
                return [self._value(_ARRAY) for _ in range(count)]
            self._bad(f"unknown array element type {etype}")
        self._bad(f"unknown metadata value type {vtype}")

    def _bad(self, problem: str) -> NoReturn:
        raise user_error(f"corrupt GGUF file: {problem} at byte {self._pos}", file=str(self.path))

    def _parse(self) -> None:
        self._pos = 0
        magic = self._map[:4]
        if magic != GGUF_MAGIC:
            raise user_error(
                f"not a GGUF file: it starts with {bytes(magic)!r}, a GGUF file starts with b'GGUF'",
                file=str(self.path),
            )
        self._pos = 4
        self.version = self._u32()
        if self.version not in (2, 3):
            hint = " (big-endian GGUF files are not supported)" if self.version > 0xFFFF else ""
            raise user_error(f"unsupported GGUF version {self.version}{hint}; supported: 2, 3", file=str(self.path))
        n_tensors = self._u64()
        n_kv = self._u64()
        if n_tensors > self.file_bytes or n_kv > self.file_bytes:
            self._bad(f"implausible counts ({n_tensors} tensors, {n_kv} metadata keys)")
        self.metadata: dict[str, GGUFValue] = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._u32())
        infos: list[tuple[str, tuple[int, ...], int, int]] = []  # name, shape, type id, offset in data
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._u32()
            if n_dims > 4:
                self._bad(f"tensor {name!r} has {n_dims} dimensions")
            dims = [self._u64() for _ in range(n_dims)]
            type_id = self._u32()
            rel_offset = self._u64()
            infos.append((name, tuple(reversed(dims)), type_id, rel_offset))
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0:
            self._bad(f"general.alignment is {alignment!r}, not a positive integer")
        data_start = -(-self._pos // alignment) * alignment
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, shape, type_id, rel_offset in infos:
            try:
                ggml_type = gguf.GGMLQuantizationType(type_id)
                block, type_bytes = gguf.GGML_QUANT_SIZES[ggml_type]
            except (ValueError, KeyError):
                raise user_error(f"tensor {name!r} has unknown ggml type id {type_id}", file=str(self.path)) from None
            n_elements = int(np.prod(shape)) if shape else 1
            if shape and shape[-1] % block:
                self._bad(f"tensor {name!r} row length {shape[-1]} is not a multiple of {ggml_type.name} block {block}")
            n_bytes = n_elements // block * type_bytes
            start = data_start + rel_offset
            if start + n_bytes > self.file_bytes:
                raise user_error(
                    f"truncated GGUF file: tensor {name!r} needs bytes {start}..{start + n_bytes} "
                    f"but the file has {self.file_bytes} bytes (incomplete download?)",
                    file=str(self.path),
                )
            self.tensors[name] = GGUFTensorInfo(name, shape, ggml_type, start, n_bytes)

    # -- access --------------------------------------------------------------------------
    def get(self, key: str, default: object = None) -> object:
        """The metadata value of `key` (a :data:`GGUFValue`), or `default`."""
        return self.metadata.get(key, default)

    def raw(self, name: str) -> npt.NDArray[np.uint8]:
        """The stored bytes of a tensor, shaped (rows..., bytes per row), read-only."""
        info = self.tensors[name]
        rows = info.shape[:-1]
        block, type_bytes = gguf.GGML_QUANT_SIZES[info.ggml_type]
        row_bytes = info.shape[-1] // block * type_bytes
        data = np.frombuffer(self._map, dtype=np.uint8, count=info.n_bytes, offset=info.offset)
        return data.reshape(*rows, row_bytes)

    def dequantize(self, name: str) -> F32Array:
        """A tensor as float32 in numpy order (a linear comes out (out, in))."""
        info = self.tensors[name]
        raw = self.raw(name)
        try:
            if info.ggml_type == gguf.GGMLQuantizationType.F32:
                out = raw.view(np.float32).reshape(info.shape).copy()
            elif info.ggml_type == gguf.GGMLQuantizationType.F16:
                out = raw.view(np.float16).reshape(info.shape).astype(np.float32)
            else:
                out = gguf.quants.dequantize(raw, info.ggml_type).astype(np.float32, copy=False)
        except NotImplementedError:
            raise user_error(
                f"tensor {name!r} has type {info.ggml_type.name}, which the gguf package cannot dequantize",
                file=str(self.path),
            ) from None
        return out.reshape(info.shape)

    def dequantize_rows(self, name: str, rows: npt.NDArray[np.int64]) -> F32Array:
        """Rows `rows` ([n] ids) of a 2-D tensor as float32 [n, columns]; only their bytes are read."""
        info = self.tensors[name]
        raw = self.raw(name)[rows]  # [n, bytes per row], a copy of just these rows
        if info.ggml_type == gguf.GGMLQuantizationType.F32:
            return raw.view(np.float32).reshape(len(rows), info.shape[-1])
        if info.ggml_type == gguf.GGMLQuantizationType.F16:
            return raw.view(np.float16).reshape(len(rows), info.shape[-1]).astype(np.float32)
        try:
            out = gguf.quants.dequantize(raw, info.ggml_type).astype(np.float32, copy=False)
        except NotImplementedError:
            raise user_error(
                f"tensor {name!r} has type {info.ggml_type.name}, which the gguf package cannot dequantize",
                file=str(self.path),
            ) from None
        return out.reshape(len(rows), info.shape[-1])

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # a numpy view still points into the map; the OS frees it later
            self._map.close()

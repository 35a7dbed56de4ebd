"""GGUF weights dequantized when they are used, straight from the file (nothing is written).

What a bundle runs with: its NPU path never reads the float32 linears (the INT8 graphs and the
decode graphs hold them), only the rows of the embedding that prompts use and the norms, so
dequantizing all of them (2.4 s, 660 MB peak RSS for the default model) or writing them to the
weight cache (515 MB) would be waste. Here the 1-D tensors (norms, biases: a few kB) are
dequantized at once and every 2-D tensor is a `GgufTensor`:

    tensor[ids]        rows by id ([T] ints -> [T, columns]): only those rows are read and dequantized
    tensor.T, np.asarray(tensor)    the whole tensor, dequantized on first use and kept

so the float engine (e.g. `eval`'s baseline) works on a full GGUF, paying the dequantization then.
A bundle's GGUF is trimmed (`gguf_trim`): its blocks' linears are absent, each an `AbsentTensor`
that refuses, with the tensor's name, whatever would multiply by it; a tied Q8_0 embedding the
bundle's decode head holds exactly is read from the head's weights (`HeadEmbedding`).
"""

from __future__ import annotations

import threading
from typing import NoReturn, cast

import numpy as np
import numpy.typing as npt

from mllm_deploy.errors import ExitCode, user_error
from mllm_deploy.model import layout
from mllm_deploy.model.gguf_file import GGUFFile
from mllm_deploy.model.gguf_trim import EMBEDDING, EMBEDDING_KEY, EmbeddingInHead, embedding_in_head
from mllm_deploy.model.spec import F32Array, LlamaWeights, ModelSpec


class GgufTensor:
    """A 2-D tensor of an open GGUF file, dequantized by rows or, on first whole use, entirely."""

    dtype = np.dtype(np.float32)
    ndim = 2

    def __init__(self, gfile: GGUFFile, name: str):
        self._file, self.name = gfile, name
        self.shape: tuple[int, ...] = gfile.tensors[name].shape
        self._whole: F32Array | None = None
        self._lock = threading.Lock()  # the DAG's executor threads may ask at once

    def _read_rows(self, rows: npt.NDArray[np.int64]) -> F32Array:
        """float32 [n, columns] of rows `rows` ([n], in range), reading only those."""
        return self._file.dequantize_rows(self.name, rows)

    def _read_whole(self) -> F32Array:
        return self._file.dequantize(self.name)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: object) -> F32Array:
        """Rows by id (an int or an integer array), reading only those rows; anything else
        indexes the whole (dequantized) tensor."""
        if self._whole is None and isinstance(index, (int, np.integer, list, np.ndarray)):
            ids = np.asarray(index)
            if ids.dtype.kind in "iu":
                flat = np.atleast_1d(ids).astype(np.int64).ravel()
                if flat.size and not (flat.min() >= -self.shape[0] and flat.max() < self.shape[0]):
                    raise IndexError(f"row index outside the {self.shape[0]} rows of {self.name}")
                rows = self._read_rows(flat % self.shape[0])
                return rows[0] if ids.ndim == 0 else rows.reshape(*ids.shape, self.shape[1])
        return cast("F32Array", self.whole()[index])  # type: ignore[call-overload]  # numpy indexing of any kind

    def whole(self) -> F32Array:
        """The whole tensor as float32 (dequantized once)."""
        with self._lock:
            if self._whole is None:
                self._whole = self._read_whole()
            return self._whole

    def __array__(self, dtype: object = None, copy: object = None) -> F32Array:
        whole = self.whole()
        return whole if dtype is None else whole.astype(dtype)  # type: ignore[call-overload]

    @property
    def T(self) -> F32Array:  # numpy's name, so `x @ w.T` works unchanged
        return self.whole().T


class HeadEmbedding(GgufTensor):
    """A tied embedding a bundle's trimmed GGUF leaves out, read from the decode head's weights
    (`gguf_trim.EmbeddingInHead`): row r = (codes[r] - 128) * scales[r] per block, in float32, which
    is gguf's own Q8_0 arithmetic (d * q), so the rows are the same bit for bit (checked by the build)."""

    def __init__(self, gfile: GGUFFile, where: EmbeddingInHead):
        self._file, self.name = gfile, EMBEDDING
        self.shape = (where.rows, where.columns)
        self._whole = None
        self._lock = threading.Lock()
        path = gfile.path.parent / where.file
        blocks = -(-where.columns // where.block)
        try:
            self._codes = np.memmap(path, np.uint8, "r", where.codes_offset, (where.rows, blocks * where.block))
            self._scales = np.memmap(path, np.float32, "r", where.scales_offset, (where.rows, blocks))
        except (OSError, ValueError) as exc:
            raise user_error(f"cannot read the embedding rows from {where.file}: {exc}", file=str(gfile.path),
                             key=EMBEDDING_KEY, exit_code=ExitCode.CANNOT_RUN) from None  # fmt: skip
        self._block = where.block

    def _decode(self, codes: npt.NDArray[np.uint8], scales: npt.NDArray[np.float32]) -> F32Array:
        n, width = codes.shape
        values = codes.reshape(n, -1, self._block).astype(np.float32) - np.float32(128.0)  # q, exactly
        rows: F32Array = (values * scales[:, :, None]).reshape(n, width)[:, : self.shape[1]]
        return rows

    def _read_rows(self, rows: npt.NDArray[np.int64]) -> F32Array:
        return self._decode(np.asarray(self._codes[rows]), np.asarray(self._scales[rows]))

    def _read_whole(self) -> F32Array:
        return self._decode(np.asarray(self._codes), np.asarray(self._scales))


class AbsentTensor:
    """A block linear a trimmed bundle model leaves out (`gguf_trim`): its INT8 graphs, decode graphs
    and shadow rows hold it, so a bundle's run never multiplies by it; anything that would (the float
    engine, e.g. `eval`'s float baseline) gets a located error instead of wrong numbers."""

    dtype = np.dtype(np.float32)
    ndim = 2

    def __init__(self, gfile: GGUFFile, name: str, shape: tuple[int, ...]):
        self.path, self.name, self.shape = gfile.path, name, shape

    def __len__(self) -> int:
        return self.shape[0]

    def _refuse(self) -> NoReturn:
        raise user_error(
            "this bundle's model leaves out its blocks' linear weights (its graphs hold them), so the "
            "float32 engine (e.g. `eval`'s float baseline) cannot run from it",
            file=str(self.path), key=self.name,
            hint="run `eval` with the profile the bundle was built from (it has the original model)",
            exit_code=ExitCode.CANNOT_RUN,
        )  # fmt: skip

    def __getitem__(self, index: object) -> F32Array:
        self._refuse()

    def __array__(self, dtype: object = None, copy: object = None) -> F32Array:
        self._refuse()

    @property
    def T(self) -> F32Array:
        self._refuse()


def on_demand_weights(spec: ModelSpec, gfile: GGUFFile) -> LlamaWeights:
    """LlamaWeights over the open GGUF file `gfile` whose 2-D tensors are `GgufTensor`s (see the
    module docstring). The file stays open (memory-mapped) as long as the weights live."""

    in_head = embedding_in_head(gfile)

    def read(name: str) -> F32Array:
        if name == EMBEDDING and in_head is not None:
            return cast("F32Array", HeadEmbedding(gfile, in_head))
        if name not in gfile.tensors:  # a trimmed bundle model's block linear (the graphs hold it)
            return cast("F32Array", AbsentTensor(gfile, name, layout.expected_tensors(spec, "gguf")[name]))
        if len(gfile.tensors[name].shape) == 1:
            return gfile.dequantize(name)
        # typed as an array for LlamaWeights: it supports what the engines do with one
        # (rows by id, `.T`, `np.asarray`), and fails loudly on anything else
        return cast("F32Array", GgufTensor(gfile, name))

    return layout.assemble_weights(spec, "gguf", read)

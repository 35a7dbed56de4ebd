"""Shadow weight rows on disk: the hot channels' float rows, every other row in the model's own blocks.

The shadow path multiplies, for every input channel holding an outlier in a chunk, the float row
W^T[channel] [out_total] (`runtime.shadow`). Calibration picks the hot channels (those holding
most outliers), whose rows stay in memory; every other channel's row is read on demand. On the
default model ~88% of the rows multiplied are cold ones (measured over three 1k-token texts), so
cold rows cannot be dropped without changing the output. They are stored in the exact form the
model holds them (a GGUF's quantized blocks, re-ordered by input block), from which a row
dequantizes to the same float32 values bit for bit; checked for every row when written.

    shadow/layer{i}_{kind}.json           ShadowIndex: input width, output widths, hot channels, cold sources
    shadow/layer{i}_{kind}.hot.npy        float32 [n_hot, out_total]: W^T rows of the hot channels
    shadow/layer{i}_{kind}.cold{j}.npy    source j (one linear of the group, outputs in graph order):
                                          uint8 [in / block, out_j, block_bytes]: the GGUF blocks of
                                          W_j [out_j, in], column block by column block (`type` a
                                          ggml type), or float32 [in, out_j] = W_j^T (`type` "F32":
                                          a source whose blocks do not reproduce the float rows)

For the default model (Q4_1) the cold blocks take 5/32 of float32's bytes.

In a bundle whose decode step graph holds a group's weights in 4-bit blocks that reproduce its
cold rows exactly (`decode.weight_bits = 4`, blocks of 32: a GGUF's Q4_1 weights), the group's
cold rows are read from that graph's data file instead (`compile.bundle_weights`): one source of
`type` "decode-u4" whose `graph` says where the codes, scales and offsets are (`decode_graph_rows`).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Literal

import gguf
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mllm_deploy.model.gguf_file import GGUFFile
from mllm_deploy.paths import atomic_write_bytes, atomic_write_text

SHADOW_DIR = "shadow"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class GraphBlocks(_Model):
    """Where a linear group's 4-bit blocks sit in a decode graph's data file (`compile.decode_weights`):
    value = scale * code + (offset - 8 * scale), per block of `ColdSource.block` input channels."""

    codes_offset: int = Field(ge=0)
    """Byte offset of the codes, uint8 [out, blocks, block / 2] (two per byte, the first in the low nibble)."""
    scales_offset: int = Field(ge=0)
    """Byte offset of the scales, float32 [out, blocks]."""
    offsets_offset: int = Field(ge=0)
    """Byte offset of the block offsets, float32 [blocks, out]."""
    blocks: int = Field(ge=1)
    """Blocks per output row."""


DECODE_U4 = "decode-u4"
"""`ColdSource.type` of cold rows read from a decode step graph's 4-bit blocks."""


class ColdSource(_Model):
    """Where the cold rows of one linear of the group come from."""

    file: str
    """File name in the shadow directory (for "decode-u4": the decode graph's data file, relative to it)."""
    type: str
    """ggml type name of the stored blocks (`Q4_1`, `Q8_0`, ...), `F32` for float32 W^T rows, or
    "decode-u4" for a decode graph's 4-bit blocks (`graph`)."""
    block: int = Field(ge=1)
    """Input channels per block (1 for F32)."""
    block_bytes: int = Field(ge=1)
    """Bytes per block (4 for F32)."""
    out: int = Field(ge=1)
    """Output width of this linear (of the whole group for "decode-u4")."""
    graph: GraphBlocks | None = None
    """For "decode-u4": where the blocks are."""


class ShadowIndex(_Model):
    """The shadow rows of one graph input (every linear reading it, outputs concatenated)."""

    format: Literal[1] = 1
    """Version of this layout."""
    n_in: int = Field(ge=1)
    """Input channels (rows of W^T)."""
    hot_channels: list[int]
    """Input channels whose float rows are in the hot file, in its row order."""
    hot_file: str
    """File name of the hot rows (float32 [n_hot, out_total])."""
    cold: list[ColdSource]
    """One per linear of the group, in output order."""


def index_path(root: Path, layer: int, kind: str) -> Path:
    return Path(root) / SHADOW_DIR / f"layer{layer}_{kind}.json"


Source = tuple[np.ndarray, np.ndarray | None, gguf.GGMLQuantizationType | None]
"""One linear of a group: float32 W_j [out_j, in], its GGUF raw rows [out_j, row_bytes] or None,
its ggml type or None."""


def write_shadow_rows(
    root: Path, layer: int, kind: str, weight_t: np.ndarray, hot_channels: np.ndarray, sources: list[Source]
) -> None:
    """Write the shadow rows of one graph input under `root/shadow`.

    weight_t: float32 W^T [in, out_total] of the group (what the runtime must reproduce);
    sources: per linear, (W_j float32 [out_j, in], its GGUF raw bytes [out_j, row_bytes] or None,
    its ggml type or None). A source is stored as blocks when they reproduce W_j^T exactly, else as
    float32 rows."""
    shadow = Path(root) / SHADOW_DIR
    shadow.mkdir(parents=True, exist_ok=True)
    stem = f"layer{layer}_{kind}"
    hot = np.asarray(hot_channels, np.int64)
    _save(shadow / f"{stem}.hot.npy", np.ascontiguousarray(weight_t[hot], np.float32))
    cold = []
    for j, (w, raw, qtype) in enumerate(sources):
        name = f"{stem}.cold{j}.npy"
        out_j, n_in = w.shape
        entry = None
        if raw is not None and qtype is not None and qtype.name not in _FLOAT_TYPES:
            block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
            columns = np.ascontiguousarray(raw.reshape(out_j, n_in // block, block_bytes).transpose(1, 0, 2))
            candidate = ColdSource(file=name, type=qtype.name, block=block, block_bytes=block_bytes, out=out_j)
            if np.array_equal(decode_rows(columns, candidate, np.arange(n_in)), w.T):
                _save(shadow / name, columns)
                entry = candidate
        if entry is None:
            _save(shadow / name, np.ascontiguousarray(w.T, np.float32))
            entry = ColdSource(file=name, type="F32", block=1, block_bytes=4, out=out_j)
        cold.append(entry)
    index = ShadowIndex(n_in=weight_t.shape[0], hot_channels=hot.tolist(), hot_file=f"{stem}.hot.npy", cold=cold)
    atomic_write_text(index_path(root, layer, kind), index.model_dump_json())


def _save(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())


def read_index(root: Path, layer: int, kind: str) -> ShadowIndex:
    return ShadowIndex.model_validate_json(index_path(root, layer, kind).read_text(encoding="utf-8"))


# -- decoding rows of W^T from column blocks ---------------------------------------------------


def _scale(half: np.ndarray, slot: np.ndarray, at: int) -> np.ndarray:
    """The float16 at half-word `at` of each channel's block, as float32 [n, out]."""
    return half[slot, :, at].astype(np.float32)


def _nibble(blocks: np.ndarray, slot: np.ndarray, first: int, pos: np.ndarray) -> np.ndarray:
    """The 4-bit value at position `pos` ([n]) of each channel's block, whose nibbles start at byte
    `first` (positions 0..15 in the low nibbles, 16..31 in the high ones): uint8 [n, out]."""
    byte = blocks[slot, :, first + pos % 16]  # [n, out]
    shift = np.where(pos < 16, 0, 4).astype(np.uint8)[:, None]
    return (byte >> shift) & np.uint8(0x0F)


def _q8_0(blocks: np.ndarray, half: np.ndarray, slot: np.ndarray, pos: np.ndarray) -> np.ndarray:
    x = blocks[slot, :, 2 + pos].view(np.int8).astype(np.float32)  # [n, out]
    values: np.ndarray = x * _scale(half, slot, 0)  # gguf: x * d
    return values


def _q4_0(blocks: np.ndarray, half: np.ndarray, slot: np.ndarray, pos: np.ndarray) -> np.ndarray:
    q = _nibble(blocks, slot, 2, pos).astype(np.int8) - np.int8(8)
    values: np.ndarray = _scale(half, slot, 0) * q.astype(np.float32)  # gguf: d * (q - 8)
    return values


def _q4_1(blocks: np.ndarray, half: np.ndarray, slot: np.ndarray, pos: np.ndarray) -> np.ndarray:
    q = _nibble(blocks, slot, 4, pos).astype(np.float32)
    values: np.ndarray = (_scale(half, slot, 0) * q) + _scale(half, slot, 1)  # gguf: (d * q) + m
    return values


_DECODERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1}
"""Types whose single values are read straight from the block, in gguf's own arithmetic order
(so the float32 result is the same bit for bit; `write_shadow_rows` checks every row anyway)."""
_FLOAT_TYPES = frozenset({"F32", "F16", "BF16", "F64"})  # stored as float32 rows (no smaller exact form here)


def decode_rows(columns: np.ndarray, source: ColdSource, channels: np.ndarray) -> np.ndarray:
    """W_j^T rows of `channels` ([n] input channels) from column blocks [in/block, out_j, bytes]
    (or float32 rows [in, out_j] for F32): float32 [n, out_j]."""
    channels = np.asarray(channels, np.int64)
    if source.type == "F32":
        return np.asarray(columns[channels], np.float32)
    block_ids, slot = np.unique(channels // source.block, return_inverse=True)
    return decode_gathered(np.asarray(columns[block_ids]), source, slot, channels % source.block)


def decode_gathered(blocks: np.ndarray, source: ColdSource, slot: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Rows from gathered column blocks [u, out_j, bytes]: channel i is at position `pos[i]` of
    block `slot[i]` ([n] each; channels sharing a block share its read). float32 [n, out_j]."""
    blocks = np.ascontiguousarray(blocks)
    decoder = _DECODERS.get(source.type)
    if decoder is not None and source.block_bytes % 2 == 0:
        return decoder(blocks, blocks.view(np.float16), slot, pos)
    u, out_j, block_bytes = blocks.shape  # any other type: whole blocks dequantized, one value kept
    values = gguf.quants.dequantize(blocks.reshape(u * out_j, block_bytes), gguf.GGMLQuantizationType[source.type])
    picked: np.ndarray = values.reshape(u, out_j, source.block)[slot, :, pos]  # [n, out_j]
    return picked.astype(np.float32, copy=False)


def graph_block_arrays(path: Path, source: ColdSource) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes uint8 [out, blocks * block / 2], scales float32 [out, blocks], offsets float32
    [blocks, out]) of a "decode-u4" source, memory-mapped from the data file at `path`."""
    g = source.graph
    assert g is not None and source.type == DECODE_U4
    out, half = source.out, source.block // 2
    return (np.memmap(path, np.uint8, "r", g.codes_offset, (out, g.blocks * half)),
            np.memmap(path, np.float32, "r", g.scales_offset, (out, g.blocks)),
            np.memmap(path, np.float32, "r", g.offsets_offset, (g.blocks, out)))  # fmt: skip


def decode_graph_rows(
    codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray, block: int, channels: np.ndarray
) -> np.ndarray:
    """W^T rows of `channels` ([n]) from a decode graph's 4-bit blocks: codes uint8 [out, blocks *
    block / 2] (all rows), scales float32 [out, blocks] (all rows), offsets float32 [u, out] (the
    rows of the channels' blocks, in `np.unique(channels // block)` order) -> float32 [n, out].
    In gguf's Q4_1 order, (d * q) + m with d the scale and m = offset - 8 * d: the model's own
    float32 values where the blocks came from its Q4_1 weights (checked before they are used)."""
    channels = np.asarray(channels, np.int64)
    block_ids, slot = np.unique(channels // block, return_inverse=True)
    pos = channels % block
    byte = codes[:, block_ids[slot] * (block // 2) + pos // 2].T  # [n, out]
    q = ((byte >> (4 * (pos % 2)).astype(np.uint8)[:, None]) & np.uint8(0x0F)).astype(np.float32)
    d = scales[:, block_ids[slot]].T  # [n, out]
    m = offsets[slot] - np.float32(8.0) * d
    values: np.ndarray = (d * q) + m
    return values


def gguf_sources(
    gfile: GGUFFile | None, layer: int, linears: tuple[str, ...], weights: tuple[np.ndarray, ...]
) -> list[Source]:
    """The `sources` of `write_shadow_rows` for one group: each linear's float matrix with its GGUF
    blocks when the model is a GGUF file (`gfile`) that holds the tensor 2-D, else None."""
    out: list[Source] = []
    for name, w in zip(linears, weights, strict=True):
        tensor = f"blk.{layer}.{name}.weight"
        info = gfile.tensors.get(tensor) if gfile is not None else None
        if gfile is None or info is None or len(info.shape) != 2:
            out.append((np.asarray(w, np.float32), None, None))
        else:
            out.append((np.asarray(w, np.float32), gfile.raw(tensor), info.ggml_type))
    return out

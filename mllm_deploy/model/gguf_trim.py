"""A GGUF without the blocks' linear weights: what a bundle's CPU side reads of its model.

A bundle's graphs hold every linear of every block (the INT8 prefill graphs, the decode graphs,
the shadow rows), so its run reads from the GGUF only the token embedding (rows by id), the
norms (and biases, if any), an untied output head's tensor, the tokenizer and the chat template.
`write_trimmed_gguf` copies every metadata key and the raw bytes of every other tensor unchanged
(so dequantization, tokenization and templates are identical) and leaves those linears out (the
default model: 98.4 -> 32.1 MB), adding two keys:

    mllm_deploy.linears = "in-graphs"         the block linears are left out on purpose
    mllm_deploy.source_identity = "sha256:…"  the original model's identity (as in the lockfile)

A tied Q8_0 embedding is left out too when the bundle's decode head holds it exactly (8-bit
blocks of 32: `compile.bundle_weights`); a third key then says where its rows are:

    mllm_deploy.token_embd = '{"file": "../decode/head.onnx.data", "codes_offset": …, …}'  (EmbeddingInHead)

A trimmed file runs only from a bundle (`gguf_on_demand`: a left-out linear is a located error
if anything multiplies by it, e.g. `eval`'s float baseline).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mllm_deploy.errors import ExitCode, user_error
from mllm_deploy.model.linears import LINEAR_GROUPS
from mllm_deploy.paths import make_build_dir

if TYPE_CHECKING:  # types only: compile.bundle imports this module, and the CLI must not load gguf
    from mllm_deploy.model.gguf_file import GGUFFile

LINEARS_KEY = "mllm_deploy.linears"
LINEARS_IN_GRAPHS = "in-graphs"
SOURCE_IDENTITY_KEY = "mllm_deploy.source_identity"
EMBEDDING_KEY = "mllm_deploy.token_embd"
EMBEDDING = "token_embd.weight"


class EmbeddingInHead(BaseModel):
    """Where a trimmed GGUF's left-out embedding rows are: 8-bit codes with zero point 128 and one
    float32 scale per block (the decode head's MatMulNBits weights), row r = (codes[r] - 128) * scales[r]."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str
    """The data file, relative to the GGUF's directory (POSIX)."""
    codes_offset: int = Field(ge=0)
    """Byte offset of the codes, uint8 [rows, columns / block, block]."""
    scales_offset: int = Field(ge=0)
    """Byte offset of the scales, float32 [rows, columns / block]."""
    rows: int = Field(ge=1)
    """Rows (the vocabulary)."""
    columns: int = Field(ge=1)
    """Columns (the hidden width)."""
    block: int = Field(ge=1)
    """Values per block (32: a Q8_0 block)."""


def embedding_in_head(gfile: GGUFFile) -> EmbeddingInHead | None:
    """Where `gfile`'s embedding rows are when a bundle left them out (None: the file holds them);
    a malformed key is refused (exit 3) naming the file."""
    value = gfile.get(EMBEDDING_KEY)
    if value is None or EMBEDDING in gfile.tensors:
        return None
    try:
        return EmbeddingInHead.model_validate_json(str(value))
    except ValidationError as exc:
        raise user_error(f"unreadable {EMBEDDING_KEY}: {str(exc).splitlines()[0]}", file=str(gfile.path),
                         key=EMBEDDING_KEY, exit_code=ExitCode.CANNOT_RUN) from None  # fmt: skip


_LINEAR_NAMES = frozenset(name for group in LINEAR_GROUPS for name in group.linears)


def is_block_linear(name: str) -> bool:
    """`blk.<i>.<linear>.weight` of a linear the graphs hold (biases and norms are not)."""
    parts = name.split(".")
    return len(parts) == 4 and parts[0] == "blk" and parts[2] in _LINEAR_NAMES and parts[3] == "weight"


def is_trimmed(gfile: GGUFFile) -> bool:
    """Whether `gfile` was written by `write_trimmed_gguf` (its block linears left out)."""
    return gfile.get(LINEARS_KEY) == LINEARS_IN_GRAPHS


def write_trimmed_gguf(source: Path, dest: Path, identity: str, embedding: EmbeddingInHead | None = None) -> None:
    """Copy the GGUF at `source` to `dest` without the blocks' linear weights (see the module
    docstring), and without the embedding when `embedding` says where its rows are; written to a
    temporary file and renamed into place."""
    import gguf  # noqa: PLC0415 - deferred: heavy, and only `build --out` writes a trimmed file

    reader = gguf.GGUFReader(source)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    if arch is None:
        raise ValueError(f"{source}: no general.architecture")
    dest = Path(dest)
    tmp_dir = make_build_dir(dest.parent, dest.name)
    tmp = tmp_dir / dest.name
    try:
        writer = gguf.GGUFWriter(tmp, arch=str(arch.contents()), endianess=reader.endianess)
        writer.data_alignment = reader.alignment
        for field in reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue  # written by GGUFWriter itself
            if field.name in (LINEARS_KEY, SOURCE_IDENTITY_KEY, EMBEDDING_KEY):
                continue  # trimming a trimmed file: written below
            value_type = field.types[0]
            sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
        writer.add_string(LINEARS_KEY, LINEARS_IN_GRAPHS)
        writer.add_string(SOURCE_IDENTITY_KEY, identity)
        if embedding is not None:
            writer.add_string(EMBEDDING_KEY, embedding.model_dump_json())
        kept = [t for t in reader.tensors
                if not is_block_linear(t.name) and not (embedding is not None and t.name == EMBEDDING)]  # fmt: skip
        for tensor in kept:
            writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                                   tensor.tensor_type)  # fmt: skip
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in kept:
            writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
        writer.close()
        tmp.rename(dest)
    finally:
        for leftover in tmp_dir.iterdir():
            leftover.unlink()
        tmp_dir.rmdir()

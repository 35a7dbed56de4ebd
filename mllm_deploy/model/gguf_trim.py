"""A GGUF without the blocks' linear weights: what a bundle's CPU side reads of its model.

A bundle's graphs hold every linear of every block (the INT8 prefill graphs, the decode graphs,
the shadow rows), so its run reads from the GGUF only the token embedding (rows by id), the
norms (and biases, if any), an untied output head's tensor, the tokenizer and the chat template.
`write_trimmed_gguf` copies every metadata key and the raw bytes of every other tensor unchanged
(so dequantization, tokenization and templates are identical) and leaves those linears out (the
default model: 98.4 -> 32.1 MB), adding two keys:

    mllm_deploy.linears = "in-graphs"         the block linears are left out on purpose
    mllm_deploy.source_identity = "sha256:…"  the original model's identity (as in the lockfile)

A trimmed file runs only from a bundle (`gguf_on_demand`: a left-out linear is a located error
if anything multiplies by it, e.g. `eval`'s float baseline).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mllm_deploy.model.linears import LINEAR_GROUPS
from mllm_deploy.paths import make_build_dir

if TYPE_CHECKING:  # types only: compile.bundle imports this module, and the CLI must not load gguf
    from mllm_deploy.model.gguf_file import GGUFFile

LINEARS_KEY = "mllm_deploy.linears"
LINEARS_IN_GRAPHS = "in-graphs"
SOURCE_IDENTITY_KEY = "mllm_deploy.source_identity"
_LINEAR_NAMES = frozenset(name for group in LINEAR_GROUPS for name in group.linears)


def is_block_linear(name: str) -> bool:
    """`blk.<i>.<linear>.weight` of a linear the graphs hold (biases and norms are not)."""
    parts = name.split(".")
    return len(parts) == 4 and parts[0] == "blk" and parts[2] in _LINEAR_NAMES and parts[3] == "weight"


def is_trimmed(gfile: GGUFFile) -> bool:
    """Whether `gfile` was written by `write_trimmed_gguf` (its block linears left out)."""
    return gfile.get(LINEARS_KEY) == LINEARS_IN_GRAPHS


def write_trimmed_gguf(source: Path, dest: Path, identity: str) -> None:
    """Copy the GGUF at `source` to `dest` without the blocks' linear weights (see the module
    docstring), written to a temporary file and renamed into place."""
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
            if field.name in (LINEARS_KEY, SOURCE_IDENTITY_KEY):
                continue  # trimming a trimmed file: written below
            value_type = field.types[0]
            sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
        writer.add_string(LINEARS_KEY, LINEARS_IN_GRAPHS)
        writer.add_string(SOURCE_IDENTITY_KEY, identity)
        kept = [t for t in reader.tensors if not is_block_linear(t.name)]
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

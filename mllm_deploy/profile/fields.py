"""What the profile models allow, read from the models themselves.

One source for the "allowed" part of error messages, the did-you-mean key lists, the
warnings and the generated reference: nothing here repeats a limit written in models.py.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass
from functools import cache

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from mllm_deploy.profile.models import Profile


@dataclass(frozen=True)
class KeyInfo:
    """One profile key (a leaf value or a section), described for humans."""

    key: str  # dotted, e.g. "prefill.chunk_size"
    kind: str  # "integer", "number", "string", "boolean", "choice", "array of strings", "section"
    allowed: str  # e.g. "an integer from 1 to 4096"
    default: str  # TOML spelling of the default, or "unset"
    doc: str
    choices: tuple[object, ...] = ()  # the Literal choices, when kind == "choice"
    is_section: bool = False


def _unwrap_optional(annotation: object) -> object:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _split_annotated(annotation: object) -> tuple[object, list[object]]:
    """(bare type, constraint objects) of a possibly `Annotated[...]` type."""
    if typing.get_origin(annotation) is typing.Annotated:
        base, *extras = typing.get_args(annotation)
        constraints: list[object] = []
        for extra in extras:
            constraints.extend(extra.metadata if isinstance(extra, FieldInfo) else [extra])
        return base, constraints
    return annotation, []


def _number(value: object) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def _range_text(constraints: list[object]) -> str:
    """`from 1 to 4096`, `> 50 and <= 100`, `>= 0`; empty when unconstrained."""
    low: object = None  # the bounds of annotated_types.Ge/Gt/Le/Lt: numbers
    high: object = None
    low_strict = high_strict = False
    for item in constraints:
        if isinstance(item, annotated_types.Ge):
            low = item.ge
        elif isinstance(item, annotated_types.Gt):
            low, low_strict = item.gt, True
        elif isinstance(item, annotated_types.Le):
            high = item.le
        elif isinstance(item, annotated_types.Lt):
            high, high_strict = item.lt, True
    if low is not None and high is not None and not low_strict and not high_strict:
        return f"from {_number(low)} to {_number(high)}"
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_strict else '>='} {_number(low)}")
    if high is not None:
        parts.append(f"{'<' if high_strict else '<='} {_number(high)}")
    return " and ".join(parts)


def _length_text(constraints: list[object]) -> str:
    low = high = None
    for item in constraints:
        if isinstance(item, annotated_types.MinLen):
            low = item.min_length
        elif isinstance(item, annotated_types.MaxLen):
            high = item.max_length
    if low and high:
        return f"a string of {low} to {high} characters"
    if high:
        return f"a string of at most {high} characters"
    if low:
        return "a non-empty string"
    return "a string"


def toml_literal(value: object) -> str:
    """How `value` is written in a TOML file."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_literal(item) for item in value) + "]"
    return str(value)


def _describe_type(annotation: object, constraints: list[object]) -> tuple[str, str, tuple[object, ...]]:
    """(kind, allowed text, choices) of a leaf field type."""
    annotation, inner = _split_annotated(_unwrap_optional(annotation))
    constraints = constraints + inner
    if typing.get_origin(annotation) is typing.Literal:
        choices = typing.get_args(annotation)
        return "choice", "one of " + ", ".join(toml_literal(c) for c in choices), choices
    if annotation is bool:
        return "boolean", "true or false", ()
    if annotation is int:
        span = _range_text(constraints)
        return "integer", f"an integer {span}".strip(), ()
    if annotation is float:
        span = _range_text(constraints)
        return "number", f"a number {span}".strip(), ()
    if annotation is str:
        return "string", _length_text(constraints), ()
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        _, item_allowed, _ = _describe_type(item, [])
        noun = item_allowed.replace("a string", "string").replace("a non-empty string", "non-empty string")
        return "array of strings", f"an array of {noun}s", ()
    return "value", getattr(annotation, "__name__", str(annotation)), ()


def _section_model(field: FieldInfo) -> type[BaseModel] | None:
    annotation = field.annotation
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return toml_literal(field.get_default(call_default_factory=True))
    return toml_literal(field.default)


@cache
def all_keys() -> dict[str, KeyInfo]:
    """Every key of the profile language, sections included, in model order."""
    out: dict[str, KeyInfo] = {}

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            section = _section_model(field)
            if section is not None:
                names = ", ".join(section.model_fields)
                out[key] = KeyInfo(
                    key=key,
                    kind="section",
                    allowed=f"a table [{key}] with keys {names}",
                    default="",
                    doc=(section.__doc__ or "").strip(),
                    is_section=True,
                )
                walk(section, f"{key}.")
                continue
            kind, allowed, choices = _describe_type(field.annotation, list(field.metadata))
            out[key] = KeyInfo(
                key=key,
                kind=kind,
                allowed=allowed,
                default=_default_text(field),
                doc=(field.description or "").strip(),
                choices=choices,
            )

    walk(Profile, "")
    return out


def keys_in(section: str) -> list[str]:
    """Names (not dotted) of the keys directly inside `section` ("" for the top level)."""
    prefix = f"{section}." if section else ""
    depth = prefix.count(".")
    return [k[len(prefix) :] for k in all_keys() if k.startswith(prefix) and k.count(".") == depth]


def sections() -> list[str]:
    """Dotted names of every section."""
    return [key for key, info in all_keys().items() if info.is_section]

"""pydantic validation errors -> located diagnostics that say what is allowed."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Required, TypedDict

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from mllm_deploy.errors import Diagnostic, Location
from mllm_deploy.profile.fields import KeyInfo, all_keys, keys_in, toml_literal
from mllm_deploy.profile.suggest import did_you_mean, suggest_key

Loc = tuple[int | str, ...]  # a pydantic error's loc, e.g. ("decode", "stop", 0)
Where = Callable[[Loc], Location]  # pydantic loc -> Diagnostic kwargs file, line, col, key


class _Explained(TypedDict, total=False):
    """What a diagnostic says about one pydantic error (Diagnostic kwargs)."""

    message: Required[str]
    allowed: str | None
    hint: str | None


_MAX_VALUE_CHARS = 80
_TYPE_ERRORS = {
    "int_type",
    "int_parsing",
    "float_type",
    "float_parsing",
    "string_type",
    "bool_type",
    "list_type",
    "dict_type",
    "model_type",
    "model_attributes_type",
    "int_from_float",
}
_RANGE_WORDS = {
    "greater_than_equal": (">=", "ge"),
    "greater_than": (">", "gt"),
    "less_than_equal": ("<=", "le"),
    "less_than": ("<", "lt"),
}


def toml_type_name(value: object) -> str:
    """What kind of TOML value `value` is, with an article: "a string", "an array"."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, (datetime.date, datetime.time)):
        return "a date/time"
    return type(value).__name__


def shown_value(value: object) -> object:
    """The offending value as a diagnostic carries it: scalars as they are, the rest shortened."""
    if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict) for v in value)):
        return None  # a whole table: its location says enough
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (str, list)) and len(repr(value)) > _MAX_VALUE_CHARS:
        return repr(value)[: _MAX_VALUE_CHARS - 3] + "..."
    return value


def _key_info(loc: Loc) -> KeyInfo | None:
    field_key = ".".join(str(part) for part in loc if not isinstance(part, int))
    return all_keys().get(field_key)


def _type_hint(value: object, info: KeyInfo | None, name: str) -> str | None:
    """Fixes for the usual type slips: quoted numbers, 256.0 for an integer, a bare string."""
    if info is None:
        return None
    if isinstance(value, str) and info.kind in ("integer", "number"):
        try:
            number = int(value) if info.kind == "integer" else float(value)
        except ValueError:
            return None
        return f"write the number without quotes: {name} = {toml_literal(number)}"
    if isinstance(value, float) and info.kind == "integer" and value.is_integer():
        return f"write a whole number: {name} = {int(value)}"
    if isinstance(value, str) and info.kind == "array of strings":
        return f"write an array: {name} = [{toml_literal(value)}]"
    if info.kind == "string" and isinstance(value, (int, float, bool)):
        return f'quote it: {name} = "{toml_literal(value)}"'
    return None


def _section_shape(value: object, info: KeyInfo) -> tuple[str, str | None]:
    if isinstance(value, list):
        return "must be a table, not an array of tables", f"write [{info.key}], not [[{info.key}]]"
    example = next(iter(keys_in(info.key)), "key")
    return (
        f"must be a table, not {toml_type_name(value)}",
        f"write [{info.key}] on its own line, then its keys, e.g. {example} = ...",
    )


def _unknown_key(loc: Loc, value: object) -> _Explained:
    section = ".".join(str(part) for part in loc[:-1])
    name = str(loc[-1])
    names = ", ".join(keys_in(section))
    return {
        "message": "unknown section" if isinstance(value, dict) else "unknown key",
        "allowed": f"keys of [{section}]: {names}" if section else f"top-level keys and sections: {names}",
        "hint": suggest_key(section, name),
    }


def _explain(error: ErrorDetails) -> _Explained:
    """message / allowed / hint for one pydantic error."""
    kind, loc, value = error["type"], tuple(error["loc"]), error.get("input")
    info = _key_info(loc)
    allowed = info.allowed if info is not None else None
    name = str(loc[-1]) if loc else ""
    if kind == "extra_forbidden":
        return _unknown_key(loc, value)
    if info is not None and info.is_section and kind in _TYPE_ERRORS:
        message, hint = _section_shape(value, info)
        return {"message": message, "allowed": allowed, "hint": hint}
    if kind == "literal_error":
        hint = did_you_mean(value, [str(c) for c in info.choices]) if info and isinstance(value, str) else None
        return {"message": "not an allowed value", "allowed": allowed, "hint": hint}
    if kind in _RANGE_WORDS:
        word, ctx_key = _RANGE_WORDS[kind]
        limit = (error.get("ctx") or {}).get(ctx_key)
        return {"message": f"out of range: must be {word} {toml_literal(limit)}", "allowed": allowed}
    if kind == "finite_number":
        return {"message": "must be a finite number, not nan or inf", "allowed": allowed}
    if kind == "string_too_short":
        return {"message": "must not be empty", "allowed": allowed}
    if kind == "string_too_long":
        return {"message": f"too long ({len(str(value))} characters)", "allowed": allowed}
    if kind in _TYPE_ERRORS:
        item = " of array item" if loc and isinstance(loc[-1], int) else ""
        expected = (allowed or "").split(" from ")[0].split(" >")[0]
        if item and info is not None and info.kind == "array of strings":
            expected = "a non-empty string"
        message = f"wrong type{item}: expected {expected or 'another type'}, got {toml_type_name(value)}"
        return {"message": message, "allowed": allowed, "hint": _type_hint(value, info, name)}
    return {"message": error.get("msg", "invalid value"), "allowed": allowed}


def diagnostics_from_validation(exc: ValidationError, where: Where) -> list[Diagnostic]:
    """One located diagnostic per pydantic error (unsorted; see :func:`in_reading_order`)."""
    out: list[Diagnostic] = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        explained = _explain(error)
        out.append(Diagnostic(value=shown_value(error.get("input")), **explained, **where(loc)))
    return out


def in_reading_order(diagnostics: list[Diagnostic], overrides: tuple[str, ...]) -> list[Diagnostic]:
    """File diagnostics by line and column, then those of `--set` overrides in command-line order."""
    files = [f"--set {text}" for text in overrides]

    def order(diag: Diagnostic) -> tuple[int, ...]:
        if diag.file in files:
            return (1, files.index(diag.file), 0, 0)
        return (0, 0, diag.line is None, diag.line or 0, diag.col or 0)

    return sorted(diagnostics, key=order)

"""`--set dotted.key=value` overrides: parsing and applying them to a parsed profile document.

The value is read as a TOML value (`128`, `0.5`, `true`, `["a", "b"]`, `"quoted"`,
`{chunk_size = 128}` for a whole section); anything that is not a TOML value is taken as a
bare string, so `--set device.npu_backend=none` works. The merged document is then validated
by the models exactly like a file; this module only refuses what cannot be merged at all.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass

from mllm_deploy.errors import Diagnostic
from mllm_deploy.profile.fields import all_keys, keys_in
from mllm_deploy.profile.source import printable
from mllm_deploy.profile.suggest import suggest_key

_KEY_PART = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class Override:
    """One parsed `--set KEY=VALUE`."""

    text: str  # as given on the command line
    key: tuple[str, ...]  # ("prefill", "chunk_size")
    value: object

    @property
    def dotted(self) -> str:
        return ".".join(self.key)


def _diagnostic(
    text: str,
    message: str,
    *,
    key: str | None = None,
    value: object = None,
    allowed: str | None = None,
    hint: str | None = None,
) -> Diagnostic:
    return Diagnostic(message=message, file=f"--set {text}", key=key, value=value, allowed=allowed, hint=hint)


def parse_value(raw: str) -> object:
    """`raw` as a TOML value, or the bare string when it is not one."""
    try:
        document = tomllib.loads(f"value = {raw}")
    except (tomllib.TOMLDecodeError, ValueError, RecursionError):
        return raw.strip()
    if set(document) != {"value"}:  # e.g. "1\nother = 2": not a single value
        return raw.strip()
    return document["value"]


def _check_key(text: str, parts: list[str], value: object) -> Diagnostic | None:
    """Why `parts` cannot be set to `value`, or None; only keys of the profile language pass."""
    known = all_keys()
    for depth in range(1, len(parts) + 1):
        dotted = ".".join(parts[:depth])
        info = known.get(dotted)
        section = ".".join(parts[: depth - 1])
        if info is None:
            allowed = ", ".join(keys_in(section))
            where = f"[{section}]" if section else "the top level"
            return _diagnostic(
                text,
                "unknown key",
                key=".".join(parts),
                allowed=f"keys at {where}: {allowed}" if not section else f"keys of {where}: {allowed}",
                hint=suggest_key(section, parts[depth - 1]),
            )
        if depth < len(parts) and not info.is_section:
            return _diagnostic(text, f"'{dotted}' is a value, not a section", key=".".join(parts))
    info = known[".".join(parts)]
    if info.is_section and not isinstance(value, dict):
        example = next(iter(keys_in(info.key)), "KEY")
        return _diagnostic(
            text,
            f"[{info.key}] is a section, not a value",
            key=info.key,
            value=value,
            allowed=info.allowed,
            hint=f"set one of its keys, e.g. --set {info.key}.{example}=VALUE",
        )
    return None


def parse_override(text: str) -> Override | Diagnostic:
    """One `KEY=VALUE` string as an :class:`Override`, or the diagnostic saying why not."""
    shown = printable(text)
    if shown != text:
        return _diagnostic(shown, "not valid UTF-8 text")
    if "=" not in text:
        return _diagnostic(text, "expected KEY=VALUE", hint="e.g. --set prefill.chunk_size=128")
    raw_key, raw_value = text.split("=", 1)
    parts = [part.strip() for part in raw_key.strip().split(".")]
    if not raw_key.strip():
        return _diagnostic(text, "empty key before '='", hint="e.g. --set prefill.chunk_size=128")
    if not all(_KEY_PART.match(part) for part in parts):
        return _diagnostic(
            text,
            f"not a dotted key: {raw_key.strip()!r}",
            allowed="names of letters, digits, '_' and '-' joined by '.'",
            hint="e.g. --set prefill.chunk_size=128",
        )
    value = parse_value(raw_value)
    problem = _check_key(text, parts, value)
    return problem if problem is not None else Override(text=text, key=tuple(parts), value=value)


def _merge(target: dict[str, object], key: tuple[str, ...], value: object) -> None:
    """Set `key` in `target` to `value`, copying (never mutating) the tables on the way."""
    node = target
    for part in key[:-1]:
        child = node.get(part)
        if child is not None and not isinstance(child, dict):
            return  # the file has a non-table here: validation reports that at the file's line
        table: dict[str, object] = dict(child or {})
        node[part] = table
        node = table
    last = key[-1]
    current = node.get(last)
    if isinstance(value, dict) and isinstance(current, dict):
        copied: dict[str, object] = dict(current)
        node[last] = copied
        for sub_key, sub_value in value.items():
            _merge(copied, (sub_key,), sub_value)
    else:
        node[last] = value


def leaf_keys(document: object, prefix: str = "") -> set[str]:
    """Dotted keys of the non-table values in a parsed TOML document."""
    if not isinstance(document, dict):
        return {prefix} if prefix else set()
    out: set[str] = set()
    for key, value in document.items():
        out |= leaf_keys(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def apply_overrides(
    document: dict[str, object], overrides: Sequence[str]
) -> tuple[dict[str, object], set[str], list[str], list[Diagnostic]]:
    """(merged copy of `document`, dotted keys the overrides set, the overrides applied,
    diagnostics of the overrides that could not be applied)."""
    merged = dict(document)
    explicit: set[str] = set()
    problems: list[Diagnostic] = []
    applied: list[str] = []
    for text in overrides:
        parsed = parse_override(text)
        if isinstance(parsed, Diagnostic):
            problems.append(parsed)
            continue
        _merge(merged, parsed.key, parsed.value)
        explicit |= leaf_keys(parsed.value, parsed.dotted)
        applied.append(text)
    return merged, explicit, applied, problems

"""The JSON Schema and the Markdown reference of the profile language, generated from the models.

Committed copies: `mllm_deploy/schema/profile.schema.json` (shipped; editors complete keys
with it) and `docs/profile-reference.md`. Regenerate both after changing models.py:

    python -m mllm_deploy.profile.reference --write

`--check` exits 1 when a committed copy is stale (the tests do the same).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mllm_deploy.paths import atomic_write_text
from mllm_deploy.profile.fields import KeyInfo, all_keys
from mllm_deploy.profile.models import SCHEMA_VERSION, Profile

REGENERATE_COMMAND = "python -m mllm_deploy.profile.reference --write"
SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schema" / "profile.schema.json"
REFERENCE_PATH = Path(__file__).resolve().parents[2] / "docs" / "profile-reference.md"
SCHEMA_ID = "https://github.com/mllm-deploy/mllm-deploy/profile.schema.json"


def _drop_null_branches(node: object) -> object:
    """TOML has no null: `anyOf [T, null]` becomes T, and a null default disappears."""
    if isinstance(node, list):
        return [_drop_null_branches(item) for item in node]
    if not isinstance(node, dict):
        return node
    return _drop_null_branches_of_table(node)


def _drop_null_branches_of_table(table: dict[str, object]) -> dict[str, object]:
    """:func:`_drop_null_branches` of one JSON object (the schema itself, or a node in it)."""
    out = {key: _drop_null_branches(value) for key, value in table.items()}
    branches = out.get("anyOf")
    if isinstance(branches, list):
        kept = [branch for branch in branches if branch != {"type": "null"}]
        if len(kept) == 1 and len(kept) < len(branches):
            del out["anyOf"]
            out.update(kept[0])
    if "default" in out and out["default"] is None:
        del out["default"]
    return out


def build_schema() -> dict[str, object]:
    """JSON Schema (draft 2020-12) of a profile file."""
    schema = _drop_null_branches_of_table(Profile.model_json_schema(mode="validation"))
    header: dict[str, object] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": f"mllm-deploy profile (schema_version {SCHEMA_VERSION})",
    }
    schema.pop("title", None)
    return header | schema


def schema_text() -> str:
    return json.dumps(build_schema(), indent=2, ensure_ascii=False) + "\n"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def reference_text() -> str:
    """docs/profile-reference.md: every section and key with type, default, allowed values, doc."""
    keys = all_keys()
    lines = [
        "# Profile reference",
        "",
        f"<!-- Generated from mllm_deploy/profile/models.py by `{REGENERATE_COMMAND}`; do not edit. -->",
        "",
        "A profile is a TOML file. Every key is optional; a missing key takes its default.",
        "Check a profile with `mllm-deploy validate PROFILE`; override any key on the command line",
        "with `--set dotted.key=value` (the value is read as TOML, else as a bare string).",
        f"The JSON Schema is `mllm-deploy schema` (this release: schema_version {SCHEMA_VERSION}).",
        "",
        "## Top level",
        "",
    ]
    top_level = [info for key, info in keys.items() if "." not in key and not info.is_section]
    sections = [info for info in keys.values() if info.is_section]
    lines += _key_table(top_level)
    lines += ["", "Sections: " + ", ".join(f"[`[{s.key}]`](#{s.key})" for s in sections), ""]
    for section in sections:
        lines += [f"## [{section.key}]", "", section.doc, ""]
        lines += _key_table(
            [
                info
                for key, info in keys.items()
                if key.rsplit(".", 1)[0] == section.key and "." in key and not info.is_section
            ]
        )
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def _key_table(infos: list[KeyInfo]) -> list[str]:
    rows = ["| Key | Type | Default | Allowed | Description |", "|---|---|---|---|---|"]
    for info in infos:
        default = f"`{info.default}`" if info.default != "unset" else "unset"
        rows.append(f"| `{info.key}` | {info.kind} | {_cell(default)} | {_cell(info.allowed)} | {_cell(info.doc)} |")
    return rows


def stale_files() -> list[Path]:
    """Committed generated files whose content differs from what the models generate now."""
    expected = {SCHEMA_PATH: schema_text(), REFERENCE_PATH: reference_text()}
    return [path for path, text in expected.items() if not path.is_file() or path.read_text(encoding="utf-8") != text]


def write_all() -> list[Path]:
    written = []
    for path, text in ((SCHEMA_PATH, schema_text()), (REFERENCE_PATH, reference_text())):
        atomic_write_text(path, text)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mllm_deploy.profile.reference",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", action="store_true", help="regenerate the schema and the reference doc")
    group.add_argument("--check", action="store_true", help="exit 1 if a committed copy is stale")
    args = parser.parse_args(argv)
    if args.write:
        for path in write_all():
            print(f"wrote {path}")
        return 0
    stale = stale_files()
    for path in stale:
        print(f"stale: {path}; run `{REGENERATE_COMMAND}`", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())

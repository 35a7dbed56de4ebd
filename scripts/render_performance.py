"""Render docs/performance.md from the measurements committed in docs/bench/history.toml.

    python scripts/render_performance.py           # (re)write docs/performance.md atomically
    python scripts/render_performance.py --check   # exit 1 when the committed page is stale

The page is a pure function of the data file (no dates, no environment), so the same data always
renders the same bytes; tests/test_docs.py holds the committed page to that.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HISTORY_PATH = ROOT / "docs" / "bench" / "history.toml"
PERFORMANCE_PATH = ROOT / "docs" / "performance.md"
RENDER_COMMAND = "python scripts/render_performance.py"

SESSION_REQUIRED = {"date": str, "order": int, "title": str, "machine": str, "commands": list, "notes": str}
ROW_REQUIRED = ("command", "configuration", "threads", "prefill_tok_s")
ROW_FIGURES = ("prefill_tok_s", "ttft_ms", "decode_tok_s", "peak_rss_mb")
ROW_OPTIONAL = ("prefill_min_max", "ttft_ms", "decode_tok_s", "peak_rss_mb", "note", "default")
ROW_KEYS = frozenset(ROW_REQUIRED + ROW_OPTIONAL)
TARGET_REQUIRED = ("target", "status", "text")

# Table columns in order; "cmd" only where a session has several commands, and a column of empty cells is left out.
COLUMN_HEADINGS = (
    "cmd",
    "configuration",
    "threads cpu/npu",
    "prefill tok/s (min–max)",
    "TTFT ms",
    "decode tok/s",
    "peak RSS MB",
    "note",
)


class HistoryError(ValueError):
    """The data file breaks the format described at its top; carries every problem found."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def load_history(path: Path = HISTORY_PATH) -> dict:
    with path.open("rb") as f:
        return tomllib.load(f)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _figure_problem(value: object) -> str | None:
    """Why `value` is not a figure (a number, a {min, max} range or a list of numbers), else None."""
    if _is_number(value):
        return None
    if isinstance(value, dict):
        if set(value) != {"min", "max"} or not all(_is_number(v) for v in value.values()):
            return "a range must be {min = number, max = number}"
        return None if value["min"] <= value["max"] else "a range's min is above its max"
    if isinstance(value, list):
        return None if len(value) >= 2 and all(_is_number(v) for v in value) else "a list needs two or more numbers"
    return f"expected a number, a {{min, max}} range or a list of numbers, got {value!r}"


def _row_problems(where: str, row: dict, n_commands: int) -> list[str]:
    problems = [f"{where}: missing {key}" for key in ROW_REQUIRED if key not in row]
    problems += [f"{where}: unknown key {key}" for key in sorted(set(row) - ROW_KEYS)]
    command = row.get("command")
    if "command" in row and not (isinstance(command, int) and 1 <= command <= n_commands):
        problems.append(f"{where}: command must be a number from 1 to {n_commands}, got {command!r}")
    for key in ("configuration", "note"):
        if key in row and not (isinstance(row[key], str) and row[key].strip()):
            problems.append(f"{where}: {key} must be non-empty text")
    threads = row.get("threads")
    if "threads" in row and not (
        isinstance(threads, str) or (isinstance(threads, list) and all(isinstance(t, str) for t in threads))
    ):
        problems.append(f'{where}: threads must be text like "2/1" or a list of such texts')
    for key in ROW_FIGURES:
        if key in row and (problem := _figure_problem(row[key])):
            problems.append(f"{where}: {key}: {problem}")
    spread = row.get("prefill_min_max")
    if "prefill_min_max" in row:
        if not (isinstance(spread, list) and len(spread) == 2 and all(_is_number(v) for v in spread)):
            problems.append(f"{where}: prefill_min_max must be [min, max]")
        elif spread[0] > spread[1] or not _is_number(row.get("prefill_tok_s")):
            problems.append(f"{where}: prefill_min_max needs a single prefill_tok_s and min <= max")
    if "default" in row and not isinstance(row["default"], bool):
        problems.append(f"{where}: default must be true or false")
    lengths = {len(row[key]) for key in (*ROW_FIGURES, "threads") if isinstance(row.get(key), list)}
    if len(lengths) > 1:
        problems.append(f"{where}: lists in one row must have the same length (one value per swept setting)")
    return problems


def validate(history: dict) -> list[str]:
    """Every problem in the data file, as `session N (date): row M: ...` messages; empty when valid."""
    problems = []
    if history.get("schema_version") != 1:
        problems.append(f"schema_version must be 1, got {history.get('schema_version')!r}")
    if not isinstance(history.get("intro"), str):
        problems.append("intro: missing")
    sessions = history.get("session")
    if not isinstance(sessions, list) or not sessions:
        return [*problems, "no [[session]] entries"]
    seen = set()
    for i, session in enumerate(sessions, 1):
        where = f"session {i} ({session.get('date', 'no date')})"
        for key, kind in SESSION_REQUIRED.items():
            if not isinstance(session.get(key), kind) or session.get(key) in ("", []):
                problems.append(f"{where}: missing or empty {key}")
        commands = session.get("commands") if isinstance(session.get("commands"), list) else []
        if not all(isinstance(c, str) and c.startswith("mllm-deploy ") for c in commands):
            problems.append(f"{where}: every command must be the exact `mllm-deploy ...` command line")
        key = (session.get("date"), session.get("order"))
        if key in seen:
            problems.append(f"{where}: another session has the same date and order")
        seen.add(key)
        rows = session.get("rows")
        if not isinstance(rows, list) or not rows:
            problems.append(f"{where}: no [[session.rows]]")
            continue
        for j, row in enumerate(rows, 1):
            problems += _row_problems(f"{where}: row {j}", row, len(commands))
        unused = set(range(1, len(commands) + 1)) - {row.get("command") for row in rows}
        problems += [f"{where}: command {n} has no rows" for n in sorted(unused)]
    for i, target in enumerate(history.get("target", []), 1):
        problems += [f"target {i}: missing {key}" for key in TARGET_REQUIRED if not target.get(key)]
    return problems


def _number(value: int | float) -> str:
    return f"{value:,}"  # as written in the data file: 2644 -> 2,644, 75.0 -> 75.0


def _figure(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):
        return f"{_number(value['min'])}–{_number(value['max'])}"
    if isinstance(value, list):
        return " · ".join(_number(v) for v in value)
    return _number(value)  # type: ignore[arg-type]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _row_cells(row: dict) -> list[str]:
    prefill = _figure(row["prefill_tok_s"])
    if "prefill_min_max" in row:
        low, high = row["prefill_min_max"]
        prefill += f" ({_number(low)}–{_number(high)})"
    configuration = row["configuration"]
    threads = row["threads"]
    if row.get("default"):
        configuration, prefill = f"**{configuration}**", f"**{prefill}**"
    return [
        str(row["command"]),
        configuration,
        threads if isinstance(threads, str) else " · ".join(threads),
        prefill,
        _figure(row.get("ttft_ms")),
        _figure(row.get("decode_tok_s")),
        _figure(row.get("peak_rss_mb")),
        row.get("note", ""),
    ]


def _table(rows: list[dict], several_commands: bool) -> list[str]:
    cells = [_row_cells(row) for row in rows]
    keep = [
        i for i in range(len(COLUMN_HEADINGS)) if (i == 0 and several_commands) or (i > 0 and any(c[i] for c in cells))
    ]
    lines = ["| " + " | ".join(COLUMN_HEADINGS[i] for i in keep) + " |", "|" + "---|" * len(keep)]
    lines += ["| " + " | ".join(_cell(c[i]) for i in keep) + " |" for c in cells]
    return lines


def render(history: dict) -> str:
    """docs/performance.md for `history`; HistoryError when the data is not valid."""
    problems = validate(history)
    if problems:
        raise HistoryError(problems)
    out = [
        "<!-- Generated by scripts/render_performance.py from docs/bench/history.toml: edit the data, then run",
        f"     `{RENDER_COMMAND}`. tests/test_docs.py fails when this page is stale. -->",
        "",
        "# Performance",
        "",
        history["intro"].strip(),
        "",
        "Sessions, newest first: "
        + ", ".join(f"[{s['date']}, {s['title']}](#{_anchor(s)})" for s in _newest_first(history["session"]))
        + ".",
    ]
    if history.get("target"):
        out += ["", "## Against the targets of issue 5", ""]
        for target in history["target"]:
            out.append(f"- **{target['target']}: {target['status']}.** " + " ".join(target["text"].split()))
    for session in _newest_first(history["session"]):
        out += ["", f"## {session['date']}, {session['title']}", "", f"Machine: {session['machine']}.", ""]
        out += ["```sh"]
        several = len(session["commands"]) > 1
        for n, command in enumerate(session["commands"], 1):
            out += [f"# {n}", command] if several else [command]
        out += ["```", ""]
        out += _table(session["rows"], several_commands=len(session["commands"]) > 1)
        out += ["", session["notes"].strip()]
    return "\n".join(out) + "\n"


def _newest_first(sessions: list[dict]) -> list[dict]:
    return sorted(sessions, key=lambda s: (s["date"], s["order"]), reverse=True)


def _anchor(session: dict) -> str:
    """GitHub's anchor for the session's heading: lower case, punctuation dropped, spaces to dashes."""
    heading = f"{session['date']}, {session['title']}".lower()
    kept = "".join(ch for ch in heading if ch.isalnum() or ch in " -_")
    return kept.replace(" ", "-")


def write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed page differs from the rendering")
    parser.add_argument("--history", type=Path, default=HISTORY_PATH, help="the data file (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=PERFORMANCE_PATH, help="the page (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        text = render(load_history(args.history))
    except (HistoryError, tomllib.TOMLDecodeError) as error:
        print(f"{args.history}: invalid:\n{error}", file=sys.stderr)
        return 2
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else None
        if current != text:
            state = "missing" if current is None else "stale"
            message = f"{args.out} is {state}: it differs from the rendering of {args.history}; run `{RENDER_COMMAND}`"
            print(message, file=sys.stderr)
            return 1
        return 0
    write_atomically(args.out, text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

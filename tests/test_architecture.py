"""docs/architecture.md stays true: its module list is the package tree, its layers are the import
contract that `lint-imports` enforces, and the contract itself holds."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "mllm_deploy"
DOC = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")


def documented_modules() -> dict[str, set[str]]:
    """package directory (relative, '' for the root) -> module names listed for it."""
    section = DOC.split("<!-- modules:", 1)[1]
    listed: dict[str, set[str]] = {}
    for line in section.splitlines():
        match = re.match(r"- \*\*`mllm_deploy/`\*\*|- \*\*`([a-z_/]+)/`\*\*", line)
        if not match:
            continue
        package = match.group(1) or ""
        body = line.split(":", 1)[1]
        body = re.sub(r"\([^)]*\)", "", body)  # descriptions may quote other names in backticks
        listed[package] = set(re.findall(r"`([a-z_0-9]+)`", body))
    return listed


def package_tree() -> dict[str, set[str]]:
    tree: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        package = path.parent.relative_to(PACKAGE).as_posix()
        tree.setdefault("" if package == "." else package, set()).add(path.stem)
    return tree


def test_the_module_list_is_the_package_tree():
    listed, tree = documented_modules(), package_tree()
    assert set(listed) == set(tree), f"packages: documented {sorted(listed)}, in the tree {sorted(tree)}"
    for package, modules in tree.items():
        assert listed[package] == modules, (
            f"{package or 'mllm_deploy'}/: not documented {sorted(modules - listed[package])}, "
            f"documented but absent {sorted(listed[package] - modules)}"
        )


def test_a_module_missing_from_the_list_is_noticed(monkeypatch):
    """The comparison can fail: a tree with one more module than the page lists."""
    real = package_tree()
    monkeypatch.setitem(real, "runtime", {*real["runtime"], "new_engine"})
    assert documented_modules()["runtime"] != real["runtime"]


def documented_layers() -> list[str]:
    block = DOC.split("<!-- layers:", 1)[1].split("```", 2)[1]
    return [line.strip() for line in block.strip().splitlines()]


def test_the_layer_diagram_is_the_import_contract():
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    (layers,) = [c["layers"] for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "layers"]
    contract = [" | ".join(part.strip().removeprefix("mllm_deploy.") for part in layer.split("|")) for layer in layers]
    assert documented_layers() == contract


def test_the_import_contracts_hold():
    lint_imports = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint_imports)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "3 kept, 0 broken" in proc.stdout


def test_the_cli_loads_no_heavy_library_before_a_command_runs():
    """`mllm-deploy --help`, `validate` and `plan` start fast: parsing the command line loads no
    onnx, onnxruntime, textual, gguf or tokenizers (the engines load them when a command opens one)."""
    code = (
        "import sys\n"
        "from mllm_deploy.cli import build_parser; build_parser()\n"
        "heavy = ('onnx', 'onnxruntime', 'textual', 'gguf', 'tokenizers')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"

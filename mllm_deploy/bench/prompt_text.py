"""Real English prompt text for benchmarks: the docstrings of this package's own modules.

Prose we wrote ourselves, shipped with the package, about the very thing being measured; read
with `ast` (nothing is imported). Repeated when a prompt needs more tokens than it holds.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import mllm_deploy


@lru_cache(maxsize=1)
def package_prose() -> str:
    root = Path(mllm_deploy.__file__).parent
    pieces = []
    for path in sorted(root.rglob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef))]
        for node in nodes:
            doc = ast.get_docstring(node)
            if doc and len(doc) > 80:
                pieces.append(doc.strip())
    return "\n\n".join(pieces)


def prompt_ids(tokenizer, n_tokens: int) -> list[int]:
    """Exactly `n_tokens` token ids of real text (no special tokens)."""
    text = package_prose()
    ids = tokenizer.encode(text)
    if not ids:
        raise RuntimeError("no prompt text found in the package")
    while len(ids) < n_tokens:
        ids = ids + ids
    return ids[:n_tokens]

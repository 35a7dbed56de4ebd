"""What went into a bundle, per part, with sizes: what `build --out` prints and the docs' tables count."""

from __future__ import annotations

from mllm_deploy.compile.bundle import ARTIFACTS_DIR, DECODE_DIR, MODEL_DIR
from mllm_deploy.compile.bundle_lock import BundleLock

BUNDLE_PARTS = ("model", "graphs", "context binaries", "decode graphs", "shadow rows", "other")


def bundle_part(rel: str) -> str:
    """Which part of a bundle the file at `rel` belongs to (one of BUNDLE_PARTS)."""
    if rel.startswith(f"{MODEL_DIR}/"):
        return "model"
    prefixes = {f"{ARTIFACTS_DIR}/graphs/": "graphs", f"{ARTIFACTS_DIR}/contexts/": "context binaries",
                f"{ARTIFACTS_DIR}/shadow/": "shadow rows", f"{DECODE_DIR}/": "decode graphs"}  # fmt: skip
    for prefix, part in prefixes.items():
        if rel.startswith(prefix) and (part == "shadow rows" or not rel.endswith(".json")):
            return part
    return "other"  # the profile, calibration, latencies, manifests (a shadow index counts as shadow rows)


def bundle_sizes(lock: BundleLock) -> dict[str, tuple[int, int]]:
    """Part -> (files, bytes), every part of BUNDLE_PARTS in order."""
    sizes = dict.fromkeys(BUNDLE_PARTS, (0, 0))
    for rel, entry in lock.files.items():
        files, size = sizes[bundle_part(rel)]
        sizes[bundle_part(rel)] = (files + 1, size + entry.size)
    return sizes


def render_bundle_contents(lock: BundleLock) -> str:
    """What went into a bundle, per part, with sizes (what `build --out` prints)."""
    sizes = bundle_sizes(lock)
    lines = [f"  {part:<17}{files:>5} files {size / 1e6:>9.1f} MB" for part, (files, size) in sizes.items()]
    total = sum(size for _, size in sizes.values())
    lines.append(f"  {'total':<17}{len(lock.files):>5} files {total / 1e6:>9.1f} MB (+ the lockfile)")
    return "\n".join(lines)

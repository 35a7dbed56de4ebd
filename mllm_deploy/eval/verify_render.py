"""What `verify` prints: the rows of `eval.verify.verify_bundle` as text or JSON lines."""

from __future__ import annotations

import json
from dataclasses import asdict

from mllm_deploy.compile.bundle_lock import BundleLock
from mllm_deploy.eval.verify import VerifyRow


def rows_json(rows: list[VerifyRow]) -> str:
    return "\n".join(json.dumps(asdict(row)) for row in rows)


def _span(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    parts, start = [], None
    for i, layer in enumerate(layers):
        start = layer if start is None else start
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return ",".join(parts)


def render_rows(lock: BundleLock, rows: list[VerifyRow]) -> str:
    """What `verify` prints: one line per backend, then its worst layers and graphs."""
    htp = f", HTP v{lock.htp_arch}, SoC {lock.soc_model}" if lock.htp_arch else ""
    first = rows[0] if rows else None
    lines = [f"bundle {lock.profile_name}: target {lock.target} ({lock.backend}{htp}), chunk {lock.chunk_size}"]
    if first is not None:
        lines.append(f"{first.chunks} chunk(s) of {first.text} ({first.tokens} tokens) through all "
                     f"{lock.kv_cache.layers} layers; the bundle's graphs in layers {_span(first.layers)}")  # fmt: skip
    for row in rows:
        lines.append(f"\n{row.backend}: {row.runs_on} - {row.status} ({row.seconds:.1f} s)")
        lines.append(f"  graphs: {row.graphs}")
        if row.ppl_ratio is not None:
            lines.append(f"  perplexity {row.path_ppl:.3f} vs float32 {row.float_ppl:.3f} = {row.ppl_ratio:.4f}x; "
                         f"top-1 agreement {100 * (row.top1_agreement or 0):.1f}%; logit cosine min "
                         f"{row.logit_cosine_min:.4f}, mean {row.logit_cosine_mean:.5f}")  # fmt: skip
            worst = sorted(row.per_layer, key=lambda d: d["cosine_min"])[:3]
            lines.append("  hidden state, lowest cosine: " + ", ".join(
                f"L{int(d['layer'])} {d['cosine_min']:.4f} (max |diff| {d['max_abs']:.3g})" for d in worst))  # fmt: skip
            graphs = sorted(row.per_graph, key=lambda d: float(d["cosine_min"]))[:3]  # type: ignore[arg-type]
            lines.append("  graph outputs vs float linears, lowest cosine: " + ", ".join(
                f"{d['graph']} {float(d['cosine_min']):.4f}" for d in graphs))  # type: ignore[arg-type]  # fmt: skip
        if row.assigned_nodes:
            lines.append("  nodes by provider: " + ", ".join(f"{p} {n}" for p, n in sorted(row.assigned_nodes.items())))
        for item in row.rejected[:5]:
            lines.append(f"  refused {item['graph']}: {item['error']}")
        if len(row.rejected) > 5:
            lines.append(f"  ... and {len(row.rejected) - 5} more refused (--json lists all)")
        if row.note:
            lines.append(f"  note: {row.note}")
    return "\n".join(lines)

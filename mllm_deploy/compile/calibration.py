"""Calibration results: what the float model's activations look like, and what we decide from it.

Two levels, both strict pydantic models stored as JSON:

- `ActivationStats` (policy-independent, cached per model + calibration settings): for every
  linear input of every layer the percentile clamp, the max |x|, the number of values beyond
  the clamp per input channel and the measured damage of a max-abs grid, and for every linear
  output the max |y| of the float product and of the product with the input clamped (what the
  NPU computes).
- `CalibrationResult` (derived for one profile by `derive_calibration`): the clamp each graph
  uses (percentile for `shadow`/`clip`, max-abs for `none`), layer importance
  (max |outlier| / scale), the linear inputs that keep shadow execution (ranked over every
  linear input of every layer by measured pruning damage, the least damaging pruned), and each
  shadowed input's hot channels. `plan` shows it; `build` compiles graphs from it.
"""

from __future__ import annotations

import math
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from mllm_deploy.model.linears import GRAPH_KINDS

STATS_SCHEMA_VERSION: Final = 3
HOT_OUTLIER_SHARE = 0.8
"""Hot channels: the smallest set of input channels holding this share of the calibration
outliers (DESIGN.md §2: under 3% of channels hold over 80%), capped by `hot_channel_fraction`."""

InputKind = Literal["qkv", "o_proj", "gate_up", "down"]
Policy = Literal["none", "clip", "shadow"]
_ACT_HALF = {"uint8": 127, "uint16": 32767}  # grid steps from zero to the clamp
KIND_OF_LINEAR = {
    "attn_q": "qkv", "attn_k": "qkv", "attn_v": "qkv", "attn_output": "o_proj",
    "ffn_gate": "gate_up", "ffn_up": "gate_up", "ffn_down": "down",
}  # fmt: skip
"""Which graph (and so which input) each linear belongs to."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class InputStats(_Model):
    """Calibration statistics of one linear input (one graph's input) of one layer."""

    layer: int = Field(ge=0)
    """Transformer layer."""
    kind: InputKind
    """The graph that reads this input."""
    width: int = Field(ge=1)
    """Input channels."""
    values: int = Field(ge=1)
    """Activation values seen (tokens x width)."""
    percentile_clamp: float = Field(gt=0)
    """|x| at `scale_percentile` over every value seen."""
    max_abs: float = Field(gt=0)
    """Largest |x| seen."""
    channel_outliers: dict[int, int]
    """Input channel -> values beyond `percentile_clamp` (channels without any are left out)."""
    estimated: bool = False
    """True when the clamp and counts come from a strided subsample (very low percentiles)."""
    grid_damage: float = Field(ge=0)
    """Measured cost of a max-abs uint8 grid on this input alone (everything else float): mean
    over calibration tokens of |Δh|² / |h|², h the residual stream after the layer. The pruning
    ranking (see `derive_calibration`)."""


class KVAbsMax(_Model):
    """Largest magnitudes the KV cache held over the calibration set: the steps of an int8 KV
    cache (`decode.kv_cache = "int8"`) put them on the last int8 level."""

    keys: list[list[list[float]]]
    """[layer][kv_head][channel]: the largest |k| the channel can take at any position, i.e. the
    largest norm of its RoPE pair over the calibration tokens (the rotation keeps a pair's norm
    and only moves it between the two channels, so a per-channel max would depend on the
    positions calibration happened to cover)."""
    values: list[list[list[float]]]
    """[layer][kv_head][channel]: the largest |v|."""


class ActivationStats(_Model):
    """Policy-independent statistics of every linear input and output over the calibration set."""

    schema_version: Literal[3] = STATS_SCHEMA_VERSION
    """Version of this file's layout."""
    source: str
    """`calibration.source` as given."""
    text_sha256: str
    """sha256 of the calibration token ids (the exact data the statistics come from)."""
    samples: int = Field(ge=1)
    """Calibration sequences used."""
    tokens: int = Field(ge=1)
    """Tokens over all sequences."""
    scale_percentile: float = Field(gt=50, le=100)
    """Percentile of |x| the clamps are taken at."""
    inputs: list[InputStats]
    """One entry per (layer, kind), layer-major in GRAPH_KINDS order."""
    output_max: dict[str, float]
    """"layer/linear" -> max |y| of the float product (what max-abs input grids produce)."""
    output_max_clamped: dict[str, float]
    """"layer/linear" -> max |y| with the input clamped at `percentile_clamp` (what the NPU
    computes when the outliers are clipped or shadowed)."""
    kv_absmax: KVAbsMax
    """Per-channel range of the KV cache (pass 1)."""
    seconds: float = Field(ge=0)
    """Wall time of the calibration run (generation + three statistics passes)."""

    def input(self, layer: int, kind: str) -> InputStats:
        return self.inputs[layer * len(GRAPH_KINDS) + GRAPH_KINDS.index(kind)]


class InputCalibration(_Model):
    """What one graph input gets for this profile."""

    layer: int = Field(ge=0)
    """Transformer layer."""
    kind: InputKind
    """The graph that reads this input."""
    clamp: float = Field(gt=0)
    """Per-tensor clamp of the activation grid (scale = clamp / 127 for uint8)."""
    max_abs: float = Field(gt=0)
    """Largest |x| seen in calibration."""
    outlier_fraction: float = Field(ge=0, le=1)
    """Share of calibration values beyond the clamp."""
    importance: float = Field(ge=0)
    """max |outlier| / scale: how far (in grid steps) the largest value lies beyond the grid's
    zero; equals the grid's half-width when nothing is clipped."""
    pruning_damage: float = Field(ge=0)
    """What pruning this input's shadow correction costs: the measured `grid_damage` of its
    max-abs grid less the part the clamp grid keeps anyway (rounding noise scales with the
    step², so x (1 - (clamp / max_abs)²)). Pruning drops the smallest first."""
    hot_channels: list[int]
    """Input channels whose float weight rows stay in memory (shadowed inputs only)."""
    hot_outlier_share: float = Field(ge=0, le=1)
    """Share of calibration outliers that fall in the hot channels."""


class CalibrationResult(_Model):
    """Calibration decisions for one profile: clamps, importance ranking, shadowed layers."""

    schema_version: Literal[2] = 2
    """Version of this file's layout."""
    policy: Policy
    """`outliers.policy` the clamps were chosen for."""
    activations: Literal["uint8", "uint16"]
    """Activation dtype (sets the scale = clamp / half-range)."""
    scale_percentile: float
    """Percentile of |x| used for the clamps (`shadow`/`clip`)."""
    source: str
    """Calibration data source."""
    samples: int
    """Calibration sequences."""
    tokens: int
    """Calibration tokens."""
    inputs: list[InputCalibration]
    """Per (layer, kind), layer-major in GRAPH_KINDS order."""
    output_clamps: dict[str, float]
    """"layer/linear" -> clamp of that linear's output grid."""
    layer_importance: list[float]
    """Per layer: the largest importance of its four inputs."""
    layer_rank: list[int]
    """Layers, most important first."""
    shadow_inputs: list[tuple[int, InputKind]]
    """(layer, kind) linear inputs that keep shadow outlier execution after pruning the
    `outliers.prune_fraction` of all linear inputs with the least `pruning_damage` (sorted)."""
    kv_absmax: KVAbsMax
    """The KV cache's calibrated range (from the statistics), for an int8 KV cache."""

    def input(self, layer: int, kind: str) -> InputCalibration:
        return self.inputs[layer * len(GRAPH_KINDS) + GRAPH_KINDS.index(kind)]

    @property
    def shadowed(self) -> frozenset[tuple[int, str]]:
        """(layer, kind) pairs with shadow correction."""
        return frozenset(self.shadow_inputs)

    @property
    def shadow_layers(self) -> list[int]:
        """Layers with at least one shadowed input."""
        return sorted({layer for layer, _ in self.shadow_inputs})


def choose_hot_channels(channel_outliers: dict[int, int], width: int, max_fraction: float) -> tuple[list[int], float]:
    """(hot channels, share of outliers they hold): most-outlier channels first until
    HOT_OUTLIER_SHARE of all outliers is covered, never more than floor(max_fraction * width)."""
    total = sum(channel_outliers.values())
    cap = math.floor(max_fraction * width)
    if total == 0 or cap == 0:
        return [], 0.0
    ranked = sorted(channel_outliers.items(), key=lambda kv: (-kv[1], kv[0]))
    hot, held = [], 0
    for channel, count in ranked[:cap]:
        if held >= HOT_OUTLIER_SHARE * total:
            break
        hot.append(channel)
        held += count
    return sorted(hot), held / total


def derive_calibration(
    stats: ActivationStats,
    *,
    policy: Policy,
    activations: Literal["uint8", "uint16"],
    hot_channel_fraction: float,
    shadow_input_count: int,
) -> CalibrationResult:
    """Clamps, importance, shadowed inputs and hot channels for one profile from `stats`.

    `shadow`: shadowed inputs are clamped at the percentile (the CPU adds back what is cut);
    pruned inputs get max-abs grids (nothing is cut, the values are only rounded coarser).

    Pruning ranks every linear input of every layer by `pruning_damage` (measured on the
    calibration set, see `InputStats.grid_damage`) and keeps the top `shadow_input_count`.
    Inputs, not layers — the paper's granularity: on SmolLM2 the down-projection inputs carry
    almost all of the damage, so pruning whole layers leaves most of them clipped (prune 0.5 of
    layers: 1.88x float perplexity). Measured damage, not the paper's max |outlier| / scale: on
    SmolLM2 that ranks attention-output inputs high (cheap to prune: their grid costs ~1e-4 KL)
    and qkv inputs low (1e-3 to 8e-3 KL each); on 4,096 news tokens the measured ranking cuts
    the extra KL divergence of pruning 0.3 / 0.5 of the inputs by about 3x / 2.5x."""
    half = _ACT_HALF[activations]
    n_layers = len(stats.inputs) // len(GRAPH_KINDS)
    importance_of_layer = [0.0] * n_layers
    per_input: list[tuple[InputStats, float, float, float, float]] = []
    for s in stats.inputs:
        clamp = s.max_abs if policy == "none" else min(s.percentile_clamp, s.max_abs)
        outliers = 0 if policy == "none" else sum(s.channel_outliers.values())
        importance = s.max_abs / (clamp / half)
        importance_of_layer[s.layer] = max(importance_of_layer[s.layer], importance)
        damage = s.grid_damage * (1.0 - (clamp / s.max_abs) ** 2)
        per_input.append((s, clamp, outliers / s.values, importance, damage))
    rank = sorted(range(n_layers), key=lambda i: (-importance_of_layer[i], i))
    by_damage = sorted(per_input, key=lambda item: (-item[4], -item[3], item[0].layer, GRAPH_KINDS.index(item[0].kind)))
    kept = by_damage[:shadow_input_count] if policy == "shadow" else []
    shadowed = {(s.layer, s.kind) for s, *_ in kept}
    inputs = []
    for s, clamp, fraction, importance, damage in per_input:
        hot: list[int] = []
        share = 0.0
        if (s.layer, s.kind) in shadowed:
            hot, share = choose_hot_channels(s.channel_outliers, s.width, hot_channel_fraction)
        elif policy == "shadow":
            # pruned: no CPU correction, so the grid covers every value (max-abs) instead of
            # clipping the outliers away — measured on SmolLM2 (4,096 news tokens, prune 0.75):
            # clipped pruned inputs 1.69x float perplexity
            clamp, fraction = s.max_abs, 0.0
        inputs.append(InputCalibration(
            layer=s.layer, kind=s.kind, clamp=clamp, max_abs=s.max_abs, outlier_fraction=fraction,
            importance=importance, pruning_damage=damage, hot_channels=hot, hot_outlier_share=share,
        ))  # fmt: skip
    if policy == "none":
        outputs = stats.output_max
    elif policy == "clip":
        outputs = stats.output_max_clamped
    else:  # a linear's output range follows whether its input is clipped (shadowed) or not (pruned)
        outputs = {
            key: (
                stats.output_max_clamped
                if (int(key.split("/")[0]), KIND_OF_LINEAR[key.split("/")[1]]) in shadowed
                else stats.output_max
            )[key]
            for key in stats.output_max
        }
    return CalibrationResult(
        policy=policy,
        activations=activations,
        scale_percentile=stats.scale_percentile,
        source=stats.source,
        samples=stats.samples,
        tokens=stats.tokens,
        inputs=inputs,
        output_clamps={k: max(v, 1e-6) for k, v in outputs.items()},
        layer_importance=importance_of_layer,
        layer_rank=rank,
        shadow_inputs=sorted(shadowed, key=lambda pair: (pair[0], GRAPH_KINDS.index(pair[1]))),
        kv_absmax=stats.kv_absmax,
    )


def render_calibration(result: CalibrationResult) -> str:
    """A short human summary (for `build` and `plan`)."""
    n = len(result.layer_importance)
    lines = [
        f"calibration: {result.samples} samples, {result.tokens} tokens from {result.source!r}; "
        f"policy {result.policy}, clamps at the {result.scale_percentile} percentile"
        + (" (max-abs)" if result.policy == "none" else ""),
    ]
    frac = sum(i.outlier_fraction for i in result.inputs) / max(1, len(result.inputs))
    lines.append(f"  values beyond the clamps (mean over inputs): {100 * frac:.4f}%")
    top = ", ".join(f"L{i} {result.layer_importance[i]:.0f}" for i in result.layer_rank[: min(6, n)])
    lines.append(f"  layer importance (max|outlier|/scale), highest: {top}")
    if result.policy == "shadow":
        kinds: dict[str, int] = {}
        for _, kind in result.shadow_inputs:
            kinds[kind] = kinds.get(kind, 0) + 1
        summary = ", ".join(f"{kind} x{count}" for kind, count in kinds.items()) or "none"
        lines.append(f"  shadow outlier execution on {len(result.shadow_inputs)}/{len(result.inputs)} linear inputs "
                     f"({summary}) in {len(result.shadow_layers)}/{n} layers")  # fmt: skip
        hot = [i for i in result.inputs if (i.layer, i.kind) in result.shadowed]
        if hot:
            share = sum(i.hot_outlier_share for i in hot) / len(hot)
            count = sum(len(i.hot_channels) for i in hot)
            lines.append(f"  hot channels: {count} rows in memory, holding {100 * share:.0f}% of outliers on average")
    return "\n".join(lines) + "\n"

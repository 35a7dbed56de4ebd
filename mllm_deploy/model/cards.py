"""Model cards: architecture descriptions without weights (`card:ID`, or a Hugging Face `config.json`).

A card holds what a plan needs — layers, widths, heads, vocabulary, context — and nothing that
runs: `validate`, `plan` and `estimate` accept one as `model.source = "card:ID"` (or
`card:path/to/config.json`); a command that needs weights refuses it (`model.load_weights`).
The shipped cards are one TOML data file each in `model/cards/`, named by the lowercase id the
model's maker uses on Hugging Face (`qwen1.5-1.8b`, `llama-3.2-1b`, ...).

A non-gated MLP (Phi-2: fc1 -> GELU -> fc2) is planned as the gated MLP of equal work: its
`ffn` is two thirds of the intermediate size, so `gate_up` + `down` count the same operations and
weight bytes as fc1 + fc2 (`ModelCard.planned_ffn`).
"""

from __future__ import annotations

import difflib
import json
import tomllib
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mllm_deploy.errors import ExitCode, user_error
from mllm_deploy.model.spec import ModelSpec

CARD_PREFIX = "card:"


class ModelCard(BaseModel):
    """One model's architecture, as its Hugging Face `config.json` states it."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]*$")
    """Lowercase id as the maker names the model, e.g. `qwen1.5-1.8b`."""

    name: str = Field(min_length=1)
    """Display name, e.g. `Qwen1.5-1.8B`."""

    hf_repo: str | None = None
    """Hugging Face repository the figures come from; none for a card read from a local file."""

    source: str = Field(min_length=1)
    """Where the figures come from (a config.json and its repository, or a local path)."""

    architecture: str = Field(min_length=1)
    """`model_type` of the config, e.g. `llama`, `qwen2`, `gemma`, `phi`."""

    n_layers: int = Field(ge=1, le=1024)
    """Transformer blocks (`num_hidden_layers`)."""

    hidden: int = Field(ge=1)
    """Residual width (`hidden_size`)."""

    n_heads: int = Field(ge=1)
    """Query heads (`num_attention_heads`)."""

    n_kv_heads: int = Field(ge=1)
    """Key/value heads (`num_key_value_heads`; equal to `n_heads` without grouped-query attention)."""

    head_dim: int = Field(ge=1)
    """Width of one head (`head_dim`, else `hidden_size / num_attention_heads`)."""

    intermediate: int = Field(ge=1)
    """MLP width (`intermediate_size`)."""

    vocab: int = Field(ge=1)
    """Vocabulary size (`vocab_size`)."""

    context: int = Field(ge=1)
    """Context length in tokens (`max_position_embeddings`)."""

    tied_embeddings: bool
    """The output head reuses the token embeddings (`tie_word_embeddings`)."""

    activation: Literal["silu", "gelu", "gelu_tanh"]
    """MLP activation (`hidden_act` / `hidden_activation`)."""

    mlp: Literal["gated", "plain"]
    """`gated`: act(x W_gate) * (x W_up) then down (SwiGLU, GeGLU); `plain`: act(x W_1) then W_2 (Phi-2)."""

    norm: Literal["rmsnorm", "layernorm"]
    """Normalisation of the blocks."""

    qkv_bias: bool
    """Q/K/V projections carry biases."""

    rope_theta: float = Field(gt=0.0)
    """RoPE base (`rope_theta`)."""

    @property
    def planned_ffn(self) -> int:
        """The gated-MLP width a plan uses: `intermediate`, or 2/3 of it for a plain MLP (equal work)."""
        return self.intermediate if self.mlp == "gated" else round(2 * self.intermediate / 3)

    def parameters(self) -> int:
        """Weights in the model (embeddings, blocks, norms, head)."""
        h, q, kv, f = self.hidden, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.planned_ffn
        per_layer = h * q + 2 * h * kv + q * h + 3 * h * f + 2 * h
        head = 0 if self.tied_embeddings else self.vocab * h
        return self.vocab * h + self.n_layers * per_layer + h + head

    def to_spec(self, source: str) -> ModelSpec:
        """The ModelSpec a plan reads (format `card`: there are no weights to load)."""
        return ModelSpec(
            source=source,
            path=source,
            format="card",
            architecture=self.architecture,
            name=self.name,
            n_layers=self.n_layers,
            hidden=self.hidden,
            ffn=self.planned_ffn,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            head_dim=self.head_dim,
            vocab=self.vocab,
            context=self.context,
            rope_theta=self.rope_theta,
            rope_style="half",
            rms_eps=1e-6,
            tied_embeddings=self.tied_embeddings,
            qkv_bias=self.qkv_bias,
            weight_bytes_f32=4 * self.parameters(),
            file_bytes=0,
            extra={"card": self.id, "card_source": self.source, "mlp": self.mlp, "activation": self.activation},
        )


def cards_dir() -> Path:
    """The folder of the shipped card files."""
    return Path(str(resources.files("mllm_deploy.model") / "cards"))


@lru_cache(maxsize=1)
def model_cards() -> dict[str, ModelCard]:
    """Every shipped card by id."""
    cards = {}
    for path in sorted(cards_dir().glob("*.toml")):
        try:
            card = ModelCard.model_validate(tomllib.loads(path.read_text(encoding="utf-8")))
        except (OSError, tomllib.TOMLDecodeError, ValidationError) as exc:
            raise user_error(
                f"broken model card shipped with mllm-deploy: {exc}", file=str(path), exit_code=ExitCode.INTERNAL
            ) from None
        if card.id != path.stem:
            raise user_error(
                f"card id {card.id!r} does not match its file name", file=str(path), exit_code=ExitCode.INTERNAL
            )
        cards[card.id] = card
    return cards


def _int(config: dict[str, object], key: str, file: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise user_error(
            "missing or invalid integer in config.json" if value is None else "not a positive integer",
            file=file, key=key, value=value,
        )  # fmt: skip
    return value


ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}
PLAIN_MLP = {"phi", "gpt2", "gpt_neox", "falcon"}
LAYERNORM = {"phi", "gpt2", "gpt_neox", "falcon"}


def card_from_config(path: Path) -> ModelCard:
    """A card from a Hugging Face `config.json`; a located error (exit 2) naming the key it lacks."""
    file = str(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise user_error("config.json not found", file=file, key="model.source") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise user_error(f"cannot read config.json: {exc}", file=file) from None
    if not isinstance(config, dict):
        raise user_error("config.json is not a JSON object", file=file)
    config = {**config, **(config.get("text_config") or {})}  # multimodal configs nest the language model
    arch = config.get("model_type")
    if not isinstance(arch, str) or not arch:
        raise user_error("config.json has no model_type", file=file, key="model_type")
    hidden = _int(config, "hidden_size", file)
    heads = _int(config, "num_attention_heads", file)
    act = config.get("hidden_activation") or config.get("hidden_act") or "silu"
    if act not in ACTIVATIONS:
        raise user_error(
            "unsupported activation", file=file, key="hidden_act", value=act, allowed=", ".join(ACTIVATIONS)
        )
    name = str(config.get("_name_or_path") or path.parent.name or arch)
    return ModelCard(
        id=path.parent.name.lower() if path.parent.name else arch,
        name=name,
        source=file,
        architecture=arch,
        n_layers=_int(config, "num_hidden_layers", file),
        hidden=hidden,
        n_heads=heads,
        n_kv_heads=_int(config, "num_key_value_heads", file, heads),
        head_dim=_int(config, "head_dim", file, hidden // heads) if config.get("head_dim") else hidden // heads,
        intermediate=_int(config, "intermediate_size", file),
        vocab=_int(config, "vocab_size", file),
        context=_int(config, "max_position_embeddings", file, 2048),
        tied_embeddings=bool(config.get("tie_word_embeddings", arch in {"gemma", "gemma2", "gemma3_text"})),
        activation=ACTIVATIONS[act],
        mlp="plain" if arch in PLAIN_MLP else "gated",
        norm="layernorm" if arch in LAYERNORM else "rmsnorm",
        qkv_bias=bool(config.get("attention_bias", arch in {"qwen2", "phi"})),
        rope_theta=float(config.get("rope_theta") or 10000.0),
    )


def lookup_card(name: str, base_dir: Path | None = None) -> ModelCard:
    """A shipped card by id, or a card read from a `config.json` path (relative to `base_dir`)."""
    name = name.removeprefix(CARD_PREFIX).strip()
    if name.endswith(".json"):
        path = Path(name).expanduser()
        return card_from_config(path if path.is_absolute() or base_dir is None else base_dir / path)
    cards = model_cards()
    if name not in cards:
        close = difflib.get_close_matches(name.lower(), cards, n=1, cutoff=0.5)
        raise user_error(
            f"unknown model card {name!r}",
            key="model.source",
            value=name,
            allowed=", ".join(cards),
            hint=f"did you mean '{close[0]}'?" if close else "see `mllm-deploy models list` (cards)",
        )
    return cards[name]


def is_card_source(source: str) -> bool:
    """Whether a model source names a card (`card:ID` or `card:path/config.json`)."""
    return source.strip().startswith(CARD_PREFIX)

"""The model architectures the tool implements, in one registry: what each changes from Llama.

A source (GGUF, Hugging Face) reads the numbers its file stores; what the file leaves out is the
architecture's own default, applied here as the reference implementations apply it. Gemma 3's
GGUF stores only the sliding window (512) and the global RoPE base (1e6): the layer pattern
(every 6th layer global, the others local), the local RoPE base (10,000) and the query scaling
(query_pre_attn_scalar = 256) are Gemma 3's defaults (transformers' Gemma3TextConfig, llama.cpp).
An architecture not listed is refused, naming the supported ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from mllm_deploy.model.spec import Activation, LayerKind, RopeStyle


@dataclass(frozen=True)
class Architecture:
    name: str  # general.architecture (GGUF) / model_type (Hugging Face)
    rope_style_gguf: RopeStyle  # how llama.cpp's converter stored Q/K (see gguf_source)
    activation: Activation = "silu"
    scale_embeddings: bool = False  # embeddings * sqrt(hidden)
    qk_norm: bool = False
    sandwich_norms: bool = False
    global_every: int | None = None  # every N-th layer (1-based) is global, the others local
    local_rope_theta: float | None = None
    query_pre_attn_scalar: float | None = None  # attention scale 1/sqrt(this); None: 1/sqrt(head_dim)
    npu_path: bool = True  # the compiler's graphs implement its blocks (else: float path only, refused at validate)

    def layer_kinds(self, n_layers: int, sliding_window: int | None) -> tuple[LayerKind, ...]:
        if self.global_every is None or sliding_window is None:
            return ()
        return tuple("global" if (i + 1) % self.global_every == 0 else "local" for i in range(n_layers))


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("llama", rope_style_gguf="adjacent"),
        Architecture("qwen2", rope_style_gguf="half"),
        Architecture(
            "gemma3", rope_style_gguf="half", activation="gelu_tanh", scale_embeddings=True, qk_norm=True,
            sandwich_norms=True, global_every=6, local_rope_theta=10_000.0, query_pre_attn_scalar=256.0,
            npu_path=False,  # its graphs (GeGLU, QK-norm, sandwich norms, windows) are not built yet
        ),
    )
}  # fmt: skip


def npu_architectures() -> list[str]:
    """The architectures whose blocks the NPU path (compile/, runtime/) implements."""
    return [name for name, arch in ARCHITECTURES.items() if arch.npu_path]

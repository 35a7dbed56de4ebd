"""profiles/gemma3-270m.toml validates (float32 on the CPU); an NPU backend for Gemma 3 is refused
at validate, naming the architectures the NPU path implements; the spec's layer kinds."""

from __future__ import annotations

from pathlib import Path

from mllm_deploy.cli import main
from mllm_deploy.model import read_spec

PROFILE = str(Path(__file__).parent.parent / "profiles" / "gemma3-270m.toml")


def test_the_gemma3_spec_has_five_local_layers_to_one_global():
    spec = read_spec("builtin:gemma3-270m")
    assert spec.architecture == "gemma3" and (spec.n_layers, spec.hidden, spec.vocab) == (18, 640, 262144)
    assert [i for i, kind in enumerate(spec.layer_kinds) if kind == "global"] == [5, 11, 17]
    assert (spec.sliding_window, spec.rope_theta, spec.local_rope_theta) == (512, 1e6, 10_000.0)
    assert (spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.attention_scale) == (4, 1, 256, 1 / 16)
    assert spec.activation == "gelu_tanh" and spec.qk_norm and spec.sandwich_norms and spec.tied_embeddings
    assert abs(spec.embedding_scale - 640**0.5) < 1e-9 and spec.final_logit_softcap is None


def test_profile_validates_and_an_npu_backend_is_refused_with_the_supported_architectures(capsys):
    assert main(["validate", PROFILE]) == 0
    assert "npu backend none" in capsys.readouterr().out
    assert main(["validate", PROFILE, "--set", "device.npu_backend=ort-cpu"]) == 3
    err = capsys.readouterr().err
    assert "model.source: the NPU path does not implement the gemma3 architecture yet" in err
    assert "(got 'gemma3'; allowed: llama, qwen2)" in err

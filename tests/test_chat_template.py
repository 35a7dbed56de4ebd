"""Chat templates: the model's own (GGUF / tokenizer_config.json), a file, or the ChatML fallback."""

from __future__ import annotations

import dataclasses
import json

import pytest
import tiny_models as tm

from mllm_deploy.errors import UserError
from mllm_deploy.model import load_tokenizer, read_spec
from mllm_deploy.model.chat_template import (
    choose_template,
    choose_template_with_origin,
    fallback_template_path,
    render_chat,
)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


pytestmark = pytest.mark.usefixtures("module_private_cache")  # sha256 cache out of the user's dir


def test_smollm2_template_renders_a_chatml_user_turn(smollm_spec):
    template = choose_template(smollm_spec, "auto", None)
    assert template == smollm_spec.chat_template
    prompt = render_chat(QUESTION, template=template)
    assert prompt == (
        f"<|im_start|>system\n{SMOLLM_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without = render_chat(QUESTION, template=template, add_generation_prompt=False)
    assert without == prompt.removesuffix("<|im_start|>assistant\n")
    own_system = render_chat([{"role": "system", "content": "Be brief."}, *QUESTION], template=template)
    assert own_system.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and SMOLLM_SYSTEM not in own_system


def test_rendered_prompt_tokenizes_with_special_tokens(smollm_spec):
    tok = load_tokenizer(smollm_spec)
    ids = tok.encode(render_chat(QUESTION, template=smollm_spec.chat_template))
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2  # three <|im_start|>, two <|im_end|>
    assert ids[-4:] == [1, *tok.encode("assistant\n")] == [1, 520, 9531, 198]


def test_fallback_is_chatml_when_the_model_has_none(smollm_spec):
    spec = dataclasses.replace(smollm_spec, chat_template=None)
    template, origin = choose_template_with_origin(spec, "auto", None)
    assert origin == str(fallback_template_path()) and fallback_template_path().is_file()
    assert render_chat(QUESTION, template=template) == (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_hf_directory_template_comes_from_tokenizer_config(tmp_path):
    directory = tm.write_tiny_hf(
        tmp_path / "hf", chat_template="{{ bos_token }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    )
    spec = read_spec(str(directory))
    template, origin = choose_template_with_origin(spec, "auto", None)
    assert origin == str(directory / "tokenizer_config.json")
    assert render_chat(QUESTION, template=template, bos_token="<s>") == "<s>[What is the capital of France?]"
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    assert read_spec(str(directory)).chat_template == "D"


def test_template_file_relative_to_the_profile(tmp_path, smollm_spec):
    (tmp_path / "my.jinja").write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    template = choose_template(smollm_spec, "my.jinja", tmp_path)
    assert render_chat(QUESTION, template=template) == "user: What is the capital of France?\n"


def test_missing_template_file_is_a_located_error(tmp_path, smollm_spec):
    with pytest.raises(UserError) as info:
        choose_template(smollm_spec, "nope.jinja", tmp_path)
    d = info.value.diagnostics[0]
    assert (d.message, d.file, d.key) == (
        "chat template file not found",
        str(tmp_path / "nope.jinja"),
        "model.chat_template",
    )


def test_syntax_error_names_file_and_line(tmp_path, smollm_spec):
    (tmp_path / "bad.jinja").write_text("line one\n{% for m in messages %}\n{{ m['content'] }\n{% endfor %}\n")
    with pytest.raises(UserError) as info:
        choose_template(smollm_spec, str(tmp_path / "bad.jinja"), None)
    d = info.value.diagnostics[0]
    assert d.file == str(tmp_path / "bad.jinja") and d.line == 3 and d.message.startswith("chat template syntax error:")


def test_raise_exception_and_runtime_errors_are_user_errors():
    template = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('System message required') }}{% endif %}"
    with pytest.raises(UserError) as info:
        render_chat(QUESTION, template=template, origin="model.gguf")
    d = info.value.diagnostics[0]
    assert (d.message, d.file) == ("the chat template refused the conversation: System message required", "model.gguf")
    with pytest.raises(UserError) as info:
        render_chat(QUESTION, template="{{ messages.append(1) }}")  # the sandbox is immutable
    assert info.value.diagnostics[0].message.startswith("chat template error: SecurityError")
    with pytest.raises(UserError) as info:
        render_chat([{"role": "user"}], template="x")
    assert info.value.diagnostics[0].message == "chat message 0 must have a string 'role' and 'content'"


def test_template_helpers_hf_templates_use():
    import datetime

    rendered = render_chat(
        [{"role": "user", "content": "café"}],
        template="{{ messages | tojson }}|{{ strftime_now('%Y') }}|{% for m in messages %}{% break %}{% endfor %}  \n{%- if true %}\n  x{% endif %}",
    )
    assert rendered == f'[{{"role": "user", "content": "café"}}]|{datetime.date.today().year}|  x'

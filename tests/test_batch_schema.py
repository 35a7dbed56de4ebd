"""The JSONL batch format: its committed JSON Schemas are current, real request lines are judged
alike by the model and the schema, and a result line keeps the keys `run --batch` prints."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel, TypeAdapter

from mllm_deploy.cli import main
from mllm_deploy.errors import UserError
from mllm_deploy.events import GenerationDone, GenerationMetrics
from mllm_deploy.interface.batch import (
    REGENERATE_COMMAND,
    REQUEST_SCHEMA_PATH,
    RESULT_SCHEMA_PATH,
    BatchError,
    BatchMetrics,
    BatchRequest,
    BatchResult,
    ChatMessage,
    build_request_schema,
    error_line,
    output_json,
    parse_batch_line,
    request_schema_text,
    result_schema_text,
    stale_files,
)
from mllm_deploy.runtime.report import result_record

try:  # not a dependency: where it is installed, the published schema is checked too
    import jsonschema
except ImportError:
    jsonschema = None

CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Germany?"},
]
# (request line, valid?): the lines of the end-to-end batch test and the rules between keys
REQUEST_LINES = [
    ({"prompt": "What is the capital of France?", "id": "a"}, True),
    ({"messages": CONVERSATION}, True),
    ({"messages": [{"role": "system", "content": "Be brief."}, *CONVERSATION], "raw": False, "id": 3}, True),
    ({"prompt": "The quick brown fox jumps over the lazy", "raw": True, "max_new_tokens": 1}, True),
    ({"prompt": "Hi", "system": "Answer in French.", "max_new_tokens": 8}, True),
    ({"prompt": "hi", "temperature": 2}, False),
    ({}, False),
    ({"prompt": "a", "messages": CONVERSATION}, False),
    ({"messages": CONVERSATION, "raw": True}, False),
    ({"prompt": "a", "raw": True, "system": "s"}, False),
    ({"messages": [{"role": "robot", "content": "x"}]}, False),
    ({"messages": [{"role": "user", "content": "x", "name": "me"}]}, False),
    ({"messages": []}, False),
    ({"prompt": ""}, False),
    ({"prompt": None}, False),
    ({"prompt": "a", "raw": "yes"}, False),
    ({"prompt": "a", "max_new_tokens": 0}, False),
    ({"prompt": "a", "max_new_tokens": True}, False),
    ({"prompt": "a", "id": 1.5}, False),
]
METRIC_KEYS = {"load_s", "ttft_ms", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_mb"}


@pytest.mark.parametrize(
    ("path", "generate"), [(REQUEST_SCHEMA_PATH, request_schema_text), (RESULT_SCHEMA_PATH, result_schema_text)]
)
def test_committed_schema_is_current(path, generate):
    assert path.is_file(), f"{path} is missing; run `{REGENERATE_COMMAND}`"
    assert path.read_text(encoding="utf-8") == generate(), (
        f"{path} is stale: the batch models changed; run `{REGENERATE_COMMAND}` and commit the result"
    )
    assert stale_files() == []


def test_a_stale_schema_is_noticed(tmp_path, monkeypatch):
    stale = tmp_path / "batch-request.schema.json"
    stale.write_text("{}\n", encoding="utf-8")
    monkeypatch.setattr("mllm_deploy.interface.batch.REQUEST_SCHEMA_PATH", stale)
    assert stale_files() == [stale]


def test_request_schema_has_limits_rules_and_no_null():
    schema = build_request_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["additionalProperties"] is False
    properties = schema["properties"]
    assert properties["max_new_tokens"] == properties["max_new_tokens"] | {"type": "integer", "minimum": 1}
    assert properties["prompt"]["minLength"] == 1 and properties["messages"]["minItems"] == 1
    assert schema["$defs"]["ChatMessage"]["properties"]["role"]["enum"] == ["system", "user", "assistant"]
    assert schema["oneOf"] == [{"required": ["prompt"]}, {"required": ["messages"]}]
    assert "required" not in schema  # every key is optional; oneOf names the one that is needed
    text = json.dumps(schema)
    assert '"type": "null"' not in text and '"default"' not in text  # absent, never null


@pytest.mark.parametrize("model", [ChatMessage, BatchRequest, BatchMetrics, BatchResult, BatchError])
def test_every_field_is_documented(model: type[BaseModel]):
    assert [name for name, field in model.model_fields.items() if not field.description] == []


@pytest.mark.parametrize(("request_line", "valid"), REQUEST_LINES)
def test_request_lines_are_judged_alike_by_model_and_schema(request_line, valid):
    line = json.dumps(request_line)
    try:
        parse_batch_line(line, 1)
        accepted = True
    except UserError:
        accepted = False
    assert accepted == valid
    if jsonschema is not None:
        schema = json.loads(REQUEST_SCHEMA_PATH.read_text(encoding="utf-8"))
        assert jsonschema.Draft202012Validator(schema).is_valid(json.loads(line)) == valid


def _result_line(done: GenerationDone, request: BatchRequest) -> dict:
    record = result_record(done, load_s=1.25, backend="none")
    return json.loads(output_json(BatchResult.model_validate({"line": 4, "id": request.id, **record})))


def test_result_line_keeps_the_printed_keys():
    metrics = GenerationMetrics(
        ttft_ms=12.5, prefill_seconds=0.1, prefill_tokens_per_s=370.0, decode_seconds=0.2, decode_tokens_per_s=35.0
    )
    done = GenerationDone("Paris.", "eos", 37, 0, 37, 0, 8, metrics=metrics)
    with_id = _result_line(done, parse_batch_line('{"prompt": "a", "id": "a"}', 4))
    assert list(with_id)[:2] == ["line", "id"] and (with_id["line"], with_id["id"]) == (4, "a")
    assert with_id["text"] == "Paris." and with_id["finish_reason"] == "eos" and with_id["backend"] == "none"
    assert set(with_id["metrics"]) == METRIC_KEYS and with_id["metrics"]["ttft_ms"] == 12.5
    # no id: the key is left out; nothing measured: the metric is null, its key stays
    unmeasured = _result_line(GenerationDone("", "cancelled", 5, 0, 5, 0, 0), parse_batch_line('{"prompt": "a"}', 4))
    assert "id" not in unmeasured and set(unmeasured["metrics"]) == METRIC_KEYS
    assert unmeasured["metrics"]["ttft_ms"] is None
    assert set(with_id) - set(unmeasured) == {"id"}


def test_result_and_error_lines_match_the_result_schema():
    done = GenerationDone("Paris.", "eos", 37, 0, 37, 0, 8)
    lines = [_result_line(done, parse_batch_line('{"prompt": "a", "id": 7}', 4))]
    with pytest.raises(UserError) as caught:
        parse_batch_line('{"prompt": "", "max_new_tokens": 0}', 9)
    lines.append(json.loads(output_json(error_line(9, caught.value))))
    assert lines[1] == {
        "line": 9,
        "error": "line 9: 'prompt' must be a non-empty string; line 9: 'max_new_tokens' must be an integer >= 1",
    }
    adapter: TypeAdapter[BatchResult | BatchError] = TypeAdapter(BatchResult | BatchError)
    assert [type(adapter.validate_python(line)) for line in lines] == [BatchResult, BatchError]
    if jsonschema is not None:
        schema = json.loads(RESULT_SCHEMA_PATH.read_text(encoding="utf-8"))
        assert all(jsonschema.Draft202012Validator(schema).is_valid(line) for line in lines)


@pytest.mark.parametrize(
    ("argv", "generate"),
    [(["schema", "batch-request"], request_schema_text), (["schema", "batch-result"], result_schema_text)],
)
def test_schema_command_prints_the_batch_schemas(capsys, argv, generate):
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert err == "" and out == generate()

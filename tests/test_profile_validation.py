"""Shape validation of profiles: every key's limits, located messages, did-you-mean, bad files."""

from __future__ import annotations

from pathlib import Path

import pytest
from plan_fixtures import write_profile

from mllm_deploy.errors import ExitCode, UserError
from mllm_deploy.profile import load_profile
from mllm_deploy.profile.fields import all_keys


def errors_of(path: Path, overrides=()) -> UserError:
    with pytest.raises(UserError) as caught:
        load_profile(path, overrides)
    assert caught.value.exit_code == ExitCode.INVALID
    return caught.value


# (dotted key, bad TOML value, fragments the rendered message must contain)
BAD_VALUES = [
    ("schema_version", "2", ["not an allowed value", "got 2", "allowed: one of 1"]),
    ("name", '""', ["must not be empty", "got ''", "a string of 1 to 128 characters"]),
    ("model.source", '""', ["must not be empty", "a non-empty string"]),
    (
        "model.chat_template",
        "5",
        ["expected a non-empty string, got an integer", "got 5", 'quote it: chat_template = "5"'],
    ),
    ("model.system_prompt", "1.5", ["expected a string, got a number", "got 1.5"]),
    ("device.target", '""', ["must not be empty", "a non-empty string"]),
    (
        "device.npu_backend",
        '"qnn"',
        ["got 'qnn'", 'one of "auto", "qnn-htp", "ort-cpu", "none"', "did you mean 'qnn-htp'?"],
    ),
    ("device.cpu_threads", "0", ["must be >= 1", "got 0", "an integer from 1 to 256"]),
    ("device.npu_threads", "257", ["must be <= 256", "got 257", "an integer from 1 to 256"]),
    ("prefill.chunk_size", "5000", ["must be <= 4096", "got 5000", "an integer from 1 to 4096"]),
    ("prefill.tail_chunk_size", "-1", ["must be >= 0", "got -1", "an integer from 0 to 4096"]),
    (
        "prefill.max_context",
        '"4096"',
        ["expected an integer, got a string", "got '4096'", "without quotes: max_context = 4096"],
    ),
    (
        "prefill.overflow",
        '"truncate"',
        ["got 'truncate'", 'one of "error", "truncate-left"', "did you mean 'truncate-left'?"],
    ),
    ("prefill.attention", '"int4"', ["got 'int4'", 'one of "float32", "int8"', "did you mean 'int8'?"]),
    ("quantization.weights", '"int8"', ["got 'int8'", 'one of "int8-per-tensor", "int8-per-channel"']),
    ("quantization.activations", '"int8"', ['one of "uint8", "uint16"', "did you mean 'uint8'?"]),
    ("outliers.policy", '"shadw"', ['one of "none", "clip", "shadow"', "did you mean 'shadow'?"]),
    ("outliers.scale_percentile", "50", ["must be > 50", "got 50", "a number > 50 and <= 100"]),
    ("outliers.hot_channel_fraction", "1.5", ["must be <= 1", "got 1.5", "a number from 0 to 1"]),
    ("outliers.prune_fraction", "-0.1", ["must be >= 0", "got -0.1", "a number from 0 to 1"]),
    ("scheduler.policy", '"out_of_order"', ['one of "sequential", "out-of-order"', "did you mean 'out-of-order'?"]),
    ("placement.attention", '"gpu"', ["got 'gpu'", 'one of "cpu", "npu"']),
    ("placement.norms", "true", ["got True", 'one of "cpu", "npu"']),
    ("placement.lm_head", '"NPU"', ["got 'NPU'", "did you mean 'npu'?"]),
    ("decode.max_new_tokens", "0", ["must be >= 1", "an integer from 1 to 1048576"]),
    ("decode.temperature", "-1.0", ["must be >= 0", "got -1.0", "a number from 0 to 10"]),
    ("decode.top_k", "1.5", ["expected an integer, got a number", "got 1.5", "an integer from 0 to 1000000"]),
    ("decode.top_p", "0", ["must be > 0", "a number > 0 and <= 1"]),
    ("decode.repetition_penalty", "0.5", ["must be >= 1", "a number from 1 to 10"]),
    ("decode.seed", "-1", ["must be >= 0", "an integer from 0 to 9223372036854775807"]),
    ("decode.kv_cache", '"int4"', ['one of "int8", "float32"', "got 'int4'"]),
    ("decode.weight_block", "48", ["one of 32, 64, 128", "got 48"]),
    ("decode.weight_bits", "2", ["one of 4, 8", "got 2"]),
    ("decode.stop", '"</s>"', ["expected an array", "got '</s>'", 'write an array: stop = ["</s>"]']),
    ("calibration.source", '""', ["must not be empty"]),
    ("calibration.samples", "0", ["must be >= 1", "an integer from 1 to 4096"]),
    ("calibration.tokens_per_sample", "4", ["must be >= 8", "an integer from 8 to 65536"]),
    ("accuracy.max_ppl_ratio", "1.0", ["must be > 1", "got 1.0", "a number > 1 and <= 100"]),
    ("ui.refresh_hz", "100", ["must be <= 60", "got 100", "a number from 0.5 to 60"]),
]


def test_the_table_covers_every_key():
    leaves = {key for key, info in all_keys().items() if not info.is_section}
    assert {key for key, _, _ in BAD_VALUES} == leaves


@pytest.mark.parametrize(("key", "bad", "fragments"), BAD_VALUES, ids=[row[0] for row in BAD_VALUES])
def test_bad_value_of_every_key_is_located_and_explained(tmp_path, key, bad, fragments):
    section, _, name = key.rpartition(".")
    header = f"[{section}]\n" if section else ""
    path = write_profile(tmp_path, f"# a profile\n\n{header}{name} = {bad}\n")
    line = 4 if section else 3
    err = errors_of(path)
    assert len(err.diagnostics) == 1
    text = str(err)
    assert text.startswith(f"{path}:{line}:1: error: {key}: ")
    for fragment in fragments:
        assert fragment in text


@pytest.mark.parametrize(("key", "bad", "fragments"), BAD_VALUES, ids=[row[0] for row in BAD_VALUES])
def test_bad_value_of_every_key_by_set_is_located_at_the_override(tmp_path, key, bad, fragments):
    path = write_profile(tmp_path, 'name = "x"\n')
    err = errors_of(path, [f"{key}={bad}"])
    assert str(err).startswith(f"--set {key}={bad}: error: {key}: ")
    for fragment in fragments:
        assert fragment in str(err)


def test_all_errors_are_reported_at_once_in_file_order(tmp_path):
    path = write_profile(
        tmp_path,
        """name = ""
[device]
npu_backend = "qnn"
[prefill]
chunk_sz = 256
max_context = 0
[decode]
stop = ["a", "", 3]
""",
    )
    err = errors_of(path)
    located = [(d.line, d.col, d.key) for d in err.diagnostics]
    assert located == [
        (1, 1, "name"),
        (3, 1, "device.npu_backend"),
        (5, 1, "prefill.chunk_sz"),
        (6, 1, "prefill.max_context"),
        (8, 14, "decode.stop[1]"),
        (8, 18, "decode.stop[2]"),
    ]


def test_errors_in_inline_tables_and_dotted_keys_point_at_the_key(tmp_path):
    path = write_profile(tmp_path, "prefill = { chunk_size = 0, max_context = 8 }\ndecode.top_p = 2.0\n")
    err = errors_of(path)
    assert [(d.key, d.line, d.col) for d in err.diagnostics] == [
        ("prefill.chunk_size", 1, 13),
        ("decode.top_p", 2, 8),
    ]


@pytest.mark.parametrize(
    ("text", "key", "hint"),
    [
        ("[prefill]\nchunk_sz = 256\n", "prefill.chunk_sz", "did you mean 'prefill.chunk_size'?"),
        ("[decode]\ntempreature = 0.5\n", "decode.tempreature", "did you mean 'decode.temperature'?"),
        (
            "[decode]\nchunk_size = 1\n",
            "decode.chunk_size",
            "'chunk_size' belongs in [prefill]: did you mean 'prefill.chunk_size'?",
        ),
        ("chunk_size = 1\n", "chunk_size", "'chunk_size' belongs in [prefill]: did you mean 'prefill.chunk_size'?"),
        ("[prefil]\nchunk_size = 1\n", "prefil", "did you mean 'prefill'?"),
        ('[model]\nname = "x"\n', "model.name", "'name' belongs at the top level: did you mean 'name'?"),
        ('[device]\nbackend = "none"\n', "device.backend", "did you mean 'device.npu_backend'?"),
        (
            '[decode]\nsource = "self"\n',
            "decode.source",
            "'source' belongs in [model] or in [calibration]: did you mean 'model.source' or 'calibration.source'?",
        ),
    ],
)
def test_did_you_mean_for_misspelt_or_misplaced_keys(tmp_path, text, key, hint):
    err = errors_of(write_profile(tmp_path, text))
    (diag,) = err.diagnostics
    assert diag.key == key
    assert diag.line == (1 if key in ("prefil", "chunk_size") else 2)
    assert diag.hint == hint
    assert "unknown" in diag.message


def test_unknown_key_lists_the_keys_of_its_section(tmp_path):
    (diag,) = errors_of(write_profile(tmp_path, "[prefill]\nchunk = 1\n")).diagnostics
    assert diag.allowed == "keys of [prefill]: chunk_size, tail_chunk_size, max_context, overflow, attention"
    assert diag.value == 1


def test_array_of_tables_where_a_section_belongs(tmp_path):
    (diag,) = errors_of(write_profile(tmp_path, "[[prefill]]\nchunk_size = 1\n")).diagnostics
    assert (diag.key, diag.line, diag.col) == ("prefill", 1, 3)
    assert diag.message == "must be a table, not an array of tables"
    assert diag.hint == "write [prefill], not [[prefill]]"


def test_section_given_a_scalar(tmp_path):
    (diag,) = errors_of(write_profile(tmp_path, "prefill = 3\n")).diagnostics
    assert diag.message == "must be a table, not an integer"
    assert diag.key == "prefill" and diag.line == 1


def test_nan_and_inf_are_refused(tmp_path):
    err = errors_of(write_profile(tmp_path, "[decode]\ntemperature = nan\n[ui]\nrefresh_hz = inf\n"))
    assert [d.key for d in err.diagnostics] == ["decode.temperature", "ui.refresh_hz"]
    assert all("finite number" in d.message for d in err.diagnostics)


def test_integer_written_as_float_gets_a_hint(tmp_path):
    (diag,) = errors_of(write_profile(tmp_path, "[prefill]\nchunk_size = 256.0\n")).diagnostics
    assert diag.hint == "write a whole number: chunk_size = 256"


def test_a_value_is_accepted_at_its_limits(tmp_path):
    loaded = load_profile(write_profile(tmp_path, "[prefill]\nchunk_size = 4096\n[outliers]\nscale_percentile = 100\n"))
    assert loaded.profile.prefill.chunk_size == 4096
    assert loaded.profile.outliers.scale_percentile == 100.0


# --- TOML syntax errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "col", "fragment", "hint"),
    [
        (
            "[device]\nnpu_backend = qnn-htp\n",
            2,
            15,
            "invalid value",
            'strings need quotes in TOML: npu_backend = "qnn-htp"',
        ),
        ('name = "a"\nname = "b"\n', 2, 11, "cannot overwrite a value", None),
        ("[prefill]\nchunk_size = 1\n[prefill]\n", 3, 9, "cannot declare ('prefill',) twice", None),
        ("[prefill\n", 1, 9, "expected ']'", None),
        (
            'name = "x\n',
            1,
            10,
            "illegal character",
            "a string is not closed on this line (use triple quotes for text spanning lines)",
        ),
        ('[decode]\nstop = ["a",\n', 2, 13, "invalid value", None),
    ],
)
def test_toml_syntax_errors_are_located(tmp_path, text, line, col, fragment, hint):
    (diag,) = errors_of(write_profile(tmp_path, text)).diagnostics
    assert (diag.line, diag.col) == (line, col)
    assert diag.message.startswith("invalid TOML: ")
    assert fragment in diag.message
    assert diag.hint == hint


def test_syntax_error_names_the_key_on_its_line(tmp_path):
    (diag,) = errors_of(write_profile(tmp_path, "[device]\nnpu_backend = qnn-htp\n")).diagnostics
    assert diag.key == "device.npu_backend"


# --- files that are not profiles --------------------------------------------------------


def test_missing_file(tmp_path):
    (diag,) = errors_of(tmp_path / "nope.toml").diagnostics
    assert diag.message == "no such profile file"
    assert diag.file == str(tmp_path / "nope.toml")


def test_directory(tmp_path):
    (diag,) = errors_of(tmp_path).diagnostics
    assert diag.message.startswith("is a directory")


def test_binary_file_is_located_at_the_first_nul(tmp_path):
    (diag,) = errors_of(write_profile(tmp_path, b'name = "x"\nab\x00cd')).diagnostics
    assert "NUL" in diag.message and (diag.line, diag.col) == (2, 3)


def test_non_utf8_file_is_located(tmp_path):
    (diag,) = errors_of(write_profile(tmp_path, b'name = "ok"\nname2 = "caf\xe9"\n')).diagnostics
    assert "not valid UTF-8 (byte 0xe9)" in diag.message
    assert (diag.line, diag.col) == (2, 13)


def test_utf8_bom_is_accepted(tmp_path):
    loaded = load_profile(write_profile(tmp_path, '\ufeffname = "bom"\n'.encode("utf-8")))
    assert loaded.profile.name == "bom"


def test_unreadable_file(tmp_path, monkeypatch):
    path = write_profile(tmp_path, 'name = "x"\n')

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", refuse)  # tests may run as root, where chmod 0 still reads
    (diag,) = errors_of(path).diagnostics
    assert diag.message == "cannot read the profile file: permission denied"
    assert diag.file == str(path)


def test_empty_file_is_all_defaults_with_a_warning(tmp_path):
    loaded = load_profile(write_profile(tmp_path, ""))
    assert loaded.profile.prefill.chunk_size == 256
    assert loaded.explicit == frozenset()
    (warning,) = loaded.warnings
    assert warning.severity == "warning" and "sets no keys" in warning.message


def test_huge_file_is_refused(tmp_path):
    (diag,) = errors_of(write_profile(tmp_path, "#" * 1_000_001)).diagnostics
    assert "larger than" in diag.message


def test_absurdly_nested_values_are_refused_not_crashed(tmp_path):
    (diag,) = errors_of(write_profile(tmp_path, "name = " + "[" * 5000 + "]" * 5000 + "\n")).diagnostics
    assert diag.message == "invalid TOML: arrays or tables nested too deeply"
    from mllm_deploy.profile.locate import locate_keys

    assert locate_keys("x = 1\ny = " + "[" * 5000 + "]" * 5000 + "\n")["x"] == (1, 1)

"""`--set` overrides, LoadedProfile (explicit keys, where(), hash) and profile warnings."""

from __future__ import annotations

import pytest
from plan_fixtures import write_profile

from mllm_deploy.errors import Diagnostic, UserError
from mllm_deploy.profile import default_profile_path, load_profile, load_profile_text
from mllm_deploy.profile.overrides import parse_override, parse_value


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("128", 128),
        ("0.5", 0.5),
        ("true", True),
        ('["a", "b"]', ["a", "b"]),
        ('"quoted"', "quoted"),
        ("none", "none"),
        ("qnn-htp", "qnn-htp"),
        ("builtin:smollm2-135m-instruct", "builtin:smollm2-135m-instruct"),
        ("  spaced  ", "spaced"),
        ("", ""),
        ("1\nname = 2", "1\nname = 2"),  # not a single TOML value: a bare string
        ("{chunk_size = 64}", {"chunk_size": 64}),
    ],
)
def test_override_values_are_toml_or_bare_strings(raw, value):
    assert parse_value(raw) == value


def test_overrides_set_values_and_are_explicit(tmp_path):
    path = write_profile(tmp_path, "[prefill]\nchunk_size = 256\n")
    loaded = load_profile(path, ["prefill.chunk_size=128", "device.npu_backend=none", 'decode.stop=["</s>"]'])
    assert loaded.profile.prefill.chunk_size == 128
    assert loaded.profile.device.npu_backend == "none"
    assert loaded.profile.decode.stop == ["</s>"]
    assert loaded.explicit == {"prefill.chunk_size", "device.npu_backend", "decode.stop"}
    assert loaded.overrides == ("prefill.chunk_size=128", "device.npu_backend=none", 'decode.stop=["</s>"]')


def test_last_override_wins_and_a_table_value_merges(tmp_path):
    path = write_profile(tmp_path, "[prefill]\nchunk_size = 256\nmax_context = 2048\n")
    loaded = load_profile(path, ["prefill.chunk_size=64", "prefill={chunk_size = 32}"])
    assert loaded.profile.prefill.chunk_size == 32
    assert loaded.profile.prefill.max_context == 2048


@pytest.mark.parametrize(
    ("override", "message", "hint"),
    [
        ("prefill.chunk_size", "expected KEY=VALUE", "e.g. --set prefill.chunk_size=128"),
        ("=3", "empty key before '='", "e.g. --set prefill.chunk_size=128"),
        ("a b=1", "not a dotted key: 'a b'", "e.g. --set prefill.chunk_size=128"),
        ("prefill..chunk_size=1", "not a dotted key: 'prefill..chunk_size'", "e.g. --set prefill.chunk_size=128"),
        ("prefill.chunk=1", "unknown key", "did you mean 'prefill.chunk_size'?"),
        ("prefil.chunk_size=1", "unknown key", "did you mean 'prefill'?"),
        ("chunk_size=1", "unknown key", "'chunk_size' belongs in [prefill]: did you mean 'prefill.chunk_size'?"),
        (
            "prefill=3",
            "[prefill] is a section, not a value",
            "set one of its keys, e.g. --set prefill.chunk_size=VALUE",
        ),
        ("name.first=1", "'name' is a value, not a section", None),
    ],
)
def test_malformed_overrides_are_located_at_the_override(tmp_path, override, message, hint):
    path = write_profile(tmp_path, 'name = "x"\n')
    with pytest.raises(UserError) as caught:
        load_profile(path, [override])
    (diag,) = caught.value.diagnostics
    assert diag.file == f"--set {override}"
    assert diag.line is None
    assert diag.message == message
    assert diag.hint == hint
    assert diag.render().startswith(f"--set {override}: error: ")


def test_override_diagnostics_come_after_file_ones_in_command_line_order(tmp_path):
    path = write_profile(tmp_path, "[prefill]\nchunk_size = 0\n")
    with pytest.raises(UserError) as caught:
        load_profile(path, ["decode.seed=-1", "bogus=1", "ui.refresh_hz=0"])
    assert [d.file for d in caught.value.diagnostics] == [
        str(path),
        "--set decode.seed=-1",
        "--set bogus=1",
        "--set ui.refresh_hz=0",
    ]


def test_parse_override_returns_the_key_parts():
    parsed = parse_override(" decode.top_k = 40")
    assert not isinstance(parsed, Diagnostic)
    assert parsed.key == ("decode", "top_k") and parsed.value == 40


# --- LoadedProfile --------------------------------------------------------------------

PROFILE = """# comment
name = "demo"

[prefill]
chunk_size = 128   # comment
max_context = 2048

[decode]
stop = [
  "a",
  "b",
]
"""


def test_locations_explicit_and_base_dir(tmp_path):
    loaded = load_profile(write_profile(tmp_path, PROFILE))
    assert loaded.locations["prefill"] == (4, 2)
    assert loaded.locations["prefill.max_context"] == (6, 1)
    assert loaded.locations["decode.stop.1"] == (11, 3)
    assert loaded.explicit == {"name", "prefill.chunk_size", "prefill.max_context", "decode.stop"}
    assert loaded.base_dir == tmp_path.resolve()
    assert loaded.path == tmp_path / "p.toml"
    assert loaded.is_explicit("prefill") and not loaded.is_explicit("outliers")


@pytest.mark.parametrize(
    ("key", "line", "col"),
    [
        ("prefill.chunk_size", 5, 1),
        ("prefill", 4, 2),
        ("decode.stop[1]", 11, 3),
        ("decode.stop.1", 11, 3),
        ("prefill.unknown_key", 4, 2),  # falls back to the enclosing section
        ("prefill.overflow", 4, 2),  # a default inside a written section
        ("outliers.policy", None, None),  # nothing written: the file, no line
        ("", None, None),
    ],
)
def test_where_locates_keys_and_falls_back(tmp_path, key, line, col):
    path = write_profile(tmp_path, PROFILE)
    where = load_profile(path).where(key)
    assert where["file"] == str(path)
    assert (where["line"], where["col"]) == (line, col)


def test_where_points_at_the_override_that_set_a_key(tmp_path):
    path = write_profile(tmp_path, PROFILE)
    loaded = load_profile(path, ["prefill.chunk_size=64", "outliers.policy=clip"])
    assert loaded.where("prefill.chunk_size") == {
        "file": "--set prefill.chunk_size=64",
        "line": None,
        "col": None,
        "key": "prefill.chunk_size",
    }
    assert loaded.where("prefill")["line"] == 4  # the section itself is in the file
    assert loaded.where("outliers")["file"] == "--set outliers.policy=clip"
    diag = Diagnostic(message="too big for this NPU", **loaded.where("prefill.max_context"))
    assert diag.render() == f"{path}:6:1: error: prefill.max_context: too big for this NPU"


def test_where_accepts_a_pydantic_loc_tuple_and_never_raises(tmp_path):
    loaded = load_profile(write_profile(tmp_path, PROFILE))
    assert loaded.where(("decode", "stop", 0))["line"] == 10
    for odd in (None, "...", "[3]", "a.b.c.d.e", "decode.stop[99]", "prefill.chunk_size.x"):
        assert set(loaded.where(odd)) == {"file", "line", "col", "key"}


def test_default_profile_when_path_is_none():
    loaded = load_profile(None)
    assert loaded.path == default_profile_path()
    assert loaded.profile.name == "default"
    assert loaded.profile.model.source == "builtin:smollm2-135m-instruct"
    assert loaded.profile.device.target == "host"
    assert loaded.profile.device.npu_backend == "auto"
    assert (loaded.profile.prefill.chunk_size, loaded.profile.prefill.max_context) == (256, 4096)
    assert loaded.profile.quantization.weights == "int8-per-channel"
    assert loaded.profile.quantization.activations == "uint8"
    assert loaded.profile.outliers.policy == "shadow"
    assert loaded.profile.scheduler.policy == "out-of-order"
    assert loaded.warnings == []


def test_text_hash_depends_on_the_effective_values_only(tmp_path):
    a = load_profile_text('name = "x"\n[prefill]\nchunk_size = 256\n')
    b = load_profile_text('# other comments\nname = "x"\n')  # 256 is the default
    c = load_profile_text('name = "x"\n', overrides=["prefill.chunk_size=128"])
    assert a.text_hash == b.text_hash != c.text_hash
    assert len(a.text_hash) == 64


# --- warnings -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[device]\nnpu_backend = "qnn-htp"\nnpu_threads = 2\n',
            [("device.npu_threads", 3, 'has no effect with device.npu_backend = "qnn-htp"')],
        ),
        (
            '[device]\nnpu_backend = "none"\nnpu_threads = 2\n[quantization]\nweights = "int8-per-tensor"\n'
            '[outliers]\npolicy = "clip"\n[scheduler]\npolicy = "sequential"\n',
            [
                ("device.npu_threads", 3, 'has no effect with device.npu_backend = "none"'),
                ("quantization.weights", 5, 'device.npu_backend = "none": everything runs in float32'),
                ("outliers.policy", 7, 'device.npu_backend = "none"'),
                ("scheduler.policy", 9, 'device.npu_backend = "none"'),
            ],
        ),
        (
            "[decode]\ntop_k = 40\ntop_p = 0.9\nseed = 7\n",
            [
                ("decode.top_k", 2, "has no effect with decode.temperature = 0 (greedy decoding)"),
                ("decode.top_p", 3, "decode.temperature = 0"),
                ("decode.seed", 4, "decode.temperature = 0"),
            ],
        ),
        (
            '[outliers]\npolicy = "none"\nprune_fraction = 0.5\nscale_percentile = 99.9\n',
            [
                ("outliers.prune_fraction", 3, 'has no effect with outliers.policy = "none"'),
                ("outliers.scale_percentile", 4, 'has no effect with outliers.policy = "none"'),
            ],
        ),
        (
            '[device]\nnpu_backend = "none"\n[placement]\nnorms = "npu"\n',
            [("placement.norms", 4, 'device.npu_backend = "none"')],
        ),
    ],
)
def test_warnings_for_keys_without_effect(tmp_path, text, expected):
    path = write_profile(tmp_path, text)
    loaded = load_profile(path)
    got = [(w.key, w.line, w.message) for w in loaded.warnings]
    assert [(key, line) for key, line, _ in got] == [(key, line) for key, line, _ in expected]
    for (_, _, message), (_, _, fragment) in zip(got, expected, strict=True):
        assert fragment in message
    assert all(w.severity == "warning" and w.file == str(path) for w in loaded.warnings)


@pytest.mark.parametrize(
    "text",
    [
        '[device]\nnpu_backend = "ort-cpu"\nnpu_threads = 2\n',
        '[device]\nnpu_backend = "auto"\nnpu_threads = 2\n',
        "[decode]\ntemperature = 0.7\ntop_k = 40\ntop_p = 0.9\nseed = 7\n",
        '[outliers]\npolicy = "shadow"\nprune_fraction = 0.5\n',
        '[device]\nnpu_backend = "none"\n[decode]\nrepetition_penalty = 1.1\n',
    ],
)
def test_no_warning_when_the_key_has_an_effect(tmp_path, text):
    assert load_profile(write_profile(tmp_path, text)).warnings == []


def test_warning_for_a_key_set_by_override_points_at_it(tmp_path):
    loaded = load_profile(write_profile(tmp_path, 'name = "x"\n'), ["decode.top_k=5"])
    (warning,) = loaded.warnings
    assert warning.render() == (
        "--set decode.top_k=5: warning: decode.top_k: has no effect with decode.temperature = 0 (greedy decoding)"
    )


def test_undecodable_override_and_file_name_are_reported_printably(tmp_path, capsys):
    from mllm_deploy.cli import main

    path = write_profile(tmp_path, 'name = "x"\n')
    with pytest.raises(UserError) as caught:
        load_profile(path, ["name=caf\udce9"])  # how Python decodes a non-UTF-8 argv byte
    (diag,) = caught.value.diagnostics
    assert diag.message == "not valid UTF-8 text"
    assert diag.file == "--set name=caf\\xe9"
    odd = tmp_path / "pro\udcfffile.toml"
    odd.write_text('name = ""\n', encoding="utf-8")
    assert main(["validate", str(odd)]) == 2
    assert "pro\\xfffile.toml:1:1: error: name: must not be empty" in capsys.readouterr().err

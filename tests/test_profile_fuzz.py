"""Property: no input makes profile loading or `mllm-deploy validate` crash.

Random TOML documents built from valid, misspelt and random keys with valid and invalid
values, mutated copies of real profiles, random text and bytes, random `--set` strings:
every one ends in a valid profile (exit 0), located diagnostics (exit 2) or, from the
resolver that `validate` runs next, "cannot run on this device" (exit 3); never a traceback.
"""

from __future__ import annotations

import json
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mllm_deploy.cli import main
from mllm_deploy.errors import UserError
from mllm_deploy.paths import resource_dir
from mllm_deploy.profile import load_profile
from mllm_deploy.profile.fields import all_keys
from mllm_deploy.profile.locate import locate_keys

FAST = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

LEAVES = [key for key, info in all_keys().items() if not info.is_section]
SECTIONS = [key for key, info in all_keys().items() if info.is_section]
CHOICES = sorted({str(c) for info in all_keys().values() for c in info.choices})
REAL_PROFILES = sorted(resource_dir("profiles").glob("*.toml"))


def _misspell(word: str) -> st.SearchStrategy[str]:
    return st.sampled_from([word[:-1] or "x", word + "s", word.upper(), word.replace("_", "-"), word[1:] or "y"])


key_names = st.one_of(
    st.sampled_from([key.rsplit(".", 1)[-1] for key in LEAVES] + SECTIONS),
    st.sampled_from(LEAVES + SECTIONS).flatmap(_misspell),
    st.text(alphabet=string.ascii_letters + string.digits + "_-", min_size=1, max_size=12),
    st.text(max_size=8),  # needs quoting; may be empty
)

scalars = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 8, 32, 256, 4096, 4097, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.5, 1.0, 50.0, 99.99, 100.0, -0.0]),
    st.booleans(),
    st.sampled_from([*CHOICES, "builtin:smollm2-135m-instruct", "self", "", "host", "sd8gen3"]),
    st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(key_names, inner, max_size=4)),
    max_leaves=8,
)


def toml_key(name: str) -> str:
    bare = name and all(ch in string.ascii_letters + string.digits + "_-" for ch in name)
    return name if bare else json.dumps(name)


def toml_value(value: object) -> str:
    """A TOML spelling of `value` (imperfect on purpose is fine: the loader must cope either way)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (int, str)):
        return json.dumps(value) if isinstance(value, str) else str(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


@st.composite
def toml_documents(draw) -> str:
    lines = []
    for key in draw(st.lists(st.one_of(key_names, st.sampled_from(LEAVES)), max_size=4)):
        lines.append(f"{'.'.join(toml_key(p) for p in key.split('.'))} = {toml_value(draw(values))}")
    for section in draw(st.lists(st.one_of(st.sampled_from(SECTIONS), key_names), max_size=4)):
        header = "[[{}]]" if draw(st.booleans()) and draw(st.booleans()) else "[{}]"
        lines.append(header.format(toml_key(section)))
        for name in draw(st.lists(key_names, max_size=4)):
            lines.append(f"{toml_key(name)} = {toml_value(draw(values))}  # c")
    return "\n".join(lines) + "\n"


@st.composite
def mutated_profiles(draw) -> str:
    text = draw(st.sampled_from(REAL_PROFILES)).read_text(encoding="utf-8")
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 6))
        text = (
            text[:at]
            + draw(st.sampled_from(["", "[", "]", '"', "=", "\n", "x", "0", ".", "{", "'''", "#"]))
            + text[at + cut :]
        )
    return text


set_strings = st.one_of(
    st.builds(lambda k, v: f"{k}={toml_value(v)}", st.sampled_from(LEAVES + SECTIONS), values),
    st.builds(lambda k, v: f"{k}={v}", st.one_of(st.sampled_from(LEAVES), key_names), st.text(max_size=12)),
    st.text(max_size=20),
)
profile_texts = st.one_of(toml_documents(), mutated_profiles(), st.text(max_size=200))
profile_bytes = st.one_of(profile_texts.map(lambda t: t.encode("utf-8", "surrogatepass")), st.binary(max_size=200))


def assert_loads_or_explains(path, overrides) -> None:
    try:
        loaded = load_profile(path, overrides)
    except UserError as err:
        assert err.diagnostics, "a UserError must carry at least one diagnostic"
        for diag in err.diagnostics:
            assert diag.render()
            json.dumps(diag.to_dict())
        return
    for key in ["prefill.chunk_size", "decode.stop[0]", "nonsense.key", *loaded.explicit]:
        assert set(loaded.where(key)) == {"file", "line", "col", "key"}
    assert len(loaded.text_hash) == 64


@FAST
@given(data=profile_bytes, overrides=st.lists(set_strings, max_size=3))
def test_load_profile_never_crashes(tmp_path, data, overrides):
    path = tmp_path / "fuzz.toml"
    path.write_bytes(data)
    assert_loads_or_explains(path, overrides)


@settings(max_examples=500, deadline=None)
@given(text=profile_texts)
def test_locator_never_crashes_and_finds_only_real_lines(text):
    lines = text.count("\n") + 1
    for line, col in locate_keys(text).values():
        assert 1 <= line <= lines and col >= 1


# `validate` also runs the resolver (device + model metadata, ~0.1 s) on every valid profile
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=profile_bytes, overrides=st.lists(set_strings, max_size=2))
def test_cli_validate_exits_0_2_or_3_with_a_message(tmp_path, capsys, data, overrides):
    path = tmp_path / "fuzz.toml"
    path.write_bytes(data)
    code = main(["validate", str(path), *[f"--set={text}" for text in overrides]])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "internal error" not in err
    assert code in (0, 2, 3)
    if code == 0:
        assert out.startswith(f"{path}: ok (name ")
    else:
        assert err.strip() and out == ""

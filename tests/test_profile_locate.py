"""The TOML key locator: dotted key -> (line, column)."""

from __future__ import annotations

import tomllib

from mllm_deploy.profile.locate import locate_keys

DOCUMENT = '''# top comment
name = "x" # trailing comment
model.source = "a.gguf"
[prefill]  # header comment
chunk_size = 128
 "max_context" = 1
[ decode ]
stop = [
  "a", # inside an array
  "b",
]
temperature = 0.5
[outliers]
x = { a = 1, b.c = [1, {d = 2}] }
s = """multi
[not_a_header]
key = "not a key"
"""
t = 1979-05-27 07:32:00Z
l = \'\'\'literal
'\'\'
[[arr]]
k = 1
[[arr]]
k = 2
"q\\u0041" = 3
[a.b]
c = 1
'''


def test_the_document_is_valid_toml():
    tomllib.loads(DOCUMENT)


def test_every_kind_of_key_is_located():
    found = locate_keys(DOCUMENT)
    assert found == {
        "name": (2, 1),
        "model": (3, 1),
        "model.source": (3, 7),
        "prefill": (4, 2),
        "prefill.chunk_size": (5, 1),
        "prefill.max_context": (6, 2),
        "decode": (7, 3),
        "decode.stop": (8, 1),
        "decode.stop.0": (9, 3),
        "decode.stop.1": (10, 3),
        "decode.temperature": (12, 1),
        "outliers": (13, 2),
        "outliers.x": (14, 1),
        "outliers.x.a": (14, 7),
        "outliers.x.b": (14, 14),
        "outliers.x.b.c": (14, 16),
        "outliers.x.b.c.0": (14, 21),
        "outliers.x.b.c.1": (14, 24),
        "outliers.x.b.c.1.d": (14, 25),
        "outliers.s": (15, 1),
        "outliers.t": (19, 1),
        "outliers.l": (20, 1),
        "arr": (22, 3),
        "arr.0": (22, 3),
        "arr.0.k": (23, 1),
        "arr.1": (24, 3),
        "arr.1.k": (25, 1),
        "arr.1.qA": (26, 1),
        "a": (27, 2),
        "a.b": (27, 4),
        "a.b.c": (28, 1),
    }


def test_located_keys_are_exactly_the_parsed_keys():
    def flatten(node, prefix=""):
        keys = set()
        if isinstance(node, dict):
            for key, value in node.items():
                dotted = f"{prefix}.{key}" if prefix else key
                keys |= {dotted} | flatten(value, dotted)
        elif isinstance(node, list):
            for index, value in enumerate(node):
                keys |= {f"{prefix}.{index}"} | flatten(value, f"{prefix}.{index}")
        return keys

    assert set(locate_keys(DOCUMENT)) == flatten(tomllib.loads(DOCUMENT))


def test_invalid_text_is_scanned_without_raising():
    for text in ["[", "a = [", 'a = "', "a.b. = 1", "= =", "[[x]", "{", "a = {b = ", "\\", "x = '''", "\x00"]:
        assert isinstance(locate_keys(text), dict)
    assert locate_keys("garbage line\nname = 1\n")["name"] == (2, 1)

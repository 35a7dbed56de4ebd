""" "Did you mean ...?" suggestions for misspelt keys and values."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from mllm_deploy.profile.fields import all_keys, keys_in


def closest(word: str, choices: Iterable[str], *, cutoff: float = 0.6) -> str | None:
    """The choice most similar to `word` (case-insensitive first), or None when nothing is close."""
    choices = list(choices)
    lowered = {choice.lower(): choice for choice in choices}
    folded = word.strip().lower()
    if folded in lowered:
        return lowered[folded]
    normalised = folded.replace("_", "-")
    for choice in choices:
        if choice.lower().replace("_", "-") == normalised:
            return choice
    matches = difflib.get_close_matches(folded, list(lowered), n=1, cutoff=cutoff)
    return lowered[matches[0]] if matches else None


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """A `did you mean 'x'?` hint, or None."""
    match = closest(word, choices)
    return f"did you mean {match!r}?" if match is not None and match != word else None


def suggest_key(section: str, name: str) -> str | None:
    """A hint for the unknown key `name` in `section` ("" = top level): a near miss in the same
    section, the same key in the section where it belongs, or a near miss anywhere."""
    here = keys_in(section)
    known = all_keys()
    elsewhere = [key for key in known if key.rsplit(".", 1)[-1] == name and key != f"{section}.{name}"]
    if elsewhere:
        homes = " or ".join(f"in [{key.rsplit('.', 1)[0]}]" if "." in key else "at the top level" for key in elsewhere)
        options = " or ".join(f"'{key}'" for key in elsewhere)
        return f"'{name}' belongs {homes}: did you mean {options}?"
    match = closest(name, here)
    if match is not None and match != name:
        full = f"{section}.{match}" if section else match
        return f"did you mean '{full}'?"
    leaves = {key.rsplit(".", 1)[-1]: key for key in known if "." in key}
    match = closest(name, leaves)
    if match is not None:
        return f"did you mean '{leaves[match]}'?"
    return None

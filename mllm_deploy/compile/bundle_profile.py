"""A bundle's `profile.toml`: the keys the user set (in the file or with --set), nothing else.

Every other key takes its default when the bundle is loaded, exactly as it did at build, so the
bundle's profile warns about nothing its source profile did not. Three keys are rewritten:
`model.source` points at the bundled model, `model.chat_template` (when it names a file) at the
bundled copy, and `device.npu_backend` names the backend the graphs were built for (`auto` could
choose another on another machine). A `calibration.source` naming text files is left out (the
text is not shipped; the artifacts hold what calibration measured) and said in a comment.
"""

from __future__ import annotations

import json

from mllm_deploy.profile import LoadedProfile


def bundle_profile_toml(loaded: LoadedProfile, *, backend: str, model_source: str, chat_template: str | None) -> str:
    """The profile of a bundle built from `loaded` (see the module docstring)."""
    profile = loaded.profile
    rewritten: dict[str, object] = {"model.source": model_source, "device.npu_backend": backend}
    if chat_template is not None:
        rewritten["model.chat_template"] = chat_template
    left_out = []
    if profile.calibration.source != "self" and loaded.is_explicit("calibration.source"):
        left_out.append(f"calibration.source = {_toml(profile.calibration.source)}")
    lines = [
        "# Written by `mllm-deploy build --out`: the keys set in the profile it was built from",
        f"# ({loaded.display_path or 'the built-in default'} and --set); every other key has its default.",
        "# Keys that change the graphs (chunk size, quantization, outliers, placement, ...) cannot change",
        "# on a bundle; runtime keys (threads, decode.*, scheduler.policy, ...) can, with --set.",
    ]
    if left_out:
        lines.append("# Calibrated at build with " + ", ".join(left_out) + " (not shipped: not needed to run).")
    lines += [f"schema_version = {profile.schema_version}", f"name = {_toml(profile.name)}"]
    for section, values in profile.model_dump().items():
        if not isinstance(values, dict):
            continue
        keys = []
        for key, value in values.items():
            dotted = f"{section}.{key}"
            if dotted in rewritten:
                value = rewritten[dotted]
            elif not loaded.is_explicit(dotted) or (dotted == "calibration.source" and left_out):
                continue
            if value is not None:
                keys.append(f"{key} = {_toml(value)}")
        if keys:
            lines += ["", f"[{section}]", *keys]
    return "\n".join(lines) + "\n"


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")

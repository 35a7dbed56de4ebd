"""Chat templates: pick the model's own Jinja template (or a file, or ChatML) and render it.

Rendering follows the conventions Hugging Face chat templates are written for: jinja2's
ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, the loop-controls
extension, and the helpers templates call: `raise_exception(msg)`, `strftime_now(fmt)` and
a `tojson` filter that keeps non-ASCII text as is.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import NoReturn, Protocol

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mllm_deploy.errors import user_error
from mllm_deploy.model.spec import ModelSpec
from mllm_deploy.paths import resource_dir

AUTO = "auto"
FALLBACK_TEMPLATE = "chat/chatml.jinja"  # under resource_dir("templates")


class TemplateRaised(Exception):
    """A template called raise_exception(message)."""


class TokenNames(Protocol):
    """What :func:`special_token_text` needs of a tokenizer (a ModelTokenizer has it)."""

    def id_to_token(self, token_id: int) -> str | None: ...


def _raise_exception(message: str) -> NoReturn:
    raise TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: object,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
    ensure_ascii: bool = False,
) -> str:
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"], undefined=jinja2.Undefined
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    return _environment().from_string(template)


def compile_template(template: str, *, origin: str | None = None) -> jinja2.Template:
    """Compile (cached); a syntax error is a UserError at the template's line."""
    try:
        return _compile(template)
    except jinja2.TemplateSyntaxError as exc:
        raise user_error(f"chat template syntax error: {exc.message}", file=origin, line=exc.lineno) from None


def _check_messages(messages: object) -> None:
    """Refuse anything but a list of dicts with a string `role` and `content` (they may come from JSON)."""
    if not isinstance(messages, list):
        raise user_error("chat messages must be a list of {role, content} objects")
    for i, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise user_error(f"chat message {i} must have a string 'role' and 'content'", value=message)


def render_chat(
    messages: list[dict[str, object]],
    *,
    template: str,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    origin: str | None = None,
    **extra: object,
) -> str:
    """The prompt text for `messages` ([{"role": "user", "content": "..."}, ...]).

    `origin` names the template's file in error messages. `extra` is passed to the template
    (e.g. `tools=None`). The result contains special tokens as text ("<|im_start|>"):
    encode it with allow_special=True.
    """
    _check_messages(messages)
    compiled = compile_template(template, origin=origin)
    try:
        return compiled.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **extra,
        )
    except TemplateRaised as exc:
        raise user_error(f"the chat template refused the conversation: {exc}", file=origin) from None
    except jinja2.TemplateError as exc:  # undefined attribute calls, sandbox violations, ...
        raise user_error(f"chat template error: {type(exc).__name__}: {exc}", file=origin) from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        raise user_error(f"chat template failed while rendering: {type(exc).__name__}: {exc}", file=origin) from None


def fallback_template_path() -> Path:
    return resource_dir("templates") / FALLBACK_TEMPLATE


def choose_template_with_origin(spec: ModelSpec, setting: str = AUTO, base_dir: Path | None = None) -> tuple[str, str]:
    """(template text, where it came from) for the profile's `model.chat_template` setting."""
    if setting == AUTO:
        if spec.chat_template:
            origin = spec.path if spec.format == "gguf" else str(Path(spec.path) / "tokenizer_config.json")
            template = spec.chat_template
        else:
            path = fallback_template_path()
            template, origin = path.read_text(encoding="utf-8"), str(path)
    else:
        path = Path(setting).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        try:
            template = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise user_error("chat template file not found", file=str(path), key="model.chat_template", value=setting,
                             allowed="'auto' or a path to a Jinja template file") from None  # fmt: skip
        except (OSError, UnicodeDecodeError) as exc:
            raise user_error(
                f"cannot read the chat template: {exc}", file=str(path), key="model.chat_template"
            ) from None
        origin = str(path)
    compile_template(template, origin=origin)
    return template, origin


def choose_template(spec: ModelSpec, setting: str = AUTO, base_dir: Path | None = None) -> str:
    """The template text for `setting`: `auto` (the model's own, else ChatML) or a file path."""
    return choose_template_with_origin(spec, setting, base_dir)[0]


def special_token_text(tokenizer: TokenNames, token_id: int | None) -> str:
    """The text of a special token for bos_token/eos_token ("" when the model has none)."""
    if token_id is None:
        return ""
    return tokenizer.id_to_token(token_id) or ""

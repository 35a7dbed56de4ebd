"""A loaded model and conversations over it, keeping the KV cache between turns.

    model = load_model(deployment)                 # once: weights, tokenizer, template, engine
    session = ChatSession(model, deployment.loaded)  # one conversation (one KV cache)
    for event in session.send("Hello"):            # ChunkDone*, PrefillDone, TokenEmitted*, GenerationDone
        ...

Each turn renders the whole conversation with the chat template, tokenizes it, keeps the
longest prefix the cache already holds and prefills only the rest.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

from mllm_deploy.errors import Diagnostic, ExitCode, UserError
from mllm_deploy.events import GenerationDone, TurnEvent
from mllm_deploy.interface.deployment import Deployment
from mllm_deploy.interface.engines import load_deployment_weights, open_deployment_engine
from mllm_deploy.model import load_tokenizer
from mllm_deploy.model.chat_template import choose_template_with_origin, render_chat, special_token_text
from mllm_deploy.model.spec import ModelSpec
from mllm_deploy.model.tokenizer import ModelTokenizer
from mllm_deploy.runtime.engine import Engine, with_subgraph_events
from mllm_deploy.runtime.generate import GenerationRequest, generate
from mllm_deploy.runtime.sampling import SamplingSettings


@dataclass
class LoadedModel:
    spec: ModelSpec
    tokenizer: ModelTokenizer
    engine: Engine
    chat_template: str
    chat_template_origin: str
    load_seconds: float

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        return render_chat(
            messages,
            template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            bos_token=special_token_text(self.tokenizer, self.tokenizer.bos_id),
            eos_token=special_token_text(self.tokenizer, (self.tokenizer.eos_ids or (None,))[0]),
            origin=self.chat_template_origin,
        )


def load_model(deployment: Deployment) -> LoadedModel:
    """Read the deployment's model (spec, float32 weights, tokenizer, chat template) and open its
    engine as it runs on this machine (obtaining the NPU artifacts first on the NPU path; UserError
    exit 3 for a Hexagon target without a Hexagon NPU or an opt-in: `Deployment.running`)."""
    started = time.perf_counter()
    loaded_profile, spec = deployment.loaded, deployment.resolved.spec
    template, origin = choose_template_with_origin(
        spec, loaded_profile.profile.model.chat_template, loaded_profile.base_dir
    )
    tokenizer = load_tokenizer(spec)
    engine = open_deployment_engine(deployment, load_deployment_weights(deployment.resolved))
    return LoadedModel(spec, tokenizer, engine, template, origin, time.perf_counter() - started)


def fit_to_context(
    token_ids: list[int], max_context: int, overflow: str, max_new_tokens: int, *, locate=None
) -> tuple[list[int], int]:
    """(ids that fit, number of oldest tokens dropped) for a prompt and `prefill.overflow`.

    `error`: a prompt longer than `max_context` is a UserError (exit 2). `truncate-left`:
    keep the newest tokens, leaving room for `max_new_tokens` but keeping at least half the
    context for the prompt.
    """
    if len(token_ids) <= max_context:
        return token_ids, 0
    if overflow == "error":
        where = locate("prefill.max_context") if locate else {"key": "prefill.max_context"}
        raise UserError([Diagnostic(
            message=f"the prompt is {len(token_ids)} tokens, longer than prefill.max_context = {max_context}",
            value=len(token_ids),
            allowed=f"at most {max_context} tokens",
            hint="raise prefill.max_context, shorten the prompt, or set prefill.overflow = \"truncate-left\"",
            **where,
        )], exit_code=ExitCode.INVALID)  # fmt: skip
    keep = max_context - min(max_new_tokens, max_context // 2)
    return token_ids[len(token_ids) - keep :], len(token_ids) - keep


class ChatSession:
    """One conversation over a loaded model; keeps messages and the KV cache between turns."""

    def __init__(self, model: LoadedModel, loaded_profile):
        self.model = model
        self.profile = loaded_profile.profile
        self._locate = loaded_profile.where
        self.cache = model.engine.new_cache(self.profile.prefill.max_context)
        self.messages: list[dict] = []  # user/assistant turns so far (no system message)

    @property
    def system_messages(self) -> list[dict]:
        prompt = self.profile.model.system_prompt
        return [{"role": "system", "content": prompt}] if prompt else []

    def update_profile(self, loaded_profile) -> None:
        """Apply a re-validated profile (decode settings, system prompt, overflow, chunk size)
        to this conversation. The KV cache is kept unless `prefill.max_context` changed; the
        next turn reuses whatever prefix still matches. The model itself is not reloaded."""
        old_context = self.profile.prefill.max_context
        self.profile = loaded_profile.profile
        self._locate = loaded_profile.where
        if self.profile.prefill.max_context != old_context:
            self.cache = self.model.engine.new_cache(self.profile.prefill.max_context)

    def reset(self) -> None:
        """Forget the conversation (the cache is kept allocated and rolled back to empty)."""
        self.messages = []
        self.cache.reset()

    def send(
        self, user_text: str, *, cancel: threading.Event | None = None, max_new_tokens: int | None = None
    ) -> Iterator[TurnEvent]:
        """One chat turn: the user's message, then the assistant's streamed reply."""
        conversation = [*self.messages, {"role": "user", "content": user_text}]
        for event in self.reply_to(conversation, cancel=cancel, max_new_tokens=max_new_tokens):
            if isinstance(event, GenerationDone):
                self.messages = [*conversation, {"role": "assistant", "content": event.text}]
            yield event

    def reply_to(
        self, messages: list[dict], *, system: str | None = None, cancel=None, max_new_tokens: int | None = None
    ) -> Iterator[TurnEvent]:
        """The assistant's reply to a whole conversation (user/assistant messages; `system`
        overrides the profile's system prompt; a conversation starting with its own system
        message keeps it). Does not change `self.messages`."""
        return self.generate(self.chat_ids(messages, system=system), cancel=cancel, max_new_tokens=max_new_tokens)

    def chat_ids(self, messages: list[dict], *, system: str | None = None) -> list[int]:
        """The token ids of a whole conversation rendered with the chat template and the
        generation prompt (the system message chosen as `reply_to` says)."""
        if messages and messages[0].get("role") == "system":
            head: list[dict] = []
        elif system is not None:
            head = [{"role": "system", "content": system}] if system else []
        else:
            head = self.system_messages
        text = self.model.render([*head, *messages], add_generation_prompt=True)
        return self.model.tokenizer.encode(text, allow_special=True)

    def complete(self, text: str, *, cancel=None, max_new_tokens: int | None = None) -> Iterator[TurnEvent]:
        """Continue raw text (no chat template); BOS is added when the model asks for it."""
        return self.generate(self.model.tokenizer.encode(text, allow_special=True), cancel=cancel,
                             max_new_tokens=max_new_tokens)  # fmt: skip

    def release_cache(self) -> None:
        """Forget the conversation and free its KV cache's memory (a new, empty cache replaces
        it: what the server does for a request whose client went away)."""
        self.messages = []
        self.cache = self.model.engine.new_cache(self.profile.prefill.max_context)

    def generate(
        self,
        ids: list[int],
        *,
        cancel=None,
        max_new_tokens: int | None = None,
        sampling: SamplingSettings | None = None,
        stop: tuple[str, ...] = (),
    ) -> Iterator[TurnEvent]:
        """Generate after the token ids `ids` (reusing the prefix this session's cache holds),
        with the profile's decode settings unless `sampling` is given; `stop` strings are added
        to the profile's `decode.stop`. The prompt is fitted to `prefill.max_context` by
        `prefill.overflow` (UserError exit 2 when it is "error" and the prompt does not fit)."""
        if not ids:
            raise UserError([Diagnostic(message="the prompt is empty")])
        decode, prefill = self.profile.decode, self.profile.prefill
        max_new = max_new_tokens if max_new_tokens is not None else decode.max_new_tokens
        ids, dropped = fit_to_context(ids, prefill.max_context, prefill.overflow, max_new, locate=self._locate)
        request = GenerationRequest(
            max_new_tokens=max_new,
            sampling=sampling if sampling is not None else SamplingSettings.from_decode_section(decode),
            eos_ids=tuple(self.model.tokenizer.eos_ids),
            stop=tuple(dict.fromkeys((*decode.stop, *stop))),
            chunk_size=min(prefill.chunk_size, prefill.max_context),
            truncated_tokens=dropped,
        )
        engine = self.model.engine
        engine.cancel = cancel  # the NPU path also stops between subgraphs inside a prefill
        if engine.static_chunk_tokens is not None:  # static-shape graphs: every chunk padded to their size
            request = replace(request, chunk_size=engine.static_chunk_tokens, pad_last_chunk=True)
        events = generate(engine, self.cache, ids, request, self.model.tokenizer.stream(), cancel)
        return with_subgraph_events(events, engine)

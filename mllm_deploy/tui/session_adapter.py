"""What the UI needs from a chat session that the runtime does not offer yet. No textual here.

- `switch_profile`: apply a re-validated profile (decode.*, system prompt, ...) to a live
  session without dropping its KV cache (ChatSession reads `profile` on every turn).
- `prefill_context`: put a document into the KV cache without a reply: one turn of
  `reply_to` with a single generated token (no decode step runs) whose text is ignored.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator


def switch_profile(session, loaded_profile) -> None:
    update = getattr(session, "update_profile", None)
    if callable(update):
        update(loaded_profile)
        return
    session.profile = loaded_profile.profile
    session._locate = loaded_profile.where


def prefill_context(session, context_message: str, cancel: threading.Event) -> Iterator[object]:
    """Events of prefilling the conversation so far plus a user message holding `context_message`."""
    conversation = [*session.messages, {"role": "user", "content": context_message}]
    return session.reply_to(conversation, cancel=cancel, max_new_tokens=1)

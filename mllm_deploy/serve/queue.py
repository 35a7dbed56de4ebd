"""The fair queue in front of the one engine: users take turns, each user's requests keep their order.

The NPU is one in-order queue and the engine runs one generation at a time, so requests wait
here. A client that sends many requests does not starve the others: the queue serves the users
round-robin (a user is the request's `user` field, else the client's address), first come first
served within one user. Beyond `limit` waiting requests, `put` refuses (the server answers 503
with Retry-After).
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")


class QueueFull(Exception):
    """`put` beyond the limit."""


class QueueClosed(Exception):
    """`put` after `close`."""


class FairQueue(Generic[Item]):
    """Thread-safe round-robin over users; `get` blocks until an item or `close`."""

    def __init__(self, limit: int):
        self.limit = limit
        self._by_user: OrderedDict[str, deque[Item]] = OrderedDict()  # users in turn order
        self._size = 0
        self._closed = False
        self._ready = threading.Condition(threading.RLock())

    def __len__(self) -> int:
        return self._size

    def put(self, user: str, item: Item) -> int:
        """Queue `item` for `user`; returns the number waiting (with it). QueueFull beyond the
        limit, QueueClosed once closed."""
        with self._ready:
            if self._closed:
                raise QueueClosed
            if self._size >= self.limit:
                raise QueueFull
            self._by_user.setdefault(user, deque()).append(item)
            self._size += 1
            self._ready.notify()
            return self._size

    def get(self, timeout: float | None = None) -> Item | None:
        """The next item (the next user's turn), or None when closed and empty or on timeout."""
        with self._ready:
            if not self._ready.wait_for(lambda: self._size > 0 or self._closed, timeout):
                return None
            if self._size == 0:
                return None
            user, items = next(iter(self._by_user.items()))
            item = items.popleft()
            del self._by_user[user]
            if items:
                self._by_user[user] = items  # back of the line: the other users go first
            self._size -= 1
            return item

    def remove_if(self, predicate: Callable[[Item], bool]) -> list[Item]:
        """Take out every waiting item for which `predicate` holds (e.g. its client went away)."""
        removed: list[Item] = []
        with self._ready:
            for user in list(self._by_user):
                items = self._by_user[user]
                keep = deque(item for item in items if not predicate(item))
                removed += [item for item in items if predicate(item)]
                if keep:
                    self._by_user[user] = keep
                else:
                    del self._by_user[user]
            self._size -= len(removed)
        return removed

    def close(self) -> list[Item]:
        """Refuse new items, wake `get`, and return the items still waiting (taken out)."""
        with self._ready:
            self._closed = True
            waiting = [item for items in self._by_user.values() for item in items]
            self._by_user.clear()
            self._size = 0
            self._ready.notify_all()
            return waiting

"""The responses a server keeps for OpenAI's ``previous_response_id``: bounded by count and bytes.

OpenAI keeps every response (``store`` defaults to true) so that the next request can name
it instead of resending the conversation. This server keeps them in memory, per server, the
least recently used dropped first once there are :data:`MAX_RESPONSES` or they hold more
than :data:`MAX_BYTES` of JSON; a response larger than the cap alone is not kept. A request
naming a dropped (or never kept) response gets a 404 that says to resend the conversation.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

MAX_RESPONSES = 512
MAX_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class Stored:
    """A kept response: the object ``GET /v1/responses/{id}`` returns and the conversation
    (without the instructions, as OpenAI does not carry them over) that a next turn continues."""

    response: dict[str, Any]
    history: list[dict[str, Any]]
    size: int


class ResponseStore:
    """Responses by id, least recently used first out; safe to use from any thread."""

    def __init__(self, max_responses: int = MAX_RESPONSES, max_bytes: int = MAX_BYTES) -> None:
        self.max_responses = max_responses
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, Stored] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, rid: str, response: dict[str, Any], history: list[dict[str, Any]]) -> bool:
        """Keep a response; False when it alone is larger than the byte cap (not kept)."""
        size = len(json.dumps([response, history], ensure_ascii=False, default=str).encode())
        if size > self.max_bytes:
            return False
        with self._lock:
            old = self._items.pop(rid, None)
            if old is not None:
                self._bytes -= old.size
            self._items[rid] = Stored(response, history, size)
            self._bytes += size
            while len(self._items) > self.max_responses or self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= dropped.size
        return True

    def get(self, rid: str) -> Stored | None:
        with self._lock:
            item = self._items.get(rid)
            if item is not None:
                self._items.move_to_end(rid)
            return item

    def delete(self, rid: str) -> bool:
        with self._lock:
            item = self._items.pop(rid, None)
            if item is None:
                return False
            self._bytes -= item.size
            return True

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

"""The bounded hand-off between the training thread and the sender thread.

Like OpenTelemetry's BatchSpanProcessor queue: the training thread only
appends (a `deque.append`, atomic under the GIL) and never waits; when the
buffer is full, `put` says so and the caller decides where the record goes.
`put` wakes the sender when a full batch is waiting (`wake_at` records);
the sender's own callers also set `wake` (new metadata, `flush`, `stop`, a
finished connection attempt); otherwise the sender runs on its own timer.
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class RecordBuffer(Generic[T]):
    def __init__(self, max_size: int, wake_at: int):
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        self.max_size = max_size
        self.wake_at = max(1, min(wake_at, max_size))
        self._items: deque[T] = deque()
        self.wake = threading.Event()

    def put(self, item: T) -> bool:
        """Append without blocking; False when the buffer is full."""
        items = self._items
        if len(items) >= self.max_size:
            return False
        items.append(item)
        if len(items) == self.wake_at:
            self.wake.set()
        return True

    def take(self, limit: int) -> list[T]:
        """Remove and return up to `limit` items, oldest first (sender thread)."""
        items = self._items
        taken = []
        while items and len(taken) < limit:
            taken.append(items.popleft())
        return taken

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()
        self.wake = threading.Event()

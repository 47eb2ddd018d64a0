"""The in-flight window: messages sent and not yet acknowledged, in order.

Pure bookkeeping, no socket and no clock of its own (`sent_at` is given), so
it is tested alone. Every message gets the next sequence number. The server
may acknowledge out of order (it answers each message when stored), but the
window resolves items strictly in sequence order: a spool position only moves
forward once everything before it is stored. After a lost connection,
`drain()` hands back what was in flight, so the sender can spool live batches
again (at-least-once; the server's (run, step) key makes it exactly-once).
When the server closes with "message too big" without saying which message,
`culprit()` names the largest unacknowledged one: nothing smaller can be the
one over the limit.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .spool import Position

KINDS = ("live", "spool", "meta", "events")


@dataclass(frozen=True)
class Inflight:
    """One message on the wire.

    `kind`: "live" (a batch sent straight from memory), "spool" (a batch read
    from the spool), "meta" (run metadata) or "events" (a drop report).
    `steps`: step records in it (for "meta": the metadata version).
    `end`: for "spool", the spool position just after its frame.
    `drops`: for "events", the drop counts it reports. `size`: bytes as sent.
    """

    kind: str
    payload: bytes
    steps: int
    end: Position | None = None
    drops: dict | None = None
    size: int = 0
    sent_at: float = 0.0


class InflightWindow:
    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self._items: OrderedDict[int, Inflight] = OrderedDict()
        self._acked: set[int] = set()
        self._seq = 0
        self.largest_acked = 0  # bytes of the largest message the server acknowledged

    # -- adding -------------------------------------------------------------
    @property
    def next_seq(self) -> int:
        """The number `add` gives the next message (to write it into the message first)."""
        return self._seq + 1

    def add(self, item: Inflight) -> int:
        """Put a message in flight; returns its sequence number."""
        self._seq += 1
        self._items[self._seq] = item
        return self._seq

    def add_done(self, item: Inflight) -> list[tuple[int, Inflight]]:
        """An item that needs no answer (a spool frame skipped as bad bytes or set aside),
        resolved in order: returns what is resolved now (itself, when nothing is before it)."""
        seq = self.add(item)
        return self._resolve(seq)

    # -- answers --------------------------------------------------------------
    def ack(self, seq: int) -> list[tuple[int, Inflight]]:
        """The server stored message `seq`. Returns `[(seq, item)]` now resolved, in order (empty when
        an earlier message is still unanswered, or `seq` is unknown)."""
        item = self._items.get(seq)
        if item is None or seq in self._acked:
            return []
        self.largest_acked = max(self.largest_acked, item.size)
        return self._resolve(seq)

    def settle(self, seq: int) -> list[tuple[int, Inflight]]:
        """Message `seq` is answered without being stored (refused for good, set aside): it
        resolves in order like an ack but does not teach `largest_acked`."""
        if seq not in self._items or seq in self._acked:
            return []
        return self._resolve(seq)

    def _resolve(self, seq: int) -> list[tuple[int, Inflight]]:
        self._acked.add(seq)
        resolved = []
        while self._items:
            first = next(iter(self._items))
            if first not in self._acked:
                break
            resolved.append((first, self._items.pop(first)))
            self._acked.discard(first)
        return resolved

    def remove(self, seq: int) -> Inflight | None:
        """Take a message out of the window without resolving it (set aside for good)."""
        self._acked.discard(seq)
        return self._items.pop(seq, None)

    # -- questions ------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def __contains__(self, seq: object) -> bool:
        return seq in self._items

    def get(self, seq: int) -> Inflight | None:
        return self._items.get(seq)

    @property
    def full(self) -> bool:
        return len(self._items) >= self.limit

    @property
    def room(self) -> int:
        return max(0, self.limit - len(self._items))

    def has_kind(self, kind: str) -> bool:
        return any(item.kind == kind for item in self._items.values())

    def unacked(self) -> list[tuple[int, Inflight]]:
        return [(seq, item) for seq, item in self._items.items() if seq not in self._acked]

    def steps(self, kind: str) -> int:
        """Steps in the window's messages of `kind` (acknowledged out of order or not)."""
        return sum(item.steps for item in self._items.values() if item.kind == kind)

    def culprit(self) -> tuple[int, Inflight] | None:
        """The largest unacknowledged message (first of equals): the one a "message too big"
        close refers to."""
        unacked = self.unacked()
        if not unacked:
            return None
        return max(unacked, key=lambda pair: (pair[1].size, -pair[0]))

    def suspect(self) -> bool:
        """An unacknowledged message bigger than any the server acknowledged is in flight (a
        connection lost without a close code may then be a "too big" whose close frame was lost)."""
        return any(item.size > self.largest_acked for _, item in self.unacked())

    def oldest_unacked_sent_at(self) -> float | None:
        unacked = self.unacked()
        return min(item.sent_at for _, item in unacked) if unacked else None

    # -- a lost connection --------------------------------------------------------
    def drain(self) -> list[tuple[Inflight, bool]]:
        """Empty the window after a lost connection: `[(item, acked)]` in order, `acked` for
        those the server stored while an earlier one was still unanswered."""
        drained = [(item, seq in self._acked) for seq, item in self._items.items()]
        self._items.clear()
        self._acked.clear()
        return drained

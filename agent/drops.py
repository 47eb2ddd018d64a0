"""Drop counts by reason, and which of them the server has not been told about yet.

Two writers: the training thread counts a record it could not hand over
(`count_training`: one dict update, no lock, never waits), the sender thread
counts the rest (`count`) and folds the training thread's counts in. The
counts not yet acknowledged by the server as a drop event are `unreported`;
at exit they go to the spool's `drops.json` for `gradwatch push`.
"""
from __future__ import annotations

import threading
from collections import Counter


class DropLedger:
    def __init__(self):
        self._lock = threading.Lock()
        self._counted: dict[str, int] = {}  # folded counts, by reason
        self._training: dict[str, int] = {}  # written by the training thread only
        self._training_seen: dict[str, int] = {}
        self._unreported: Counter = Counter()

    def count_training(self, reason: str) -> None:
        """From the training thread: O(1), no lock, no I/O."""
        drops = self._training
        drops[reason] = drops.get(reason, 0) + 1

    def count(self, reason: str, steps: int = 1) -> None:
        with self._lock:
            self._counted[reason] = self._counted.get(reason, 0) + steps
            self._unreported[reason] += steps

    def fold(self) -> None:
        """Take in what the training thread counted since the last fold (sender thread)."""
        if not self._training:
            return
        with self._lock:
            for reason, count in self._training.copy().items():
                unseen = count - self._training_seen.get(reason, 0)
                if unseen:
                    self._training_seen[reason] = count
                    self._counted[reason] = self._counted.get(reason, 0) + unseen
                    self._unreported[reason] += unseen

    def totals(self) -> dict[str, int]:
        """Drops by reason, including those the training thread counted a moment ago."""
        with self._lock:
            totals = dict(self._counted)
            for reason, count in self._training.copy().items():
                unseen = count - self._training_seen.get(reason, 0)
                if unseen:
                    totals[reason] = totals.get(reason, 0) + unseen
        return totals

    def report_earlier(self, dropped: dict[str, int]) -> None:
        """Drops an earlier process counted (a spool's drops.json): to report, not to count."""
        with self._lock:
            self._unreported.update({str(reason): int(count) for reason, count in dropped.items()})

    def unreported(self) -> dict[str, int]:
        with self._lock:
            return dict(self._unreported)

    def reported(self, drops: dict[str, int]) -> None:
        """The server stored a drop event with these counts (or it will never take it)."""
        with self._lock:
            self._unreported.subtract(drops)
            self._unreported = +self._unreported

"""Records taken from the buffer, closed into batches and encoded: the sender's batching part.

`Batcher.collect(force)` takes records from the buffer (all of them when it holds more than a
batch: fewer, larger batches are how the sender catches up with a fast loop that shares the
GIL with it), completes them with the host stage (`agent/host.py`) and returns the batches
that closed: `batch_steps` records, or `batch_interval` seconds after the first, or at once
when forced (a flush, a stop). `encode(records)` turns records of one layout into payloads
within the byte budget. Records that cannot be completed or encoded are dropped through
`drop("encode_error", n)` with one warning; the others still go. No socket, no spool.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

from .buffer import RecordBuffer
from .encoding import encode_chunk, encode_within
from .flushing import FlushLedger
from .recorder import StepRecord

Complete = Callable[[Sequence[StepRecord]], list[StepRecord]]


class Batcher:
    def __init__(self, run: str, buffer: RecordBuffer, ledger: FlushLedger, *, batch_steps: int,
                 batch_interval: float, budget: Callable[[], int], drop: Callable[[str, int], None],
                 warn: Callable[[str, str], None], complete: Complete | None = None):
        self.run = run
        self.buffer = buffer
        self.ledger = ledger
        self.batch_steps = batch_steps
        self.batch_interval = batch_interval
        self.budget = budget  # encoded bytes per payload now (it shrinks when the server says 1009)
        self.drop = drop      # records taken and lost: settled in the ledger and counted
        self.warn = warn
        self.complete = complete
        self.open: list[StepRecord] = []
        self.open_since = 0.0

    def collect(self, force: bool) -> list[list[StepRecord]]:
        """The batches that close now, in order (records taken are held in the ledger)."""
        closed: list[list[StepRecord]] = []
        while True:
            room = self.batch_steps - len(self.open)
            if room > 0 and len(self.buffer) > room:
                room = len(self.buffer)  # behind: take it all at once
            taken = self.buffer.take(room)
            if taken:
                if not self.open:
                    self.open_since = time.monotonic()
                self.ledger.took(len(taken))
                self.open.extend(taken if self.complete is None else self._completed(taken))
            full = len(self.open) >= self.batch_steps
            due = self.open and (force or time.monotonic() - self.open_since >= self.batch_interval)
            if full or due:
                closed.append(self.open)
                self.open = []
            if not taken or not (full or force):
                return closed

    def _completed(self, records: list[StepRecord]) -> list[StepRecord]:
        """The records completed by the host stage, which leaves out records that cannot be
        read; those (all, should the stage fail) are dropped: never sent half-made."""
        try:
            done = self.complete(records)
            error: Exception | None = None
        except Exception as failure:
            done, error = [], failure
        lost = len(records) - len(done)
        if lost:
            why = f" ({error!r})" if error is not None else ""
            self.warn("encode", f"gradwatch: cannot encode {lost} step record(s) of run {self.run!r}"
                                f"{why}; they are dropped (counted as encode_error)")
            self.drop("encode_error", lost)
        return done

    def encode(self, records: Sequence[StepRecord]) -> list[tuple[bytes, int]]:
        """Records of one layout -> payloads within the byte budget. A record that cannot be
        encoded is dropped (counted as `encode_error`, one warning); the others still go."""
        try:
            return encode_within(self.run, records, self.budget())
        except Exception as error:
            good = [record for record in records if self._encodable(record)]
            if len(good) == len(records):  # no record is to blame: the batch cannot go
                good = []
            self.warn("encode", f"gradwatch: cannot encode step records of run {self.run!r} "
                                f"({error!r}); they are dropped (counted as encode_error)")
            self.drop("encode_error", len(records) - len(good))
        if not good:
            return []
        try:
            return encode_within(self.run, good, self.budget())
        except Exception:
            self.drop("encode_error", len(good))
            return []

    def _encodable(self, record: StepRecord) -> bool:
        try:
            encode_chunk(self.run, [record])
            return True
        except Exception:
            return False

"""The last chunk each run wrote, kept decoded by the process that wrote it.

An agent appends: nearly every batch lands in the run's newest chunk, which
the previous batch wrote. Keeping that chunk (and its summary) decoded saves
reading and decoding it again, and lets the summary be extended instead of
recomputed. An entry is used only when the run's version read under the
run's lock is the one this process committed (nobody wrote the run since),
and it is set only after the commit; a run deleted and made again has
another `created`, so its entries never match.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from gradwatch.server.storage.chunks import Chunk
from gradwatch.server.storage.chunks.summaries import Summary


@dataclass(frozen=True)
class Tail:
    version: int          # the run's version after the batch that wrote this chunk
    chunk: Chunk          # every registry column
    summary: Summary      # the chunk's 64-step summary
    segments: int = 1     # how many segments the chunk is stored in


class TailCache:
    """(run id, created) -> Tail, for the `max_runs` runs written most recently."""

    def __init__(self, max_runs: int = 64):
        self.max_runs = max_runs
        self._tails: OrderedDict[tuple[int, float], Tail] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[int, float], version: int) -> Tail | None:
        with self._lock:
            tail = self._tails.get(key)
        return tail if tail is not None and tail.version == version else None

    def put(self, key: tuple[int, float], tail: Tail) -> None:
        with self._lock:
            self._tails[key] = tail
            self._tails.move_to_end(key)
            while len(self._tails) > self.max_runs:
                self._tails.popitem(last=False)

    def forget(self, run_id: int) -> None:
        with self._lock:
            for key in [key for key in self._tails if key[0] == run_id]:
                del self._tails[key]

"""What happened to the step records: `Stats` (a snapshot at any time) and `FlushResult`
(the answer of `GradWatch.flush()`), plain dataclasses."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Stats:
    """Counts of step records, by what happened to them.

    `recorded`: handed over by the training thread; `sent`: step records in
    batches written to the socket (a replayed batch counts again); `acked`:
    step records in batches the server acknowledged (including those an
    earlier process left in the same spool folder); `spooled`: step records in
    the spool now, waiting for the server (`gradwatch push DIR` sends them if
    this process cannot); `spooled_total`: step records ever written to the
    spool; `pending`: records neither acknowledged nor in the spool yet (in
    memory: the buffer, a batch being built, a batch sent and not yet
    acknowledged); `dropped`: records lost, by reason (`spool_full`: past the
    spool's disk cap; `queue_full`: the buffer was full because the sender
    thread could not keep up; `spool_unavailable`; `forked_child`;
    `encode_error`: a record that could not be encoded; `too_big`: a single
    step over the server's message limit, kept in `rejected.gws`);
    `rejected`: steps in batches the server refused for good (HTTP 4xx), kept
    in `rejected.gws`. `accepted`/`duplicates`/`conflicts` are the server's own
    counts from its acks. `connected`: a connection is up now; `unreachable`:
    the last connection attempt failed; `refused`: why the server refused our
    token (no more attempts), else None.
    """

    recorded: int = 0
    sent: int = 0
    acked: int = 0
    spooled: int = 0
    spooled_total: int = 0
    pending: int = 0
    dropped: dict = field(default_factory=dict)
    rejected: int = 0
    accepted: int = 0
    duplicates: int = 0
    conflicts: int = 0
    connected: bool = False
    unreachable: bool = False
    refused: str | None = None

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


@dataclass(frozen=True)
class FlushResult:
    """What `flush()` achieved. Truthy only when every record is where it should be and
    nothing was lost: acknowledged by the server (`spooled == pending == 0`, nothing dropped
    or refused); with `url=None` the spool is the destination, so there it means every record
    is fsynced in the spool. `if watch.flush():` reads as "everything arrived".

    `acked`, `spooled`, `pending`, `dropped`, `rejected`: as in `Stats` (steps).
    `unreachable`: a connection attempt made during this call failed (the server is away:
    what is in the spool waits for it, or for `gradwatch push`). `timed_out`: the timeout
    ran out before everything was acknowledged (or, while the server is away, durable).
    """

    delivered: bool
    acked: int
    spooled: int
    pending: int
    dropped: int = 0
    rejected: int = 0
    unreachable: bool = False
    timed_out: bool = False

    def __bool__(self) -> bool:
        return self.delivered

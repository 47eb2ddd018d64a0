"""The sender thread: batches records, streams them, spools what cannot go now.

One background thread owns the WebSocket and the spool's read side
(OpenTelemetry's BatchSpanProcessor worker, with a transport that can be
away). Each loop it (1) starts a connection attempt when due, with jittered
exponential backoff, in a helper thread (so a server that is slow to answer
never stops the draining), (2) reads acknowledgements, (3) takes records
from the buffer and closes a columnar batch every `batch_steps` records,
`max_batch_bytes` encoded bytes or `batch_interval` seconds, (4) sends: live
while connected with nothing spooled, otherwise the batch is appended to the
spool and the spool is replayed in order, and (5) fsyncs the spool at most
every 500 ms.

At-least-once: every batch carries a sequence number and stays in flight until
its ack; on a lost connection, in-flight live batches are written to the
spool and in-flight spool batches are read again from the last acknowledged
position. The server's unique (run, step) key makes the result exactly-once.

Message size: the server closes the socket with code 1009 when a message is
over its limit (`gradwatch serve --max-body`). The sender then halves its
byte budget below the largest unacknowledged message and sends again, cut
smaller; a single step that is still too big is set aside in `rejected.gws`
with one warning (like a batch the server refuses with a 4xx).
"""
from __future__ import annotations

import logging
import random
import threading
import time
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import orjson

from .buffer import RecordBuffer
from .recorder import Layout, StepRecord
from .spool import Position, Spool, SpoolBusy
from .transport import Refused, TransportError, WebSocketTransport
from .wire import BOOL_COLUMNS, drop_event, encode_message, encode_payload, split_payload, wire_floats

log = logging.getLogger("gradwatch.agent")

DEFAULT_BATCH_BYTES = 4 << 20  # encoded bytes per message; the server's default limit is 32 MiB
MESSAGE_TOO_BIG = 1009  # WebSocket close code: a message was over the server's limit


@dataclass
class Stats:
    """Counts of step records, by what happened to them.

    `recorded`: handed over by the training thread; `sent`: step records in
    batches written to the socket (a replayed batch counts again); `acked`:
    step records in batches the server acknowledged; `spooled`: step records
    written to the spool; `dropped`: records lost, by reason (`spool_full`:
    past the spool's disk cap; `queue_full`: the buffer was full because the
    sender thread could not keep up; `spool_unavailable`; `forked_child`;
    `encode_error`: a record that could not be encoded; `too_big`: a single
    step over the server's message limit, kept in `rejected.gws`).
    `accepted`/`duplicates`/`conflicts` are the server's own counts from its acks.
    """

    recorded: int = 0
    sent: int = 0
    acked: int = 0
    spooled: int = 0
    dropped: dict = field(default_factory=dict)
    accepted: int = 0
    duplicates: int = 0
    conflicts: int = 0
    connected: bool = False
    refused: str | None = None

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


class _Inflight(NamedTuple):
    kind: str  # "live", "spool", "meta", "events"
    payload: bytes
    steps: int
    end: Position | None  # for "spool": the spool position just after the frame
    drops: dict | None = None  # for "events": the drop counts it reports
    size: int = 0  # bytes of the message as sent


_NUMPY = orjson.OPT_SERIALIZE_NUMPY


def layout_runs(records: Sequence[StepRecord]) -> Iterator[Sequence[StepRecord]]:
    """Consecutive records of equal layout, as slices of `records`."""
    start = 0
    while start < len(records):
        layout = records[start].layout
        stop = start + 1
        while stop < len(records) and (records[stop].layout is layout or records[stop].layout == layout):
            stop += 1
        yield records[start:stop]
        start = stop


def _float_column(values: np.ndarray):
    """float32 values for orjson: the array itself when all finite (written as the shortest
    decimal that reads back as the same float32), else a list with the wire's strings."""
    if np.isfinite(values).all():
        return np.ascontiguousarray(values)
    return [value if np.isfinite(value) else _wire_string(value) for value in values]


def _wire_string(value: np.float32) -> str:
    return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")


def encode_chunk(run: str, records: Sequence[StepRecord]) -> bytes:
    """Records of one layout -> the JSON payload of one columnar batch.

    Float32 values are written as the shortest decimal that reads back as the same float32
    (`0.1`, not `0.10000000149011612`): half the bytes, and exact for a reader that parses
    float64 and compares as float32. Python floats (`lr`, `loss` given as numbers) keep
    float64's shortest form.
    """
    layout: Layout = records[0].layout
    rows = np.frombuffer(b"".join(record.values for record in records), dtype="<f4")
    rows = rows.reshape(len(records), layout.width)
    batch: dict = {"step": [record.step for record in records],
                   "time": [round(record.time, 6) for record in records]}
    for index, name in enumerate(layout.columns):
        column = rows[:, index]
        batch[name] = np.ascontiguousarray(column != 0.0) if name in BOOL_COLUMNS else _float_column(column)
    for index, name in enumerate(layout.extra_columns):
        batch[name] = wire_floats(float(record.extras[index]) for record in records)
    if layout.tensor_names:
        block = rows[:, len(layout.columns):]
        norms = (np.ascontiguousarray(block) if np.isfinite(block).all()
                 else [_float_column(row) for row in block])
        batch["tensor_norms"] = {"names": list(layout.tensor_names), "norms": norms}
    return orjson.dumps({"run": run, "batch": batch}, option=_NUMPY)


def encode_within(run: str, records: Sequence[StepRecord], max_bytes: int) -> list[tuple[bytes, int]]:
    """Records of one layout -> `[(payload, steps)]`, cut by steps so that each payload is at
    most `max_bytes` (a single step over it stays one payload)."""
    count = len(records)
    if count > 2:  # size the pieces from one and two steps (names and columns are per batch)
        one, two = len(encode_chunk(run, records[:1])), len(encode_chunk(run, records[:2]))
        per_step = max(1, two - one)
        fits = max(1, int((max_bytes - (one - per_step)) / per_step * 0.95))
        if fits < count:
            out: list[tuple[bytes, int]] = []
            for start in range(0, count, fits):
                out.extend(_encode_checked(run, records[start:start + fits], max_bytes))
            return out
    return _encode_checked(run, records, max_bytes)


def _encode_checked(run: str, records: Sequence[StepRecord], max_bytes: int) -> list[tuple[bytes, int]]:
    payload = encode_chunk(run, records)
    if len(payload) <= max_bytes or len(records) == 1:
        return [(payload, len(records))]
    half = len(records) // 2
    return _encode_checked(run, records[:half], max_bytes) + _encode_checked(run, records[half:], max_bytes)


def encode_batches(run: str, records: Sequence[StepRecord],
                   max_bytes: int = DEFAULT_BATCH_BYTES) -> list[tuple[bytes, int]]:
    """Records -> `[(payload JSON, step count)]`: one columnar batch per run of equal layouts,
    cut so that each payload is at most `max_bytes`."""
    out = []
    for chunk in layout_runs(records):
        out.extend(encode_within(run, chunk, max_bytes))
    return out


class Sender:
    def __init__(self, run: str, buffer: RecordBuffer, spool: Spool | None,
                 transport: WebSocketTransport | None, *, batch_steps: int = 1000,
                 batch_interval: float = 0.25, max_inflight: int = 8, backoff_base: float = 0.1,
                 backoff_cap: float = 30.0, max_batch_bytes: int = DEFAULT_BATCH_BYTES):
        self.run = run
        self.buffer = buffer
        self.spool = spool
        self.transport = transport
        self.batch_steps = batch_steps
        self.batch_interval = batch_interval
        self.max_inflight = max_inflight
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.max_batch_bytes = int(max_batch_bytes)  # shrinks when the server says 1009
        self.stats = Stats()
        self.meta: dict | None = None
        self.last_step = -1
        self._meta_acked = False
        self._meta_version = 0
        self._meta_spooled = -1
        self._unreported: Counter = Counter()
        # Drops counted by the training thread (it only ever writes here; no lock on its path).
        self.training_drops: dict[str, int] = {}
        self._training_drops_seen: dict[str, int] = {}
        self._open: list[StepRecord] = []
        self._open_since = 0.0
        self._inflight: OrderedDict[int, _Inflight] = OrderedDict()
        self._acked_seqs: set[int] = set()
        # Spool frames never to send again (set aside as too big, or written again cut smaller),
        # until acknowledged in order; a lost connection reads the spool again from its ack.
        self._skip_frames: set[Position] = set()
        self._largest_acked = 0  # bytes of the largest message the server acknowledged
        self._suspects = 0  # connections lost without a close code, a message bigger than that in flight
        self._seq = 0
        self._cursor: Position | None = None
        self._failures = 0
        self._next_attempt = 0.0
        self._connect_thread: threading.Thread | None = None
        self._connect_outcome = None  # a connection or the exception of the last attempt
        self._connect_lock = threading.Lock()
        self._shut = False
        self._warned: set[str] = set()
        self._cond = threading.Condition()
        self._flush_target = 0
        self._flushed = 0
        self._taken = 0  # records taken from the buffer so far
        self._stop = threading.Event()
        self._stop_deadline = float("inf")
        self._thread: threading.Thread | None = None

    # -- called from the training thread -----------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="gradwatch-sender", daemon=True)
        self._thread.start()

    def set_meta(self, meta: dict) -> None:
        self.meta = meta
        self._meta_acked = False
        self._meta_version += 1
        self.buffer.wake.set()

    def report_drops(self, dropped: dict[str, int]) -> None:
        """Drops counted by an earlier process (a spool's drops.json), to report as an event."""
        with self._cond:
            self._unreported.update({str(reason): int(count) for reason, count in dropped.items()})

    def count_training_drop(self, reason: str) -> None:
        """A record the training thread could not hand over (the buffer was full): O(1), no
        lock, no I/O. The sender thread folds these into `stats` and the drop report."""
        drops = self.training_drops
        drops[reason] = drops.get(reason, 0) + 1

    def dropped(self) -> dict[str, int]:
        """Drops by reason, including those the training thread counted a moment ago."""
        with self._cond:
            dropped = dict(self.stats.dropped)
            for reason, count in self.training_drops.copy().items():
                unseen = count - self._training_drops_seen.get(reason, 0)
                if unseen:
                    dropped[reason] = dropped.get(reason, 0) + unseen
        return dropped

    @property
    def failures(self) -> int:
        """Connection attempts that failed in a row."""
        return self._failures

    def delivered(self) -> bool:
        """Connected, and the spool, the in-flight window, the metadata and the drop
        counts are all acknowledged (what `gradwatch push` waits for)."""
        return (self.stats.connected and not self._inflight and self._idle()
                and (self._meta_acked or self.meta is None) and not self._unreported)

    def count_drop(self, reason: str, steps: int = 1) -> None:
        with self._cond:
            self.stats.dropped[reason] = self.stats.dropped.get(reason, 0) + steps
            self._unreported[reason] += steps

    def flush(self, target: int, timeout: float) -> bool:
        """Wait until the first `target` records put in the buffer are acknowledged by the
        server, or (while it is away) durable in the spool. False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._flush_target = max(self._flush_target, target)
        self.buffer.wake.set()
        with self._cond:
            while self._flushed < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._thread is None or not self._thread.is_alive():
                    return self._flushed >= target
                self._cond.wait(min(remaining, 0.05))
        return True

    def stop(self, timeout: float) -> bool:
        """Deliver what can be delivered within `timeout`, spool the rest, end the thread."""
        self._stop_deadline = time.monotonic() + timeout
        self._stop.set()
        self.buffer.wake.set()
        if self._thread is None:
            return True
        self._thread.join(timeout + 2.0)
        return not self._thread.is_alive()

    # -- the thread --------------------------------------------------------
    def _run(self) -> None:
        try:
            self._open_existing_spool()
            while True:
                try:
                    if self._loop_once():
                        break
                except Exception as error:  # never die: say it once, keep the records, go on
                    self._warn_once("crash", f"gradwatch sender: unexpected error, continuing: {error!r}")
                    log.debug("gradwatch sender error", exc_info=True)
                    if self._stop.is_set():
                        break
                    self._stop.wait(0.05)
        finally:
            self._shutdown()

    def _loop_once(self) -> bool:
        """One round of the loop; True when the thread should end."""
        self._connect_if_due()
        self._wait_and_receive()
        self._fold_training_drops()
        stopping = self._stop.is_set()
        flushing = self._flush_target > self._flushed
        self._collect(force=stopping or flushing)
        self._pump()
        if self.spool is not None:
            if flushing or stopping:
                self._sync_spool()
            else:
                self.spool.sync_if_due()
        self._check_flushed()
        return stopping and (self._idle() or time.monotonic() >= self._stop_deadline or self._server_away())

    def _fold_training_drops(self) -> None:
        drops = self.training_drops
        if not drops:
            return
        with self._cond:
            for reason, count in drops.copy().items():
                unseen = count - self._training_drops_seen.get(reason, 0)
                if unseen:
                    self._training_drops_seen[reason] = count
                    self.stats.dropped[reason] = self.stats.dropped.get(reason, 0) + unseen
                    self._unreported[reason] += unseen

    def _open_existing_spool(self) -> None:
        if self.spool is not None and self.spool.exists():
            try:
                self.spool.open()
            except SpoolBusy as error:
                self._warn_once("busy", f"gradwatch: {error}; this run will not spool")
                self.spool = None

    def _server_away(self) -> bool:
        """Records cannot go to the server now: no url, a refused token, or the last
        connection attempt failed (before the first attempt, the server is not "away")."""
        transport = self.transport
        return (transport is None or self.stats.refused is not None
                or (not transport.connected and self._failures > 0))

    # -- connecting (the attempt runs in a helper thread) ---------------------
    def _connect_if_due(self) -> None:
        transport = self.transport
        if transport is None or transport.connected or self.stats.refused:
            return
        if self._connect_thread is not None:
            if self._connect_thread.is_alive():
                return
            self._connect_thread = None
            with self._connect_lock:
                outcome, self._connect_outcome = self._connect_outcome, None
            if isinstance(outcome, BaseException):
                self._transport_failed(outcome)
                return
            transport.adopt(outcome)
            self._failures = 0
            self.stats.connected = True
            self._cursor = self.spool.acked if self.spool is not None else None
            log.info("gradwatch: connected to %s", transport.url)
            return
        if self._stop.is_set() and self._failures > 0:
            return
        if time.monotonic() < self._next_attempt:
            return
        self._connect_thread = threading.Thread(target=self._attempt, args=(transport,),
                                                name="gradwatch-connect", daemon=True)
        self._connect_thread.start()

    def _attempt(self, transport: WebSocketTransport) -> None:
        try:
            outcome = transport.open()
        except (Refused, TransportError) as error:
            outcome = error
        except Exception as error:  # anything else is a failed attempt too, not a dead thread
            outcome = TransportError(f"cannot connect to {transport.url}: {error!r}")
        with self._connect_lock:
            if self._shut:  # the sender ended meanwhile: nobody will use this connection
                if not isinstance(outcome, BaseException):
                    transport.discard(outcome)
                return
            self._connect_outcome = outcome
        self.buffer.wake.set()

    def _transport_failed(self, error: Exception) -> None:
        """What every failed connect, send or receive comes to: a refusal ends the trying; a
        1009 (message too big) cuts smaller and reconnects at once; the rest backs off."""
        if isinstance(error, Refused):
            self._refused(str(error))
            return
        code = getattr(error, "code", None)
        too_big = code == MESSAGE_TOO_BIG
        # The server's 1009 can be lost: it closes with our next bytes unread, and the reset
        # may overtake the close frame. A connection that ends without a close code while a
        # message bigger than any acknowledged so far is in flight is a suspect; twice in a
        # row (no ack between) counts as a 1009.
        suspect = (not too_big and code is None
                   and any(item.size > self._largest_acked for seq, item in self._inflight.items()
                           if seq not in self._acked_seqs))
        if suspect:
            self._suspects += 1
            too_big = self._suspects >= 2
        if too_big:
            self._suspects = 0
            self._message_too_big()
        self._lost_connection()
        if too_big or suspect:  # the server is likely there: try again now (a failed connect backs off)
            self._next_attempt = time.monotonic() + self.backoff_base * random.uniform(0.5, 1.0)
            if too_big:
                log.info("gradwatch: a message was over the server's size limit; now cutting messages "
                         "at %d bytes", self.max_batch_bytes)
        else:
            self._backoff(str(error))

    def _backoff(self, reason: str) -> None:
        self._failures += 1
        delay = min(self.backoff_cap, self.backoff_base * 2 ** min(self._failures, 30))
        self._next_attempt = time.monotonic() + delay * random.uniform(0.5, 1.0)
        if self._failures == 1:
            log.info("gradwatch: server unreachable (%s); spooling and retrying", reason)

    def _refused(self, reason: str) -> None:
        self.stats.refused = reason
        self.stats.connected = False
        self._lost_connection()
        self._warn_once("refused", f"gradwatch: {reason}. Not retrying; records stay in the spool "
                                   f"({self.spool.directory if self.spool else 'no spool'}) for `gradwatch push`.")

    def _message_too_big(self) -> None:
        """The server closed with 1009. The culprit is unacknowledged, and no message is bigger
        than the largest unacknowledged one: halve the budget below it (it is cut again when
        sent again), or, when it cannot be cut (one step, metadata), set it aside."""
        unacked = [(seq, item) for seq, item in self._inflight.items() if seq not in self._acked_seqs]
        if not unacked:
            return
        seq, item = max(unacked, key=lambda pair: pair[1].size)
        self.max_batch_bytes = max(1, min(self.max_batch_bytes, item.size // 2))
        if item.kind in ("live", "spool") and item.steps > 1:
            return
        del self._inflight[seq]
        where = f"{self.spool.directory}/rejected.gws" if self.spool is not None else "nowhere (no spool)"
        if item.kind in ("live", "spool"):
            self._warn_once("too-big", f"gradwatch: one step of run {self.run!r} is {item.size} bytes, over "
                                       f"the server's message limit (gradwatch serve --max-body); it is kept "
                                       f"in {where} and not retried")
            if self.spool is not None and item.payload:
                self.spool.reject(item.payload, item.steps)
            if item.kind == "spool" and item.end is not None:
                self._skip_frames.add(item.end)
            self.count_drop("too_big", item.steps)
        elif item.kind == "meta":
            self._warn_once("meta-too-big", f"gradwatch: the run metadata of {self.run!r} is {item.size} "
                                             f"bytes, over the server's message limit; it is not sent")
            self._meta_acked = True
        elif item.kind == "events" and item.drops:
            self._warn_once("events-too-big", "gradwatch: the drop report is over the server's message "
                                              "limit; it is not sent")
            with self._cond:
                self._unreported.subtract(item.drops)
                self._unreported = +self._unreported

    def _warn_once(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        log.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)

    def _wait_and_receive(self) -> None:
        timeout = self._wait_time()
        transport = self.transport
        if transport is not None and transport.connected and self._inflight:
            deadline = time.monotonic() + timeout
            try:
                message = transport.recv(timeout)
                while message is not None:
                    self._on_message(message)
                    message = transport.recv(0) if self._inflight else None
            except (Refused, TransportError) as error:
                self._transport_failed(error)
            remaining = deadline - time.monotonic()
            if remaining > 0 and not self._inflight and not self.buffer.wake.is_set():
                self.buffer.wake.wait(min(remaining, 0.02))
        elif timeout > 0:
            self.buffer.wake.wait(timeout)
        self.buffer.wake.clear()

    def _wait_time(self) -> float:
        if self._stop.is_set() or self._flush_target > self._flushed or len(self.buffer) >= self.batch_steps:
            return 0.0
        waits = [0.1]
        if self._open:
            waits.append(self._open_since + self.batch_interval - time.monotonic())
        elif len(self.buffer):
            waits.append(self.batch_interval)
        if (self.transport is not None and not self.transport.connected and not self.stats.refused
                and self._connect_thread is None):  # an attempt in progress wakes us when done
            waits.append(self._next_attempt - time.monotonic())
        return max(0.0, min(waits))

    def _on_message(self, message: dict) -> None:
        kind = message.get("type")
        seq = message.get("seq")
        if kind == "ack" and seq in self._inflight:
            self.stats.accepted += int(message.get("accepted", 0) or 0)
            self.stats.duplicates += int(message.get("duplicates", 0) or 0)
            self.stats.conflicts += int(message.get("conflicts", 0) or 0)
            if message.get("conflicts"):
                self._warn_once("conflicts", f"gradwatch: the server reported {message['conflicts']} "
                                             f"conflicting step(s) in run {self.run!r} (same step, other values)")
            self._acked_seqs.add(seq)
            self._largest_acked = max(self._largest_acked, self._inflight[seq].size)
            self._suspects = 0
        elif kind == "error" and seq in self._inflight:
            status = int(message.get("status", 0) or 0)
            detail = message.get("detail")
            if 400 <= status < 500:
                item = self._inflight[seq]
                self._warn_once(f"error-{status}", f"gradwatch: the server refused a batch of run {self.run!r} "
                                                   f"(HTTP {status}: {detail}); it is kept in "
                                                   f"{self.spool.directory if self.spool else 'no spool'}"
                                                   f"/rejected.gws and not retried")
                if self.spool is not None and item.payload:
                    self.spool.reject(item.payload, item.steps)
                self._acked_seqs.add(seq)
            else:
                raise TransportError(f"server error {status}: {detail}")
        else:
            return
        # Resolve acknowledged items in order, so spool positions only move forward.
        while self._inflight:
            first_seq, item = next(iter(self._inflight.items()))
            if first_seq not in self._acked_seqs:
                break
            self._inflight.popitem(last=False)
            self._acked_seqs.discard(first_seq)
            if item.kind in ("live", "spool"):
                self.stats.acked += item.steps
            if item.kind == "spool" and self.spool is not None:
                self.spool.ack(item.end)
            elif item.kind == "meta":
                self._meta_acked = self._meta_acked or item.steps == self._meta_version
            elif item.kind == "events" and item.drops:
                with self._cond:
                    self._unreported.subtract(item.drops)
                    self._unreported = +self._unreported

    def _lost_connection(self) -> None:
        """Move in-flight live batches to the spool; spooled ones are read again later."""
        if self.transport is not None:
            self.transport.close()
        self.stats.connected = False
        for seq, item in self._inflight.items():
            if item.kind == "live" and seq not in self._acked_seqs:
                self._to_spool(item.payload, item.steps)
            elif item.kind == "live":
                self.stats.acked += item.steps
        self._inflight.clear()
        self._acked_seqs.clear()
        self._cursor = None

    # -- batching and sending ---------------------------------------------
    def _collect(self, force: bool) -> None:
        while True:
            room = self.batch_steps - len(self._open)
            if room > 0 and len(self.buffer) > room:
                # Behind (the buffer holds more than a batch): take it all at once. Fewer, larger
                # batches cost far less per record (encoding, checksums, writes), which is how the
                # sender catches up with a fast training loop that shares the GIL with it.
                room = len(self.buffer)
            taken = self.buffer.take(room)
            if taken:
                if not self._open:
                    self._open_since = time.monotonic()
                self._open.extend(taken)
                self._taken += len(taken)
            full = len(self._open) >= self.batch_steps
            due = self._open and (force or time.monotonic() - self._open_since >= self.batch_interval)
            if full or due:
                records, self._open = self._open, []
                self.last_step = records[-1].step
                if self._spool_full_and_offline():
                    self.count_drop("spool_full", len(records))  # no need to encode what cannot be kept
                else:
                    for chunk in layout_runs(records):
                        for payload, steps in self._encode(chunk):
                            self._route(payload, steps)
            if not taken or not (full or force):
                return

    def _encode(self, records: Sequence[StepRecord]) -> list[tuple[bytes, int]]:
        """Records of one layout -> payloads within the byte budget. A record that cannot be
        encoded is dropped (counted as `encode_error`, one warning); the others still go."""
        try:
            return encode_within(self.run, records, self.max_batch_bytes)
        except Exception as error:
            good = [record for record in records if self._encodable(record)]
            if len(good) == len(records):  # no record is to blame: the batch cannot go
                good = []
            self._warn_once("encode", f"gradwatch: cannot encode step records of run {self.run!r} "
                                      f"({error!r}); they are dropped (counted as encode_error)")
            self.count_drop("encode_error", len(records) - len(good))
        if not good:
            return []
        try:
            return encode_within(self.run, good, self.max_batch_bytes)
        except Exception:
            self.count_drop("encode_error", len(good))
            return []

    def _encodable(self, record: StepRecord) -> bool:
        try:
            encode_chunk(self.run, [record])
            return True
        except Exception:
            return False

    def _spool_full_and_offline(self) -> bool:
        return (self.spool is not None and self.spool.full
                and (self.transport is None or not self.transport.connected))

    def _fits(self, payload: bytes) -> bool:
        return len(payload) + 64 <= self.max_batch_bytes  # 64: the message's own fields

    def _route(self, payload: bytes, steps: int) -> None:
        parts = [(payload, steps)] if self._fits(payload) else split_payload(payload, self.max_batch_bytes - 64)
        for part, count in parts:
            transport = self.transport
            live = (transport is not None and transport.connected and len(self._inflight) < self.max_inflight
                    and (self.spool is None or not self.spool.pending()))
            if live:
                try:
                    self._send("live", part, count)
                    continue
                except (Refused, TransportError) as error:
                    self._transport_failed(error)  # the part was in flight: now in the spool
                    continue
            self._to_spool(part, count)

    def _to_spool(self, payload: bytes, steps: int, *, new: bool = True) -> bool:
        """Append to the spool; a drop is counted when that fails. `new=False` for steps
        already counted as spooled (a spooled batch written again, cut smaller)."""
        if self.spool is None:
            self.count_drop("spool_unavailable", steps)
            return False
        try:
            written = self.spool.append(payload, steps)
        except SpoolBusy as error:
            self._warn_once("busy", f"gradwatch: {error}; records are dropped")
            self.spool = None
            written = False
        except OSError as error:
            self._warn_once("spool-io", f"gradwatch: cannot write the spool: {error}; records are dropped")
            written = False
        if written:
            if new:
                self.stats.spooled += steps
            self._write_meta_file()
        else:
            reason = "spool_full" if self.spool is not None else "spool_unavailable"
            self.count_drop(reason, steps)
        return bool(written)

    def _write_meta_file(self) -> None:
        if self.spool is not None and self._meta_spooled != self._meta_version and self.meta is not None:
            self._meta_spooled = self._meta_version
            self.spool.write_json("meta.json", {"run": self.run, "meta": self.meta})

    def _send(self, kind: str, payload: bytes, steps: int, end: Position | None = None,
              meta: dict | None = None, drops: dict | None = None) -> None:
        self._seq += 1
        if payload:
            text = encode_message(self._seq, payload, meta)
        else:
            text = encode_message(self._seq, encode_payload(self.run), meta)
        size = len(text) if text.isascii() else len(text.encode("utf-8"))
        self._inflight[self._seq] = _Inflight(kind, payload, steps, end, drops, size)
        self.transport.send(text)
        if kind in ("live", "spool"):
            self.stats.sent += steps

    def _frame_done(self, end: Position) -> None:
        """A spool frame that needs no ack (bad bytes, set aside, or written again cut smaller):
        acknowledged now, or in order after the frames in flight before it."""
        if not self._inflight:
            self.spool.ack(end)
        else:
            self._seq += 1
            self._inflight[self._seq] = _Inflight("spool", b"", 0, end)
            self._acked_seqs.add(self._seq)

    def _pump(self) -> None:
        transport = self.transport
        if transport is None or not transport.connected:
            return
        try:
            kinds = {item.kind for item in self._inflight.values()}
            if self.meta is not None and not self._meta_acked and "meta" not in kinds:
                self._send("meta", b"", self._meta_version, meta=self.meta)
            if self._unreported and "events" not in kinds:
                with self._cond:
                    drops = dict(self._unreported)
                payload = encode_payload(self.run, events=[drop_event(max(self.last_step, 0), drops)])
                self._send("events", payload, 0, drops=drops)
            spool = self.spool
            if spool is None:
                return
            while len(self._inflight) < self.max_inflight and spool.pending():
                if self._cursor is None or self._cursor < spool.acked:
                    self._cursor = spool.acked
                frames = spool.read(self._cursor, self.max_inflight - len(self._inflight))
                if not frames:
                    break
                for frame in frames:
                    self._cursor = frame.end
                    if not frame.payload or frame.end in self._skip_frames:
                        self._frame_done(frame.end)  # bad bytes, or a step set aside as too big
                    elif self._fits(frame.payload) or frame.steps <= 1:
                        self._send("spool", frame.payload, frame.steps, end=frame.end)
                    else:
                        # Over the byte budget: write it again cut smaller, at the spool's end.
                        for part, count in split_payload(frame.payload, self.max_batch_bytes - 64):
                            self._to_spool(part, count, new=False)
                        self._skip_frames.add(frame.end)
                        self._frame_done(frame.end)
                if self._cursor >= spool.end():
                    break
        except (Refused, TransportError) as error:
            self._transport_failed(error)

    def _sync_spool(self) -> None:
        if self.spool is None:
            return
        try:
            self.spool.sync()
        except OSError as error:
            self._warn_once("spool-io", f"gradwatch: cannot sync the spool: {error}")

    # -- flush bookkeeping ---------------------------------------------------
    def _idle(self) -> bool:
        spool_pending = self.spool is not None and self.spool.pending()
        return not len(self.buffer) and not self._open and not self._inflight and not spool_pending

    def _check_flushed(self) -> None:
        target = self._flush_target
        if target <= self._flushed:
            return
        if len(self.buffer) or self._open or self._taken < target:
            return
        delivered = self._idle() and not self._unsent_live()
        durable = self._server_away() and not self._unsent_live()
        if delivered or durable:
            with self._cond:
                self._flushed = target
                self._cond.notify_all()

    def _unsent_live(self) -> bool:
        return any(item.kind == "live" for item in self._inflight.values())

    def _shutdown(self) -> None:
        with self._connect_lock:
            self._shut = True
            outcome, self._connect_outcome = self._connect_outcome, None
        if outcome is not None and not isinstance(outcome, BaseException) and self.transport is not None:
            self.transport.discard(outcome)
        try:
            self._fold_training_drops()
            self._collect(force=True)
            if self._inflight:
                self._lost_connection()
            if self.transport is not None:
                self.transport.close()
            self.stats.connected = False
            if self.spool is not None:
                if self._unreported and (self.spool.exists() or self.stats.refused):
                    with self._cond:
                        self.spool.write_json("drops.json", dict(self._unreported))
                if self.spool.exists():
                    self._write_meta_file()
                self.spool.close()
        except Exception:
            log.exception("gradwatch: error while shutting the sender down")
        finally:
            with self._cond:
                self._flushed = max(self._flushed, self._flush_target)
                self._cond.notify_all()

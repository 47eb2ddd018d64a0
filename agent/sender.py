"""The sender thread: batches records, streams them, spools what cannot go now.

One background thread owns the WebSocket and the spool's read side
(OpenTelemetry's BatchSpanProcessor worker, with a transport that can be
away). Each loop it (1) connects when due, with jittered exponential backoff,
(2) reads acknowledgements, (3) takes records from the buffer and closes a
columnar batch every `batch_steps` records or `batch_interval` seconds,
(4) sends: live while connected with nothing spooled, otherwise the batch is
appended to the spool and the spool is replayed in order, and (5) fsyncs the
spool at most every 500 ms.

At-least-once: every batch carries a sequence number and stays in flight until
its ack; on a lost connection, in-flight live batches are written to the
spool and in-flight spool batches are read again from the last acknowledged
position. The server's unique (run, step) key makes the result exactly-once.
"""
from __future__ import annotations

import logging
import random
import threading
import time
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

from .buffer import RecordBuffer
from .recorder import StepRecord
from .spool import Position, Spool, SpoolBusy
from .transport import Refused, TransportError, WebSocketTransport
from .wire import BOOL_COLUMNS, drop_event, encode_message, encode_payload, wire_floats

log = logging.getLogger("gradwatch.agent")


@dataclass
class Stats:
    """Counts of step records, by what happened to them.

    `recorded`: handed over by the training thread; `sent`: step records in
    batches written to the socket (a replayed batch counts again); `acked`:
    step records in batches the server acknowledged; `spooled`: step records
    written to the spool; `dropped`: records lost, by reason
    (`spool_full`, `queue_full`, `spool_unavailable`, `forked_child`).
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


def encode_batches(run: str, records: Sequence[StepRecord]) -> list[tuple[bytes, int]]:
    """Records -> `[(payload JSON, step count)]`, one columnar batch per run of equal layouts."""
    out = []
    start = 0
    while start < len(records):
        layout = records[start].layout
        stop = start
        while stop < len(records) and records[stop].layout == layout:
            stop += 1
        chunk = records[start:stop]
        rows = [record.floats() for record in chunk]
        batch: dict = {"step": [record.step for record in chunk],
                       "time": [round(record.time, 6) for record in chunk]}
        for index, name in enumerate(layout.columns):
            column = [row[index] for row in rows]
            batch[name] = [value != 0.0 for value in column] if name in BOOL_COLUMNS else wire_floats(column)
        for index, name in enumerate(layout.extra_columns):
            batch[name] = wire_floats(float(record.extras[index]) for record in chunk)
        if layout.tensor_names:
            first = len(layout.columns)
            batch["tensor_norms"] = {"names": list(layout.tensor_names),
                                     "norms": [wire_floats(row[first:]) for row in rows]}
        out.append((encode_payload(run, batch), len(chunk)))
        start = stop
    return out


class Sender:
    def __init__(self, run: str, buffer: RecordBuffer, spool: Spool | None,
                 transport: WebSocketTransport | None, *, batch_steps: int = 1000,
                 batch_interval: float = 0.25, max_inflight: int = 8, backoff_base: float = 0.1,
                 backoff_cap: float = 30.0):
        self.run = run
        self.buffer = buffer
        self.spool = spool
        self.transport = transport
        self.batch_steps = batch_steps
        self.batch_interval = batch_interval
        self.max_inflight = max_inflight
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.stats = Stats()
        self.meta: dict | None = None
        self.last_step = -1
        self._meta_acked = False
        self._meta_version = 0
        self._meta_spooled = -1
        self._unreported: Counter = Counter()
        self._open: list[StepRecord] = []
        self._open_since = 0.0
        self._inflight: OrderedDict[int, _Inflight] = OrderedDict()
        self._acked_seqs: set[int] = set()
        self._seq = 0
        self._cursor: Position | None = None
        self._failures = 0
        self._next_attempt = 0.0
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
                self._connect_if_due()
                self._wait_and_receive()
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
                if stopping and (self._idle() or time.monotonic() >= self._stop_deadline
                                 or self._server_away()):
                    break
        except Exception as error:  # never die silently: say it, then keep data on disk below
            self._warn_once("crash", f"gradwatch sender stopped on an unexpected error: {error!r}")
            log.exception("gradwatch sender crashed")
        finally:
            self._shutdown()

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

    def _connect_if_due(self) -> None:
        transport = self.transport
        if transport is None or transport.connected or self.stats.refused:
            return
        if self._stop.is_set() and self._failures > 0:
            return
        if time.monotonic() < self._next_attempt:
            return
        try:
            transport.connect()
        except Refused as error:
            self._refused(str(error))
            return
        except TransportError as error:
            self._backoff(str(error))
            return
        self._failures = 0
        self.stats.connected = True
        self._cursor = self.spool.acked if self.spool is not None else None
        log.info("gradwatch: connected to %s", transport.url)

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
            except Refused as error:
                self._refused(str(error))
            except TransportError as error:
                self._lost_connection()
                self._backoff(str(error))
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
        if self.transport is not None and not self.transport.connected and not self.stats.refused:
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
                    for payload, steps in encode_batches(self.run, records):
                        self._route(payload, steps)
            if not taken or not (full or force):
                return

    def _spool_full_and_offline(self) -> bool:
        return (self.spool is not None and self.spool.full
                and (self.transport is None or not self.transport.connected))

    def _route(self, payload: bytes, steps: int) -> None:
        transport = self.transport
        live = (transport is not None and transport.connected and len(self._inflight) < self.max_inflight
                and (self.spool is None or not self.spool.pending()))
        if live:
            try:
                self._send("live", payload, steps)
                return
            except Refused as error:
                self._refused(str(error))
            except TransportError as error:
                self._lost_connection()
                self._backoff(str(error))
        self._to_spool(payload, steps)

    def _to_spool(self, payload: bytes, steps: int) -> None:
        if self.spool is None:
            self.count_drop("spool_unavailable", steps)
            return
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
            self.stats.spooled += steps
            self._write_meta_file()
        else:
            reason = "spool_full" if self.spool is not None else "spool_unavailable"
            self.count_drop(reason, steps)

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
        self._inflight[self._seq] = _Inflight(kind, payload, steps, end, drops)
        self.transport.send(text)
        if kind in ("live", "spool"):
            self.stats.sent += steps

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
                    if frame.payload:
                        self._send("spool", frame.payload, frame.steps, end=frame.end)
                    elif not self._inflight:
                        spool.ack(frame.end)  # only bad bytes: nothing to send
                    else:
                        self._seq += 1  # bad bytes after frames in flight: ack in order
                        self._inflight[self._seq] = _Inflight("spool", b"", 0, frame.end)
                        self._acked_seqs.add(self._seq)
                if self._cursor >= spool.end():
                    break
        except Refused as error:
            self._refused(str(error))
        except TransportError as error:
            self._lost_connection()
            self._backoff(str(error))

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
        try:
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

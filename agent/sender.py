"""The sender thread: batches records, streams them, spools what cannot go now.

One background thread owns the WebSocket and the spool's read side
(OpenTelemetry's BatchSpanProcessor worker, with a transport that can be
away). Each loop it (1) starts a connection attempt when due (`Backoff`; the
attempt runs in a `Connector` helper thread, so a server slow to answer
never stops the draining), (2) reads acknowledgements into the
`InflightWindow`, (3) takes records from the buffer and closes a columnar
batch every `batch_steps` records, `max_batch_bytes` encoded bytes or
`batch_interval` seconds (`encoding`), (4) sends: live while connected with
nothing spooled, otherwise the batch is appended to the spool and the spool
is replayed in order, and (5) fsyncs the spool at most every 500 ms.

At-least-once: every message carries a sequence number and stays in the
window until acknowledged; on a lost connection, in-flight live batches are
written to the spool and spooled ones are read again from the last
acknowledged position. The server's unique (run, step) key makes the result
exactly-once.

`flush()` (and so `close()`) does not wait for the backoff's next slot: with
records waiting and no connection it tries at once, and again every
`FLUSH_RETRY` seconds until its timeout, so a server that came back is used.
A server that accepts and stops answering is given up after `send_timeout`
seconds (no ack, or a send that cannot move a byte) and its batches spooled.

Message size: the server closes the socket with code 1009 when a message is
over its limit (`gradwatch serve --max-body`). The sender then halves its
byte budget below the largest unacknowledged message (`InflightWindow.culprit`)
and sends again, cut smaller; a single step that is still too big is set
aside in `rejected.gws` with one warning (like a batch the server refuses
with a 4xx).
"""
from __future__ import annotations

import logging
import shlex
import threading
import time
import warnings
from dataclasses import replace
from typing import Callable, Sequence

from .buffer import RecordBuffer
from .connection import Backoff, Connector
from .drops import DropLedger
from .flushing import FlushLedger, FlushRequest
from .link import FLUSH_RETRY, Link, LinkState
from .encoding import DEFAULT_BATCH_BYTES, encode_batches, encode_chunk, encode_within, layout_runs
from .recorder import StepRecord
from .spool import Position, Spool, SpoolBusy
from .stats import FlushResult, Stats
from .transport import Refused, Stalled, TransportError, WebSocketTransport
from .wire import drop_event, encode_message, encode_payload, split_payload
from .window import Inflight, InflightWindow

__all__ = ["DEFAULT_BATCH_BYTES", "FLUSH_RETRY", "FlushResult", "Sender", "Stats", "encode_batches", "encode_chunk",
           "layout_runs"]

log = logging.getLogger("gradwatch.agent")

MESSAGE_TOO_BIG = 1009  # WebSocket close code: a message was over the server's limit


def _nobody_listening(error: BaseException) -> bool:
    """The connection was refused by the host (ECONNREFUSED: no server on that port), as
    opposed to a server that is slow, stalled or answered something else."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, ConnectionRefusedError):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


class Sender:
    def __init__(self, run: str, buffer: RecordBuffer, spool: Spool | None,
                 transport: WebSocketTransport | None, *, batch_steps: int = 1000,
                 batch_interval: float = 0.25, max_inflight: int = 8, backoff_base: float = 0.1,
                 backoff_cap: float = 30.0, max_batch_bytes: int = DEFAULT_BATCH_BYTES,
                 complete: Callable[[Sequence[StepRecord]], list[StepRecord]] | None = None):
        self.run = run
        self.complete = complete  # the host half of a lean step (agent/host.py), before encoding
        self.buffer = buffer
        self.spool = spool
        self.transport = transport
        self.batch_steps = batch_steps
        self.batch_interval = batch_interval
        self.max_batch_bytes = int(max_batch_bytes)  # shrinks when the server says 1009
        self.stats = Stats()
        self.meta: dict | None = None
        self.last_step = -1
        self.window = InflightWindow(max_inflight)
        self.backoff = Backoff(backoff_base, backoff_cap)
        self.link = Link(self.backoff, offline=transport is None)  # when to connect (agent/link.py)
        self.connector = Connector(transport, self.buffer.wake.set) if transport is not None else None
        self._meta_acked = False
        self._meta_version = 0
        self._meta_spooled = -1
        self.drops = DropLedger()
        self._open: list[StepRecord] = []
        self._open_since = 0.0
        self._rejected_seqs: set[int] = set()  # messages the server refused for good
        # Spool frames never to send again (set aside as too big, or written again cut smaller).
        self._skip_frames: set[Position] = set()
        self._suspects = 0  # connections lost without a close code, a message bigger than any acked in flight
        self._cursor: Position | None = None
        self._warned: set[str] = set()
        self.ledger = FlushLedger()  # records taken and held; the flush waiting on them
        self._cond = self.ledger.cond  # (the counts in `stats` change under it too)
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
        self.drops.report_earlier(dropped)

    def count_training_drop(self, reason: str) -> None:
        """A record the training thread could not hand over (the buffer was full): O(1), no
        lock, no I/O. The sender thread folds these into `stats` and the drop report."""
        self.drops.count_training(reason)

    def dropped(self) -> dict[str, int]:
        """Drops by reason, including those the training thread counted a moment ago."""
        return self.drops.totals()

    def snapshot(self) -> Stats:
        """The counts now, `spooled` and `pending` included."""
        with self._cond:
            spooled = self.spool.pending_steps if self.spool is not None else 0
            stats = replace(self.stats, spooled=spooled, pending=len(self.buffer) + self.ledger.held)
        stats.dropped = self.dropped()
        return stats

    @property
    def failures(self) -> int:
        """Connection attempts that failed in a row."""
        return self.link.failures

    def delivered(self) -> bool:
        """Connected, and the spool, the in-flight window, the metadata and the drop
        counts are all acknowledged (what `gradwatch push` waits for)."""
        return (self.stats.connected and not self.window and self._idle()
                and (self._meta_acked or self.meta is None) and not self.drops.unreported())

    def count_drop(self, reason: str, steps: int = 1) -> None:
        self.drops.count(reason, steps)

    def push_command(self) -> str:
        """The command that uploads what this sender leaves in its spool."""
        directory = shlex.quote(str(self.spool.directory)) if self.spool is not None else "DIR"
        command = f"gradwatch push {directory}"
        if self.transport is not None:
            command += f" --url {shlex.quote(self.transport.push_url())}"
            if self.transport.token or self.transport.refused == "token":
                command += " --token TOKEN"
        return command

    def flush(self, target: int, timeout: float, give_up_refused: float | None = None) -> FlushResult:
        """Wait until the first `target` records put in the buffer are acknowledged by the
        server, trying to connect at once (and again every `FLUSH_RETRY` s) when there is no
        connection; while it is away they are fsynced to the spool meanwhile. Without a
        transport (or with a refused token) the spool is where they go: done once fsynced.
        `give_up_refused` (seconds, for `close()`): done once they are in the synced spool and
        every connection for that long was refused by the host (nothing listens there); a
        server that accepts and does not answer is still waited for until `timeout`."""
        request = self.ledger.begin(target, timeout, give_up_refused)
        self.buffer.wake.set()
        self.ledger.wait(request, lambda: self._thread is not None and self._thread.is_alive())
        return self._result(request)

    def _result(self, request: FlushRequest) -> FlushResult:
        stats = self.snapshot()
        offline = self.transport is None  # the spool is the destination
        complete = self.ledger.complete(request, pending=stats.pending, dropped=stats.dropped_total,
                                        rejected=stats.rejected, spooled=stats.spooled, offline=offline)
        return FlushResult(delivered=complete, acked=stats.acked, spooled=stats.spooled,
                           pending=stats.pending, dropped=stats.dropped_total, rejected=stats.rejected,
                           unreachable=request.unreachable and not stats.connected,
                           timed_out=not request.done)

    def stop(self, timeout: float) -> bool:
        """Deliver what the current connection can within `timeout`, spool the rest, end the
        thread (no new connection is attempted: `flush()` does that first)."""
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
        self.drops.fold()
        stopping = self._stop.is_set()
        flushing = self.ledger.request is not None
        self._collect(force=stopping or flushing)
        self._pump()
        self._check_stalled()
        if self.spool is not None:
            if flushing or stopping:
                self._sync_spool()
            else:
                self.spool.sync_if_due()
        self._check_flushed()
        return stopping and (self._idle() or time.monotonic() >= self._stop_deadline or self._server_away())

    def _open_existing_spool(self) -> None:
        """A spool folder an earlier process left is opened now and replayed to the server."""
        if self.spool is not None and self.spool.exists():
            try:
                self.spool.open()
            except SpoolBusy as error:
                self._warn_once("busy", f"gradwatch: {error}; this run will not spool")
                self.spool = None

    def _server_away(self) -> bool:
        """Records cannot go to the server now: no url, a refused token, or the last
        connection attempt failed (before the first attempt, the server is not "away")."""
        return self.link.away()

    # -- connecting ----------------------------------------------------------
    def _connect_if_due(self) -> None:
        transport, connector = self.transport, self.connector
        if self.link.state not in (LinkState.DOWN, LinkState.CONNECTING):  # offline, up, or refused
            return
        if connector.busy:
            outcome = connector.take()
            if outcome is None:
                return
            if isinstance(outcome, BaseException):
                self._connect_failed(outcome)
                return
            transport.adopt(outcome)
            self.link.connected()
            self.stats.connected = True
            self.stats.unreachable = False
            self._cursor = self.spool.acked if self.spool is not None else None
            log.info("gradwatch: connected to %s", transport.url)
            return
        now = time.monotonic()
        # While a flush waits, records wait for this connection: not the backoff's slot.
        if self.link.due(now, flushing=self.ledger.request is not None, stopping=self._stop.is_set()):
            self.link.attempt(now)
            connector.start()

    def _connect_failed(self, error: Exception) -> None:
        if isinstance(error, Refused):
            self._refused(str(error))
            return
        request = self.ledger.request
        if request is not None:
            request.unreachable = True
        self.stats.unreachable = True
        self._warn_once("unreachable", f"gradwatch: cannot reach the server at {self.transport.base_url} "
                                       f"({error}); steps of run {self.run!r} go to the spool "
                                       f"{self.spool.directory if self.spool else '(none)'} and are sent when "
                                       f"it answers; to send them later: {self.push_command()}")
        self._backoff(str(error), nobody_listening=_nobody_listening(error))

    def _transport_failed(self, error: Exception) -> None:
        """What every failed send or receive comes to: a refusal ends the trying; a 1009
        (message too big) cuts smaller and reconnects soon; the rest backs off."""
        if isinstance(error, Refused):
            self._refused(str(error))
            return
        code = getattr(error, "code", None)
        too_big = code == MESSAGE_TOO_BIG
        # The server's 1009 can be lost: it closes with our next bytes unread, and the reset
        # may overtake the close frame. A connection that ends without a close code while a
        # message bigger than any acknowledged so far is in flight is a suspect; twice in a
        # row (no ack between) counts as a 1009.
        suspect = not too_big and code is None and not isinstance(error, Stalled) and self.window.suspect()
        if suspect:
            self._suspects += 1
            too_big = self._suspects >= 2
        if too_big:
            self._suspects = 0
            self._message_too_big()
        self._lost_connection()
        if too_big or suspect:  # the server is likely there: try again soon (a failed connect backs off)
            self.link.lost(time.monotonic(), soon=True)
            if too_big:
                log.info("gradwatch: a message was over the server's size limit; now cutting messages "
                         "at %d bytes", self.max_batch_bytes)
        else:
            self._backoff(str(error))

    def _backoff(self, reason: str, nobody_listening: bool = False) -> None:
        if self.link.failed(time.monotonic(), nobody_listening):
            log.info("gradwatch: server unreachable (%s); spooling and retrying", reason)

    def _refused(self, reason: str) -> None:
        self.link.refused(reason)
        self.stats.refused = reason
        self.stats.connected = False
        self._lost_connection()
        self._warn_once("refused", f"gradwatch: {reason}. Not retrying; records stay in the spool "
                                   f"({self.spool.directory if self.spool else 'no spool'}); "
                                   f"send them with: {self.push_command()}")

    def _check_stalled(self) -> None:
        """A server that accepted and stopped answering: give the connection up after
        `send_timeout` seconds without an ack for the oldest message in flight."""
        transport = self.transport
        if transport is None or not transport.connected:
            return
        oldest = self.window.oldest_unacked_sent_at()
        if oldest is not None and time.monotonic() - oldest > transport.send_timeout:
            self._transport_failed(Stalled(f"no answer within {transport.send_timeout:g} s"))

    def _message_too_big(self) -> None:
        """The server closed with 1009. The culprit is unacknowledged, and no message is bigger
        than the largest unacknowledged one: halve the budget below it (it is cut again when
        sent again), or, when it cannot be cut (one step, metadata), set it aside."""
        found = self.window.culprit()
        if found is None:
            return
        seq, item = found
        self.max_batch_bytes = max(1, min(self.max_batch_bytes, item.size // 2))
        if item.kind in ("live", "spool") and item.steps > 1:
            return
        self.window.remove(seq)
        if item.kind == "live":
            self.ledger.settled(item.steps)
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
            self.drops.reported(item.drops)

    def _warn_once(self, key: str, message: str) -> None:
        """Say it once, as a RuntimeWarning (printed once; filtered and captured as Python's
        warnings are); the log gets it at debug level, so it is never printed twice."""
        if key in self._warned:
            return
        self._warned.add(key)
        log.debug(message)
        warnings.warn(message, RuntimeWarning, stacklevel=1)  # (the caller's line would repeat the text)

    # -- receiving ------------------------------------------------------------
    def _wait_and_receive(self) -> None:
        timeout = self._wait_time()
        transport = self.transport
        if transport is not None and transport.connected and self.window:
            deadline = time.monotonic() + timeout
            try:
                message = transport.recv(timeout)
                while message is not None:
                    self._on_message(message)
                    message = transport.recv(0) if self.window else None
            except (Refused, TransportError) as error:
                self._transport_failed(error)
            remaining = deadline - time.monotonic()
            if remaining > 0 and not self.window and not self.buffer.wake.is_set():
                self.buffer.wake.wait(min(remaining, 0.02))
        elif timeout > 0:
            self.buffer.wake.wait(timeout)
        self.buffer.wake.clear()

    def _wait_time(self) -> float:
        """How long the loop may sleep (an ack, a full batch or a connection wakes it sooner)."""
        hurry = self.ledger.request is not None or self._stop.is_set()
        if len(self.buffer) >= self.batch_steps or (hurry and (len(self.buffer) or self._open)):
            return 0.0
        transport = self.transport
        connected = transport is not None and transport.connected
        spool = self.spool
        if (connected and not self.window.full and spool is not None and spool.pending()
                and (self._cursor is None or self._cursor < spool.end())):
            return 0.0  # the spool's replay can go on now
        if self._stop.is_set():
            return 0.02
        now = time.monotonic()
        waits = [0.1]
        if self._open:
            waits.append(self._open_since + self.batch_interval - now)
        elif len(self.buffer):
            waits.append(self.batch_interval)
        if self.link.state is LinkState.DOWN and not self.connector.busy:  # an attempt wakes us when done
            waits.append(self.link.next_attempt(flushing=self.ledger.request is not None) - now)
        return max(0.0, min(waits))

    def _on_message(self, message: dict) -> None:
        kind = message.get("type")
        seq = message.get("seq")
        item = self.window.get(seq) if isinstance(seq, int) else None
        if item is None:
            return
        if kind == "ack":
            accepted, duplicates, conflicts = (int(message.get(name, 0) or 0)
                                               for name in ("accepted", "duplicates", "conflicts"))
            self.stats.accepted += accepted
            self.stats.duplicates += duplicates
            self.stats.conflicts += conflicts
            if conflicts:
                self._warn_once("conflicts", f"gradwatch: the server reported {conflicts} conflicting "
                                             f"step(s) in run {self.run!r} (same step, other values)")
            self._suspects = 0
            resolved = self.window.ack(seq)
        elif kind == "error":
            status = int(message.get("status", 0) or 0)
            if not 400 <= status < 500:
                raise TransportError(f"server error {status}: {message.get('detail')}")
            self._warn_once(f"error-{status}", f"gradwatch: the server refused a batch of run {self.run!r} "
                                               f"(HTTP {status}: {message.get('detail')}); it is kept in "
                                               f"{self.spool.directory if self.spool else 'no spool'}"
                                               f"/rejected.gws and not retried")
            if self.spool is not None and item.payload:
                self.spool.reject(item.payload, item.steps)
            self._rejected_seqs.add(seq)
            resolved = self.window.settle(seq)
        else:
            return
        for done_seq, done in resolved:
            self._resolved(done_seq, done)

    def _resolved(self, seq: int, item: Inflight) -> None:
        """An item leaves the window in order: count it, move the spool's position forward."""
        refused = seq in self._rejected_seqs
        self._rejected_seqs.discard(seq)
        if item.kind in ("live", "spool"):
            with self._cond:
                if refused:
                    self.stats.rejected += item.steps
                else:
                    self.stats.acked += item.steps
                if item.kind == "live":
                    self.ledger.held -= item.steps
        if item.kind == "spool" and item.end is not None and self.spool is not None:
            self.spool.ack(item.end)
        elif item.kind == "meta":
            self._meta_acked = self._meta_acked or item.steps == self._meta_version
        elif item.kind == "events" and item.drops:
            self.drops.reported(item.drops)

    def _lost_connection(self) -> None:
        """Move in-flight live batches to the spool; spooled ones are read again later."""
        if self.transport is not None:
            self.transport.close()
        self.stats.connected = False
        for item, acked in self.window.drain():
            if item.kind != "live":
                continue
            if acked:
                with self._cond:
                    self.stats.acked += item.steps
                    self.ledger.held -= item.steps
            else:
                self._to_spool(item.payload, item.steps, live=True)
        self._rejected_seqs.clear()
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
                self.ledger.took(len(taken))
                self._open.extend(taken if self.complete is None else self._completed(taken))
            full = len(self._open) >= self.batch_steps
            due = self._open and (force or time.monotonic() - self._open_since >= self.batch_interval)
            if full or due:
                records, self._open = self._open, []
                self.last_step = records[-1].step
                if self._spool_full_and_offline():
                    self._count_held_drop("spool_full", len(records))  # no need to encode what cannot be kept
                else:
                    for chunk in layout_runs(records):
                        for payload, steps in self._encode(chunk):
                            self._route(payload, steps)
            if not taken or not (full or force):
                return

    def _completed(self, records: list[StepRecord]) -> list[StepRecord]:
        """The records completed by the host stage (agent/host.py), which leaves out records
        that cannot be read; those (all, should the stage fail) are dropped, counted as
        `encode_error` with one warning: never sent half-made."""
        try:
            done = self.complete(records)
            error: Exception | None = None
        except Exception as failure:
            done, error = [], failure
        lost = len(records) - len(done)
        if lost:
            why = f" ({error!r})" if error is not None else ""
            self._warn_once("encode", f"gradwatch: cannot encode {lost} step record(s) of run {self.run!r}"
                                      f"{why}; they are dropped (counted as encode_error)")
            self._count_held_drop("encode_error", lost)
        return done

    def _count_held_drop(self, reason: str, steps: int) -> None:
        self.ledger.settled(steps)
        self.count_drop(reason, steps)

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
            self._count_held_drop("encode_error", len(records) - len(good))
        if not good:
            return []
        try:
            return encode_within(self.run, good, self.max_batch_bytes)
        except Exception:
            self._count_held_drop("encode_error", len(good))
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
        """Records taken from the buffer (held in the ledger) go live or to the spool."""
        parts = [(payload, steps)] if self._fits(payload) else split_payload(payload, self.max_batch_bytes - 64)
        for part, count in parts:
            transport = self.transport
            live = (transport is not None and transport.connected and not self.window.full
                    and (self.spool is None or not self.spool.pending()))
            if live:
                try:
                    self._send("live", part, count)
                    continue
                except (Refused, TransportError) as error:
                    self._transport_failed(error)  # the part was in flight: now in the spool
                    continue
            self._to_spool(part, count, live=True)

    def _to_spool(self, payload: bytes, steps: int, *, live: bool = False) -> bool:
        """Append to the spool; a drop is counted when that fails. `live=True` for records
        held in memory until now (they leave `pending`); False for steps already in the spool
        (a spooled batch written again, cut smaller)."""
        if live:
            self.ledger.settled(steps)
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
            if live:
                self.stats.spooled_total += steps
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
        seq = self.window.next_seq
        text = encode_message(seq, payload if payload else encode_payload(self.run), meta)
        size = len(text) if isinstance(text, bytes) or text.isascii() else len(text.encode("utf-8"))
        self.window.add(Inflight(kind, payload, steps, end, drops, size, time.monotonic()))
        self.transport.send(text)
        if kind in ("live", "spool"):
            self.stats.sent += steps

    def _frame_done(self, end: Position) -> None:
        """A spool frame that needs no ack (bad bytes, set aside, or written again cut smaller):
        acknowledged now, or in order after the frames in flight before it."""
        for seq, item in self.window.add_done(Inflight("spool", b"", 0, end)):
            self._resolved(seq, item)

    def _pump(self) -> None:
        transport = self.transport
        if transport is None or not transport.connected:
            return
        try:
            if self.meta is not None and not self._meta_acked and not self.window.has_kind("meta"):
                self._send("meta", b"", self._meta_version, meta=self.meta)
            drops = self.drops.unreported()
            if drops and not self.window.has_kind("events"):
                payload = encode_payload(self.run, events=[drop_event(max(self.last_step, 0), drops)])
                self._send("events", payload, 0, drops=drops)
            spool = self.spool
            if spool is None:
                return
            while not self.window.full and spool.pending():
                if self._cursor is None or self._cursor < spool.acked:
                    self._cursor = spool.acked
                frames = spool.read(self._cursor, self.window.room)
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
                            self._to_spool(part, count)
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
        return not len(self.buffer) and not self._open and not self.window and not spool_pending

    def _check_flushed(self) -> None:
        """The flush waiting is done when what it waits for is delivered or durable
        (agent/flushing.py); the spool was synced in this round before this check."""
        if self.ledger.due(waiting=len(self.buffer) + len(self._open), idle=self._idle(),
                           spool_is_destination=(self.transport is None or self.stats.refused is not None
                                                 or self.spool is None),
                           live_in_flight=self.window.has_kind("live"),
                           refused_since=self.link.gave_up_on(), now=time.monotonic()):
            self.ledger.finish()

    def _shutdown(self) -> None:
        if self.connector is not None:
            self.connector.shut()
        try:
            self.drops.fold()
            self._collect(force=True)
            if self.window:
                self._lost_connection()
            if self.transport is not None:
                self.transport.close()
            self.stats.connected = False
            if self.spool is not None:
                unreported = self.drops.unreported()
                if unreported and (self.spool.exists() or self.stats.refused):
                    self.spool.write_json("drops.json", unreported)
                if self.spool.exists():
                    self._write_meta_file()
                self.spool.close()
        except Exception:
            log.exception("gradwatch: error while shutting the sender down")
        finally:
            if self._idle():
                self.ledger.finish()
            else:
                with self._cond:
                    self._cond.notify_all()

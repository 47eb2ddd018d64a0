"""The sender thread: batches records, streams them, spools what cannot go now.

One background thread owns the WebSocket and the spool's read side
(OpenTelemetry's BatchSpanProcessor worker, with a transport that can be
away). Each loop it (1) starts a connection attempt when due (`link.Link`, the
connection's state machine; the attempt runs in a `Connector` helper thread, so
a server slow to answer never stops the draining), (2) reads acknowledgements
into the `InflightWindow`, (3) takes records from the buffer and closes a
columnar batch every `batch_steps` records, `max_batch_bytes` encoded bytes or
`batch_interval` seconds (`batching.Batcher`), (4) sends: live while connected
with nothing spooled, otherwise the batch is appended to the spool and the
spool is replayed in order (`routing.Router`), (5) fsyncs the spool at most
every 500 ms, and (6) settles the waiting flush (`flushing.FlushLedger`).
This module is the loop and the lifecycle; each part is unit-tested alone.

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

from .batching import Batcher
from .buffer import RecordBuffer
from .connection import Backoff, Connector
from .drops import DropLedger
from .encoding import DEFAULT_BATCH_BYTES, encode_batches, encode_chunk, layout_runs
from .flushing import FlushLedger, FlushRequest
from .link import FLUSH_RETRY, Link, LinkState
from .recorder import StepRecord
from .routing import Router
from .spool import Spool, SpoolBusy
from .stats import FlushResult, Stats
from .transport import Refused, Stalled, TransportError, WebSocketTransport
from .window import InflightWindow

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
        self.buffer = buffer
        self.transport = transport
        self.batch_steps = batch_steps
        self.batch_interval = batch_interval
        self.stats = Stats()
        self.ledger = FlushLedger()  # records taken and held; the flush waiting on them
        self._cond = self.ledger.cond  # (the counts in `stats` change under it too)
        self.last_step = -1
        self.window = InflightWindow(max_inflight)
        self.backoff = Backoff(backoff_base, backoff_cap)
        self.link = Link(self.backoff, offline=transport is None)  # when to connect (agent/link.py)
        self.connector = Connector(transport, self.buffer.wake.set) if transport is not None else None
        self.drops = DropLedger()
        self.router = Router(run, spool, transport, self.window, stats=self.stats, drops=self.drops,
                             ledger=self.ledger, max_batch_bytes=max_batch_bytes, count_drop=self.count_drop,
                             transport_failed=self._transport_failed, warn=self._warn_once)
        self.batcher = Batcher(run, buffer, self.ledger, batch_steps=batch_steps, batch_interval=batch_interval,
                               budget=lambda: self.router.max_batch_bytes, drop=self._count_held_drop,
                               warn=self._warn_once, complete=complete)
        self._suspects = 0  # connections lost without a close code, a message bigger than any acked in flight
        self._warned: set[str] = set()
        self._stop = threading.Event()
        self._stop_deadline = float("inf")
        self._thread: threading.Thread | None = None

    # -- called from the training thread -----------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="gradwatch-sender", daemon=True)
        self._thread.start()

    def set_meta(self, meta: dict) -> None:
        self.router.set_meta(meta)
        self.buffer.wake.set()

    # The routing part's state, as the sender's (agent/routing.py owns it).
    @property
    def spool(self) -> Spool | None:
        return self.router.spool

    @spool.setter
    def spool(self, spool: Spool | None) -> None:
        self.router.spool = spool

    @property
    def meta(self) -> dict | None:
        return self.router.meta

    @property
    def max_batch_bytes(self) -> int:
        return self.router.max_batch_bytes

    @max_batch_bytes.setter
    def max_batch_bytes(self, size: int) -> None:
        self.router.max_batch_bytes = int(size)

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
                and (self.router.meta_acked or self.meta is None) and not self.drops.unreported())

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
        self.router.pump(self.last_step)
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
            self.router.cursor = self.spool.acked if self.spool is not None else None
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
            self.router.message_too_big()
        self.router.lost_connection()
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
        self.router.lost_connection()
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
                    if self.router.on_message(message) == "ack":
                        self._suspects = 0
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
        if len(self.buffer) >= self.batch_steps or (hurry and (len(self.buffer) or self.batcher.open)):
            return 0.0
        if self.router.replay_ready():
            return 0.0  # the spool's replay can go on now
        if self._stop.is_set():
            return 0.02
        now = time.monotonic()
        waits = [0.1]
        if self.batcher.open:
            waits.append(self.batcher.open_since + self.batch_interval - now)
        elif len(self.buffer):
            waits.append(self.batch_interval)
        if self.link.state is LinkState.DOWN and not self.connector.busy:  # an attempt wakes us when done
            waits.append(self.link.next_attempt(flushing=self.ledger.request is not None) - now)
        return max(0.0, min(waits))

    # -- batching and sending ---------------------------------------------
    def _collect(self, force: bool) -> None:
        """Batches that close now (agent/batching.py) go live or to the spool."""
        for records in self.batcher.collect(force):
            self.last_step = records[-1].step
            if self.router.spool_full_and_offline():
                self._count_held_drop("spool_full", len(records))  # no need to encode what cannot be kept
                continue
            for chunk in layout_runs(records):
                for payload, steps in self.batcher.encode(chunk):
                    self.router.route(payload, steps)

    def _count_held_drop(self, reason: str, steps: int) -> None:
        self.ledger.settled(steps)
        self.count_drop(reason, steps)

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
        return not len(self.buffer) and not self.batcher.open and not self.window and not spool_pending

    def _check_flushed(self) -> None:
        """The flush waiting is done when what it waits for is delivered or durable
        (agent/flushing.py); the spool was synced in this round before this check."""
        if self.ledger.due(waiting=len(self.buffer) + len(self.batcher.open), idle=self._idle(),
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
                self.router.lost_connection()
            if self.transport is not None:
                self.transport.close()
            self.stats.connected = False
            if self.spool is not None:
                unreported = self.drops.unreported()
                if unreported and (self.spool.exists() or self.stats.refused):
                    self.spool.write_json("drops.json", unreported)
                if self.spool.exists():
                    self.router.write_meta_file()
                self.spool.close()
        except Exception:
            log.exception("gradwatch: error while shutting the sender down")
        finally:
            if self._idle():
                self.ledger.finish()
            else:
                with self._cond:
                    self._cond.notify_all()

"""Where batches go: live over the socket, or into the spool and replayed from it.

The sender's routing part: the in-flight window (`agent/window.py`), the spool's read
cursor, the frames never to send again, the run's metadata and drop reports, and what an
acknowledgement, a refusal or a lost connection does to each. The sender thread owns it;
it calls back `transport_failed(error)` for a send that failed (the connection's business)
and `warn(key, message)` to say something once. Unit-tested with a real spool and a fake
transport (tests/test_agent_sender_routing.py).

- `route(payload, steps)`: records just taken from the buffer go live when connected, the
  window has room and nothing older waits in the spool (order is kept); else to the spool.
- `pump(last_step)`: metadata, the drop report, then the spool's frames, while the window
  has room; a frame over the byte budget is written again cut smaller.
- `on_message(message)`: an ack or a 4xx refusal settles window items in order (`resolved`):
  counts move, the spool's acknowledged position moves forward.
- `lost_connection()`: live batches in flight go to the spool; spooled ones are read again.
- `message_too_big()`: a 1009 halves the byte budget below the culprit, or sets aside a
  single step (or the metadata) that cannot be cut.
"""
from __future__ import annotations

import time
from typing import Callable

from .drops import DropLedger
from .flushing import FlushLedger
from .spool import Position, Spool, SpoolBusy
from .stats import Stats
from .transport import Refused, TransportError, WebSocketTransport
from .wire import drop_event, encode_message, encode_payload, split_payload
from .window import Inflight, InflightWindow


class Router:
    def __init__(self, run: str, spool: Spool | None, transport: WebSocketTransport | None,
                 window: InflightWindow, *, stats: Stats, drops: DropLedger, ledger: FlushLedger,
                 max_batch_bytes: int, count_drop: Callable[[str, int], None],
                 transport_failed: Callable[[Exception], None], warn: Callable[[str, str], None]):
        self.run = run
        self.spool = spool  # None after a SpoolBusy: records are then dropped, counted
        self.transport = transport
        self.window = window
        self.stats = stats
        self.drops = drops
        self.ledger = ledger
        self._cond = ledger.cond
        self.max_batch_bytes = int(max_batch_bytes)  # shrinks when the server says 1009
        self.count_drop = count_drop
        self.transport_failed = transport_failed
        self.warn = warn
        self.meta: dict | None = None
        self.meta_acked = False
        self.meta_version = 0
        self.meta_spooled = -1
        self.rejected_seqs: set[int] = set()  # messages the server refused for good
        # Spool frames never to send again (set aside as too big, or written again cut smaller).
        self.skip_frames: set[Position] = set()
        self.cursor: Position | None = None  # the spool's next frame to send

    def set_meta(self, meta: dict) -> None:
        self.meta = meta
        self.meta_acked = False
        self.meta_version += 1

    def replay_ready(self) -> bool:
        """Connected, with room in the window and spooled frames not yet sent."""
        transport, spool = self.transport, self.spool
        return (transport is not None and transport.connected and not self.window.full and spool is not None
                and spool.pending() and (self.cursor is None or self.cursor < spool.end()))

    def message_too_big(self) -> None:
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
            self.warn("too-big", f"gradwatch: one step of run {self.run!r} is {item.size} bytes, over "
                                 f"the server's message limit (gradwatch serve --max-body); it is kept "
                                 f"in {where} and not retried")
            if self.spool is not None and item.payload:
                self.spool.reject(item.payload, item.steps)
            if item.kind == "spool" and item.end is not None:
                self.skip_frames.add(item.end)
            self.count_drop("too_big", item.steps)
        elif item.kind == "meta":
            self.warn("meta-too-big", f"gradwatch: the run metadata of {self.run!r} is {item.size} "
                                       f"bytes, over the server's message limit; it is not sent")
            self.meta_acked = True
        elif item.kind == "events" and item.drops:
            self.warn("events-too-big", "gradwatch: the drop report is over the server's message "
                                        "limit; it is not sent")
            self.drops.reported(item.drops)

    def on_message(self, message: dict) -> str | None:
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
                self.warn("conflicts", f"gradwatch: the server reported {conflicts} conflicting "
                                       f"step(s) in run {self.run!r} (same step, other values)")
            resolved = self.window.ack(seq)
        elif kind == "error":
            status = int(message.get("status", 0) or 0)
            if not 400 <= status < 500:
                raise TransportError(f"server error {status}: {message.get('detail')}")
            self.warn(f"error-{status}", f"gradwatch: the server refused a batch of run {self.run!r} "
                                         f"(HTTP {status}: {message.get('detail')}); it is kept in "
                                         f"{self.spool.directory if self.spool else 'no spool'}"
                                         f"/rejected.gws and not retried")
            if self.spool is not None and item.payload:
                self.spool.reject(item.payload, item.steps)
            self.rejected_seqs.add(seq)
            resolved = self.window.settle(seq)
        else:
            return
        for done_seq, done in resolved:
            self.resolved(done_seq, done)
        return kind

    def resolved(self, seq: int, item: Inflight) -> None:
        """An item leaves the window in order: count it, move the spool's position forward."""
        refused = seq in self.rejected_seqs
        self.rejected_seqs.discard(seq)
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
            self.meta_acked = self.meta_acked or item.steps == self.meta_version
        elif item.kind == "events" and item.drops:
            self.drops.reported(item.drops)

    def lost_connection(self) -> None:
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
                self.to_spool(item.payload, item.steps, live=True)
        self.rejected_seqs.clear()
        self.cursor = None

    def spool_full_and_offline(self) -> bool:
        return (self.spool is not None and self.spool.full
                and (self.transport is None or not self.transport.connected))

    def fits(self, payload: bytes) -> bool:
        return len(payload) + 64 <= self.max_batch_bytes  # 64: the message's own fields

    def route(self, payload: bytes, steps: int) -> None:
        """Records taken from the buffer (held in the ledger) go live or to the spool."""
        parts = [(payload, steps)] if self.fits(payload) else split_payload(payload, self.max_batch_bytes - 64)
        for part, count in parts:
            transport = self.transport
            live = (transport is not None and transport.connected and not self.window.full
                    and (self.spool is None or not self.spool.pending()))
            if live:
                try:
                    self.send("live", part, count)
                    continue
                except (Refused, TransportError) as error:
                    self.transport_failed(error)  # the part was in flight: now in the spool
                    continue
            self.to_spool(part, count, live=True)

    def to_spool(self, payload: bytes, steps: int, *, live: bool = False) -> bool:
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
            self.warn("busy", f"gradwatch: {error}; records are dropped")
            self.spool = None
            written = False
        except OSError as error:
            self.warn("spool-io", f"gradwatch: cannot write the spool: {error}; records are dropped")
            written = False
        if written:
            if live:
                self.stats.spooled_total += steps
            self.write_meta_file()
        else:
            reason = "spool_full" if self.spool is not None else "spool_unavailable"
            self.count_drop(reason, steps)
        return bool(written)

    def write_meta_file(self) -> None:
        if self.spool is not None and self.meta_spooled != self.meta_version and self.meta is not None:
            self.meta_spooled = self.meta_version
            self.spool.write_json("meta.json", {"run": self.run, "meta": self.meta})

    def send(self, kind: str, payload: bytes, steps: int, end: Position | None = None,
              meta: dict | None = None, drops: dict | None = None) -> None:
        seq = self.window.next_seq
        text = encode_message(seq, payload if payload else encode_payload(self.run), meta)
        size = len(text) if isinstance(text, bytes) or text.isascii() else len(text.encode("utf-8"))
        self.window.add(Inflight(kind, payload, steps, end, drops, size, time.monotonic()))
        self.transport.send(text)
        if kind in ("live", "spool"):
            self.stats.sent += steps

    def frame_done(self, end: Position) -> None:
        """A spool frame that needs no ack (bad bytes, set aside, or written again cut smaller):
        acknowledged now, or in order after the frames in flight before it."""
        for seq, item in self.window.add_done(Inflight("spool", b"", 0, end)):
            self.resolved(seq, item)

    def pump(self, last_step: int) -> None:
        transport = self.transport
        if transport is None or not transport.connected:
            return
        try:
            if self.meta is not None and not self.meta_acked and not self.window.has_kind("meta"):
                self.send("meta", b"", self.meta_version, meta=self.meta)
            drops = self.drops.unreported()
            if drops and not self.window.has_kind("events"):
                payload = encode_payload(self.run, events=[drop_event(max(last_step, 0), drops)])
                self.send("events", payload, 0, drops=drops)
            spool = self.spool
            if spool is None:
                return
            while not self.window.full and spool.pending():
                if self.cursor is None or self.cursor < spool.acked:
                    self.cursor = spool.acked
                frames = spool.read(self.cursor, self.window.room)
                if not frames:
                    break
                for frame in frames:
                    self.cursor = frame.end
                    if not frame.payload or frame.end in self.skip_frames:
                        self.frame_done(frame.end)  # bad bytes, or a step set aside as too big
                    elif self.fits(frame.payload) or frame.steps <= 1:
                        self.send("spool", frame.payload, frame.steps, end=frame.end)
                    else:
                        # Over the byte budget: write it again cut smaller, at the spool's end.
                        for part, count in split_payload(frame.payload, self.max_batch_bytes - 64):
                            self.to_spool(part, count)
                        self.skip_frames.add(frame.end)
                        self.frame_done(frame.end)
                if self.cursor >= spool.end():
                    break
        except (Refused, TransportError) as error:
            self.transport_failed(error)

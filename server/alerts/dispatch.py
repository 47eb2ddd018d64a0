"""Alerts: webhook posts on non-finite steps, spikes, level shifts and sustained clipping.

Ingest hands each stored batch to :meth:`AlertDispatcher.submit`, which only
puts a small summary on a bounded queue and returns: the decision and the rate
limit happen on the dispatcher's own thread, which hands each alert to every
webhook's own worker (:class:`WebhookWorker`: one thread, one bounded queue).
Each post has a deadline for the whole of it (connect, send, answer), and a
failed post is retried after a backoff delay while the alerts behind it are
posted. So a slow or dead webhook never slows ingest, the decisions, or the
other webhooks; whatever a full queue drops is counted and logged.

Rules (:class:`AlertRules`):

- ``nonfinite``, ``spike``, ``level_shift``: the first such step of a batch;
- ``clipping``: more than ``clip_rate`` of the run's last ``window`` steps
  were clipped (off unless ``clip_rate`` is set).

Each (run, kind) alerts at most once per ``min_interval`` seconds; what the
limit held back is counted and said in the next alert of that kind. The
limit is decided by a ``claim(run, kind, now, min_interval) -> bool``
callable: the default keeps the times in this process; the server passes one
backed by the database so several workers or servers send each alert once.
Every alert that is sent is also handed to ``record`` (the server stores it
as an ``alert`` event, shown on the dashboard).

The body is Slack-compatible (``text``) and carries the fields a tool needs:
``run``, ``step``, ``kind``, ``value``, ``threshold``, ``suppressed``.
"""
from __future__ import annotations

import heapq
import http.client
import json
import logging
import queue
import socket
import threading
import time
import urllib.error
import urllib.parse
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

log = logging.getLogger("gradwatch.server.alerts")

ALERT_KINDS = ("nonfinite", "spike", "level_shift", "clipping")
QUEUE_SIZE = 1024          # stored batches waiting to be checked
WEBHOOK_QUEUE_SIZE = 256   # alerts waiting for one webhook (retries included)
POST_TIMEOUT = 5.0         # seconds for a whole post: connect, send, status line and headers


@dataclass(frozen=True)
class AlertRules:
    """When to alert; ``clip_rate=None`` turns the sustained-clipping rule off."""

    clip_rate: float | None = None
    window: int = 100
    min_interval: float = 300.0

    def __post_init__(self) -> None:
        if self.clip_rate is not None and not 0.0 <= self.clip_rate < 1.0:
            raise ValueError(f"alert clip rate must be in [0, 1), got {self.clip_rate}")
        if self.window < 1:
            raise ValueError(f"alert window must be at least 1 step, got {self.window}")
        if self.min_interval < 0:
            raise ValueError(f"alert min interval must be >= 0 seconds, got {self.min_interval}")


@dataclass(frozen=True)
class Alert:
    """One alert about one run: what a webhook receives, and what is stored as an event."""

    run: str
    kind: str
    step: int | None
    value: float | None
    threshold: float | None
    message: str
    suppressed: int = 0

    def body(self) -> dict:
        text = f"gradwatch: run {self.run!r}: {self.message}"
        if self.suppressed:
            text += f" ({self.suppressed} more {self.kind} alert(s) held back since the last one)"
        return {"text": text, "run": self.run, "kind": self.kind, "step": self.step,
                "value": _json_number(self.value), "threshold": _json_number(self.threshold),
                "suppressed": self.suppressed}


def _json_number(value: float | None) -> float | str | None:
    if value is None or np.isfinite(value):
        return value
    return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")


def _first(steps: np.ndarray, flags: np.ndarray | None) -> int | None:
    """Index of the first true flag (None when there is none or no column)."""
    if flags is None or not len(flags):
        return None
    hits = np.flatnonzero(np.asarray(flags, dtype=bool))
    return int(hits[0]) if hits.size else None


@dataclass
class ClipHistory:
    """The last ``window`` clipped flags of one run, for the sustained-clipping rule."""

    window: int
    flags: deque = field(default_factory=deque)
    clipped: int = 0

    def extend(self, values: Iterable[bool]) -> None:
        for value in values:
            value = bool(value)
            self.flags.append(value)
            self.clipped += value
            if len(self.flags) > self.window:
                self.clipped -= self.flags.popleft()

    def rate(self) -> float | None:
        """The clip rate of a full window, None until the window is full."""
        return self.clipped / self.window if len(self.flags) == self.window else None


def batch_alerts(run: str, columns: Mapping[str, np.ndarray], rules: AlertRules,
                 history: ClipHistory | None) -> list[Alert]:
    """The alerts one stored batch raises (before the rate limit).

    ``columns`` holds ``step`` and ``pre_norm`` and whichever of ``nonfinite``,
    ``spike``, ``level_shift``, ``clipped``, ``threshold`` the batch had.
    """
    steps = np.asarray(columns["step"])
    norms = np.asarray(columns["pre_norm"], dtype=np.float64)
    nonfinite = ~np.isfinite(norms)  # the norm itself, or the agent's flag (as ingest counts them)
    if columns.get("nonfinite") is not None:
        nonfinite |= np.asarray(columns["nonfinite"], dtype=bool)
    alerts: list[Alert] = []
    index = _first(steps, nonfinite)
    if index is not None:
        alerts.append(Alert(run, "nonfinite", int(steps[index]), float(norms[index]), None,
                            f"non-finite gradient norm ({norms[index]}) at step {int(steps[index]):,}"))
    spike = columns.get("spike")
    index = None if spike is None else _first(steps, np.asarray(spike, dtype=bool) & np.isfinite(norms))
    if index is not None:
        alerts.append(Alert(run, "spike", int(steps[index]), float(norms[index]), None,
                            f"gradient spike at step {int(steps[index]):,} (norm {norms[index]:.4g})"))
    index = _first(steps, columns.get("level_shift"))
    if index is not None:
        alerts.append(Alert(run, "level_shift", int(steps[index]), float(norms[index]), None,
                            f"the gradient norm moved to a new level at step {int(steps[index]):,} "
                            f"(norm {norms[index]:.4g})"))
    clipped = columns.get("clipped")
    if rules.clip_rate is not None and history is not None and clipped is not None and len(steps):
        history.extend(clipped)
        rate = history.rate()
        if rate is not None and rate > rules.clip_rate:
            alerts.append(Alert(run, "clipping", int(steps[-1]), rate, rules.clip_rate,
                                f"{rate:.1%} of the last {rules.window:,} steps were clipped "
                                f"(alert above {rules.clip_rate:.1%}) at step {int(steps[-1]):,}"))
    return alerts


class MemoryClaims:
    """The default rate limit: last alert time per (run, kind), in this process."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], float] = {}

    def __call__(self, run: str, kind: str, now: float, min_interval: float) -> bool:
        last = self._last.get((run, kind))
        if last is not None and now - last < min_interval:
            return False
        self._last[(run, kind)] = now
        return True


class DatabaseClaims:
    """The rate limit kept in the database (table `alert_claims`), shared by every worker
    and server on it: a conditional UPDATE, else an INSERT that does nothing on conflict,
    in one transaction. Under PostgreSQL's row lock (or SQLite's write lock) a second
    claimant sees the new time and gets False, so each alert is sent once."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def __call__(self, run: str, kind: str, now: float, min_interval: float) -> bool:
        from sqlalchemy import text

        with self.engine.begin() as connection:
            moved = connection.execute(text(
                "UPDATE alert_claims SET last_sent = :now "
                "WHERE run = :run AND kind = :kind AND last_sent <= :cutoff"),
                {"now": now, "run": run, "kind": kind, "cutoff": now - min_interval}).rowcount
            if moved:
                return True
            added = connection.execute(text(
                "INSERT INTO alert_claims (run, kind, last_sent) VALUES (:run, :kind, :now) "
                "ON CONFLICT (run, kind) DO NOTHING"), {"now": now, "run": run, "kind": kind}).rowcount
            return added == 1


Claim = Callable[[str, str, float, float], bool]


class PostTimeout(TimeoutError):
    """A webhook post that did not finish (connect, send, answer) within its deadline."""


def post_json(url: str, body: dict, timeout: float = POST_TIMEOUT) -> None:
    """POST ``body`` as JSON; raises on a network error, a non-2xx answer, or when the whole
    post (connect, send, status line and headers) takes longer than ``timeout`` seconds.

    A socket timeout bounds each read, not the post: a receiver sending a byte every
    2 s would hold it forever. A timer shuts the socket down at the deadline instead."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"webhook URL must be http(s)://host/..., got {url!r}")
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = kind(parts.hostname, parts.port, timeout=timeout)
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        sock = connection.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    timer = threading.Timer(timeout, expire)
    timer.daemon = True
    timer.start()
    try:
        connection.connect()       # bounded by the socket timeout; the timer may fire meanwhile
        if expired.is_set():
            raise PostTimeout(f"webhook post took longer than {timeout:g} s")
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        connection.request("POST", path, body=json.dumps(body).encode(),
                           headers={"Content-Type": "application/json", "User-Agent": "gradwatch-alerts"})
        status = connection.getresponse().status   # the answer's body is not read
    except (OSError, http.client.HTTPException) as error:
        if expired.is_set():
            raise PostTimeout(f"webhook post took longer than {timeout:g} s") from error
        raise
    finally:
        timer.cancel()
        connection.close()
    if not 200 <= status < 300:
        raise urllib.error.HTTPError(url, status, "webhook refused", None, None)


@dataclass
class AlertCounters:
    """What the dispatcher did, for tests and `/healthz`-style reporting: alerts `sent`,
    `failed` (every try failed), `suppressed` (rate limit), batches `dropped` unchecked (the
    dispatcher's queue was full) and `dropped_alerts` (a webhook's queue was full)."""

    sent: int = 0
    failed: int = 0
    suppressed: int = 0
    dropped: int = 0
    dropped_alerts: int = 0


class WebhookWorker:
    """One webhook's queue and thread: posts each alert with a deadline; a failed post is
    tried again after its backoff delay while the alerts behind it go on being posted.
    A full queue (alerts waiting plus retries) drops the new alert, counted and logged."""

    def __init__(self, url: str, post: Callable[[str, dict], None], retry_delays: Sequence[float],
                 counters: AlertCounters, counters_lock: threading.Lock, queue_size: int = WEBHOOK_QUEUE_SIZE):
        self.url = url
        self.post = post
        self.retry_delays = tuple(retry_delays)
        self.counters = counters
        self._counters_lock = counters_lock
        self.queue_size = queue_size
        self._fresh: deque[tuple[dict, int]] = deque()          # (body, tries so far)
        self._retries: list[tuple[float, int, dict, int]] = []  # heap of (due, order, body, tries)
        self._order = 0
        self._posting = False
        self._stopping = False
        self._dropped = 0
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="gradwatch-webhook", daemon=True)
        self._thread.start()

    def put(self, body: dict) -> bool:
        """Queue one alert body; False (counted, logged) when the queue is full."""
        with self._changed:
            if self._stopping:
                return False
            if len(self._fresh) + len(self._retries) < self.queue_size:
                self._fresh.append((body, 0))
                self._changed.notify_all()
                return True
            self._dropped += 1
            dropped = self._dropped
        with self._counters_lock:
            self.counters.dropped_alerts += 1
        if dropped == 1 or dropped % 100 == 0:
            log.warning("alert webhook %s: queue full (%d waiting), %d alert(s) dropped so far",
                        self.url, self.queue_size, dropped)
        return False

    def _next(self) -> tuple[dict, int] | None:
        """The next alert to post (a due retry first), waiting for one; None when stopping."""
        with self._changed:
            while not self._stopping:
                now = time.monotonic()
                if self._retries and self._retries[0][0] <= now:
                    _, _, body, tries = heapq.heappop(self._retries)
                elif self._fresh:
                    body, tries = self._fresh.popleft()
                else:
                    self._changed.wait(self._retries[0][0] - now if self._retries else None)
                    continue
                self._posting = True
                return body, tries
            return None

    def _run(self) -> None:
        while (item := self._next()) is not None:
            body, tries = item
            try:
                self.post(self.url, body)
                with self._counters_lock:
                    self.counters.sent += 1
            except Exception as error:   # network, deadline, non-2xx: retried after its delay
                tries += 1
                log.warning("alert webhook %s failed (attempt %d): %s", self.url, tries, error)
                if tries <= len(self.retry_delays):
                    with self._changed:
                        self._order += 1
                        due = time.monotonic() + self.retry_delays[tries - 1]
                        heapq.heappush(self._retries, (due, self._order, body, tries))
                else:
                    with self._counters_lock:
                        self.counters.failed += 1
            finally:
                with self._changed:
                    self._posting = False
                    self._changed.notify_all()

    def wait_idle(self, deadline: float) -> bool:
        """Until nothing is queued, retried or posting (or `deadline`, monotonic, passes)."""
        with self._changed:
            while self._fresh or self._retries or self._posting:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True

    def stop(self, timeout: float) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        self._thread.join(timeout)


class AlertDispatcher:
    """Decides alerts on its own thread and hands each to every webhook's own worker
    (`WebhookWorker`): ``submit`` never blocks, and a slow or dead webhook holds up
    neither ingest, nor the decisions, nor the other webhooks."""

    def __init__(self, webhooks: Sequence[str], rules: AlertRules,
                 record: Callable[[Alert], None] | None = None, claim: Claim | None = None,
                 clock: Callable[[], float] = time.time, post: Callable[[str, dict], None] = post_json,
                 retry_delays: Sequence[float] = (1.0, 4.0, 15.0), webhook_queue_size: int = WEBHOOK_QUEUE_SIZE):
        self.webhooks = list(webhooks)
        self.rules = rules
        self.record = record
        self.claim = claim or MemoryClaims()
        self.clock = clock
        self.counters = AlertCounters()
        self._counters_lock = threading.Lock()
        self.workers = [WebhookWorker(url, post, retry_delays, self.counters, self._counters_lock,
                                      webhook_queue_size) for url in self.webhooks]
        self._held_back: dict[tuple[str, str], int] = {}
        self._history: dict[str, ClipHistory] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_SIZE)
        self._idle = threading.Condition()
        self._busy = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="gradwatch-alerts", daemon=True)
        self._thread.start()

    # -- ingest side ---------------------------------------------------------
    def submit(self, run: str, columns: Mapping[str, np.ndarray]) -> None:
        """Hand over one stored batch (only its new steps); returns at once."""
        if self._stopping:
            return
        with self._idle:
            self._busy += 1
        try:
            self._queue.put_nowait((run, dict(columns)))
        except queue.Full:
            with self._idle:
                self._busy -= 1
            with self._counters_lock:
                self.counters.dropped += 1
                dropped = self.counters.dropped
            if dropped == 1 or dropped % 1000 == 0:  # not every batch: a flood would flood the log
                log.warning("alert queue full: batches of run %r go unchecked (%d so far); "
                            "counted in the dispatcher's `dropped`", run, dropped)

    # -- decision thread -----------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._handle(*item)
            except Exception:  # an alert bug must not kill the thread
                log.exception("alert dispatch failed")
            finally:
                with self._idle:
                    self._busy -= 1
                    self._idle.notify_all()

    def _handle(self, run: str, columns: dict) -> None:
        history = None
        if self.rules.clip_rate is not None:
            history = self._history.setdefault(run, ClipHistory(self.rules.window))
        for alert in batch_alerts(run, columns, self.rules, history):
            key = (run, alert.kind)
            if not self.claim(run, alert.kind, self.clock(), self.rules.min_interval):
                self._held_back[key] = self._held_back.get(key, 0) + 1
                with self._counters_lock:
                    self.counters.suppressed += 1
                continue
            alert = Alert(**{**alert.__dict__, "suppressed": self._held_back.pop(key, 0)})
            self._deliver(alert)

    def _deliver(self, alert: Alert) -> None:
        if self.record is not None:
            try:
                self.record(alert)
            except Exception:
                log.exception("could not store the alert event for run %r", alert.run)
        body = alert.body()
        for worker in self.workers:
            worker.put(body)

    # -- lifecycle -----------------------------------------------------------
    def wait_decided(self, timeout: float) -> bool:
        """Block until every submitted batch is decided (its alerts queued or dropped)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def wait_idle(self, timeout: float) -> bool:
        """Block until every submitted batch is decided and every alert posted or given up
        (retries included): tests, shutdown."""
        deadline = time.monotonic() + timeout
        return self.wait_decided(timeout) and all(worker.wait_idle(deadline) for worker in self.workers)

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking batches, give pending ones ``timeout`` seconds, then stop (alerts
        still queued or waiting for a retry then are given up; a post in flight ends by its
        own deadline, on a daemon thread)."""
        deadline = time.monotonic() + timeout
        self.wait_idle(timeout)
        with self._idle:
            self._stopping = True
            self._idle.notify_all()
        while True:  # make room for the stop mark: batches still queued now are given up
            try:
                self._queue.put_nowait(None)
                break
            except queue.Full:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
        self._thread.join(max(0.0, deadline - time.monotonic()))
        for worker in self.workers:
            worker.stop(max(0.0, deadline - time.monotonic()))

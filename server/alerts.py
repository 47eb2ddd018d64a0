"""Alerts: webhook posts on non-finite steps, spikes, level shifts and sustained clipping.

Ingest hands each stored batch to :meth:`AlertDispatcher.submit`, which only
puts a small summary on a bounded queue and returns: the decision, the rate
limit and the HTTP posts happen on the dispatcher's own thread, so a slow or
dead webhook never slows ingest (a full queue drops the summary and counts it).

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

import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

log = logging.getLogger("gradwatch.server.alerts")

ALERT_KINDS = ("nonfinite", "spike", "level_shift", "clipping")
QUEUE_SIZE = 1024
POST_TIMEOUT = 5.0
RETRIES = 3


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


def post_json(url: str, body: dict, timeout: float = POST_TIMEOUT) -> None:
    """POST ``body`` as JSON; raises on a network error or a non-2xx answer."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "User-Agent": "gradwatch-alerts"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if not 200 <= response.status < 300:
            raise urllib.error.HTTPError(url, response.status, "webhook refused", response.headers, None)


@dataclass
class AlertCounters:
    """What the dispatcher did, for tests and `/healthz`-style reporting."""

    sent: int = 0
    failed: int = 0
    suppressed: int = 0
    dropped: int = 0


class AlertDispatcher:
    """Decides and posts alerts on its own thread; ``submit`` never blocks."""

    def __init__(self, webhooks: Sequence[str], rules: AlertRules,
                 record: Callable[[Alert], None] | None = None, claim: Claim | None = None,
                 clock: Callable[[], float] = time.time, post: Callable[[str, dict], None] = post_json,
                 retry_delays: Sequence[float] = (1.0, 4.0, 15.0)):
        self.webhooks = list(webhooks)
        self.rules = rules
        self.record = record
        self.claim = claim or MemoryClaims()
        self.clock = clock
        self.post = post
        self.retry_delays = tuple(retry_delays)
        self.counters = AlertCounters()
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
                self.counters.dropped += 1
                first = self.counters.dropped == 1
            if first:  # once: a stuck webhook would otherwise log every batch
                log.warning("alert queue full (webhook too slow?): batches of run %r go unchecked; "
                            "counted in the dispatcher's `dropped`", run)

    # -- dispatcher thread ---------------------------------------------------
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
                self.counters.suppressed += 1
                continue
            alert = Alert(**{**alert.__dict__, "suppressed": self._held_back.pop(key, 0)})
            self._deliver(alert)

    def _deliver(self, alert: Alert) -> None:
        body = alert.body()
        if self.record is not None:
            try:
                self.record(alert)
            except Exception:
                log.exception("could not store the alert event for run %r", alert.run)
        for url in self.webhooks:
            for attempt, delay in enumerate((0.0, *self.retry_delays)):
                if delay and self._sleep(delay):
                    return
                try:
                    self.post(url, body)
                    self.counters.sent += 1
                    break
                except Exception as error:  # network, timeout, non-2xx: retried
                    log.warning("alert webhook %s failed (attempt %d): %s", url, attempt + 1, error)
            else:
                self.counters.failed += 1

    def _sleep(self, seconds: float) -> bool:
        """Wait between retries; True when the dispatcher is closing (stop retrying)."""
        deadline = time.monotonic() + seconds
        with self._idle:
            while not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    # -- lifecycle -----------------------------------------------------------
    def wait_idle(self, timeout: float) -> bool:
        """Block until every submitted batch is handled (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking batches, give pending ones ``timeout`` seconds, then stop."""
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
        self._thread.join(timeout)

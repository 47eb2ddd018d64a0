"""Alert rules and the webhook dispatcher, against a real local HTTP receiver."""
from __future__ import annotations

import http.server
import json
import socket
import threading

import numpy as np
import pytest

from gradwatch.server.alerts.dispatch import (Alert, AlertDispatcher, AlertRules, ClipHistory, MemoryClaims,
                                              PostTimeout, batch_alerts, post_json)


class Receiver:
    """A webhook receiver on 127.0.0.1: records bodies; `hang` holds requests until released;
    `status` is a number or a function of the body."""

    def __init__(self, status=200, hang: bool = False):
        self.bodies: list[dict] = []
        self.received = threading.Event()
        self.release = threading.Event()
        self.in_flight = 0  # requests the receiver holds right now (hang=True)
        self.changed = threading.Condition()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.changed:
                    outer.bodies.append(body)
                    outer.changed.notify_all()
                outer.received.set()
                if hang:
                    outer.in_flight += 1
                    outer.release.wait(60)
                    outer.in_flight -= 1
                self.send_response(status(body) if callable(status) else status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout: float) -> bool:
        """Until `count` bodies arrived (False after `timeout` seconds)."""
        with self.changed:
            return self.changed.wait_for(lambda: len(self.bodies) >= count, timeout)

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


class TrickleReceiver:
    """A webhook receiver that reads each request, then answers one byte every `every`
    seconds, forever: every read of the client finishes well within a socket timeout, so
    only a deadline for the whole post ends it. Counts the connections the client cut."""

    def __init__(self, every: float = 2.0):
        self.every = every
        self.accepted = 0
        self.cut = 0            # connections closed by the client while it trickled
        self.changed = threading.Condition()
        self._stop = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/slow"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._stop.is_set():
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            with self.changed:
                self.accepted += 1
                self.changed.notify_all()
            threading.Thread(target=self._trickle, args=(connection,), daemon=True).start()

    def _trickle(self, connection: socket.socket):
        with connection:
            connection.recv(65536)                       # the request (small)
            for byte in b"HTTP/1.1 200 OK\r\n" * 1000:
                try:
                    connection.sendall(bytes([byte]))
                except OSError:
                    break
                if self._stop.wait(self.every):
                    return
            with self.changed:
                self.cut += 1
                self.changed.notify_all()

    def wait_for_cut(self, count: int, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.cut >= count, timeout)

    def close(self):
        self._stop.set()
        self.listener.close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def columns(steps, norms, **flags):
    out = {"step": np.asarray(steps), "pre_norm": np.asarray(norms, dtype=np.float64)}
    out.update({k: np.asarray(v, dtype=bool) for k, v in flags.items()})
    return out


def test_batch_alerts_names_the_first_step_of_each_kind():
    batch = columns([10, 11, 12, 13], [1.0, float("nan"), 50.0, float("inf")],
                    spike=[False, True, True, True], level_shift=[False, False, False, True])
    alerts = batch_alerts("r", batch, AlertRules(), None)
    assert [(a.kind, a.step) for a in alerts] == [("nonfinite", 11), ("spike", 12), ("level_shift", 13)]
    assert np.isnan(alerts[0].value) and alerts[1].value == 50.0


def test_sustained_clipping_needs_a_full_window_above_the_rate():
    rules = AlertRules(clip_rate=0.5, window=4)
    history = ClipHistory(4)
    first = batch_alerts("r", columns([0, 1, 2], [1, 1, 1], clipped=[1, 1, 1]), rules, history)
    assert first == []  # 3 of 4 steps seen: the window is not full yet
    second = batch_alerts("r", columns([3], [1], clipped=[0]), rules, history)
    assert [(a.kind, a.step, a.value) for a in second] == [("clipping", 3, 0.75)]
    third = batch_alerts("r", columns([4, 5], [1, 1], clipped=[0, 0]), rules, history)
    assert third == []  # flags [1, 0, 0, 0] -> 25 %


def test_bad_rules_are_refused_with_a_message():
    with pytest.raises(ValueError, match="clip rate"):
        AlertRules(clip_rate=1.5)
    with pytest.raises(ValueError, match="window"):
        AlertRules(window=0)


def test_memory_claims_rate_limit_per_run_and_kind():
    claim = MemoryClaims()
    assert claim("a", "spike", 0.0, 60.0)
    assert not claim("a", "spike", 59.0, 60.0)
    assert claim("a", "nonfinite", 59.0, 60.0)
    assert claim("b", "spike", 59.0, 60.0)
    assert claim("a", "spike", 60.0, 60.0)


def test_alerts_reach_the_webhook_rate_limited_with_the_held_back_count(receiver):
    now = [1000.0]
    stored: list[Alert] = []
    dispatcher = AlertDispatcher([receiver.url], AlertRules(min_interval=300), record=stored.append,
                                 clock=lambda: now[0])
    try:
        for step in range(3):  # three spikes within the interval: one alert, two held back
            dispatcher.submit("run-1", columns([step], [9.0], spike=[True]))
        assert dispatcher.wait_idle(10)
        now[0] += 301
        dispatcher.submit("run-1", columns([7], [8.0], spike=[True]))
        assert dispatcher.wait_idle(10)
    finally:
        dispatcher.close()
    assert [(b["kind"], b["step"], b["suppressed"]) for b in receiver.bodies] == [("spike", 0, 0), ("spike", 7, 2)]
    first = receiver.bodies[0]
    assert first["run"] == "run-1" and first["value"] == 9.0 and "step 0" in first["text"]
    assert [a.step for a in stored] == [0, 7]
    assert dispatcher.counters.sent == 2 and dispatcher.counters.suppressed == 2


def test_nan_values_are_sent_as_strings(receiver):
    dispatcher = AlertDispatcher([receiver.url], AlertRules())
    try:
        dispatcher.submit("r", columns([5], [float("nan")]))
        assert dispatcher.wait_idle(10)
    finally:
        dispatcher.close()
    assert receiver.bodies[0]["kind"] == "nonfinite" and receiver.bodies[0]["value"] == "NaN"


def test_a_failing_webhook_is_retried_then_counted():
    failing = Receiver(status=500)
    try:
        dispatcher = AlertDispatcher([failing.url], AlertRules(), retry_delays=(0.01, 0.01))
        dispatcher.submit("r", columns([1], [float("inf")]))
        assert dispatcher.wait_idle(20)
        dispatcher.close()
    finally:
        failing.close()
    assert len(failing.bodies) == 3  # one try and two retries
    assert dispatcher.counters.failed == 1 and dispatcher.counters.sent == 0


def test_a_hanging_webhook_never_blocks_submit_and_its_full_queue_drops_alerts_counted():
    hanging = Receiver(hang=True)
    try:
        dispatcher = AlertDispatcher([hanging.url], AlertRules(min_interval=0),
                                     post=lambda url, body: post_json(url, body, timeout=60),
                                     retry_delays=(), webhook_queue_size=5)
        dispatcher.submit("r", columns([0], [float("nan")]))
        assert hanging.received.wait(10)  # the webhook's worker is now stuck in the POST
        for step in range(1, 21):  # the ingest side and the decisions keep going while it is stuck
            dispatcher.submit("r", columns([step], [float("nan")]))
        assert dispatcher.wait_decided(30)
        assert dispatcher.counters.dropped == 0             # every batch was checked
        assert dispatcher.counters.dropped_alerts == 20 - 5  # five wait for the webhook, the rest dropped
        hanging.release.set()
        dispatcher.close(timeout=0.1)
    finally:
        hanging.close()


def test_a_post_has_one_deadline_for_the_whole_of_it():
    """A receiver that answers a byte every 0.2 s never trips a per-read timeout of 1 s;
    the whole-post deadline ends the post and closes the connection."""
    trickle = TrickleReceiver(every=0.2)
    try:
        with pytest.raises(PostTimeout, match="longer than 1 s"):
            post_json(trickle.url, {"text": "x"}, timeout=1.0)
        assert trickle.wait_for_cut(1, 30)   # the receiver saw its connection closed
    finally:
        trickle.close()


def test_a_slow_webhook_does_not_hold_up_a_healthy_one():
    trickle, healthy = TrickleReceiver(every=0.2), Receiver()
    try:
        dispatcher = AlertDispatcher([trickle.url, healthy.url], AlertRules(min_interval=0),
                                     post=lambda url, body: post_json(url, body, timeout=1.0), retry_delays=())
        for step in range(10):
            dispatcher.submit("r", columns([step], [float("nan")]))
        assert healthy.wait_for(10, 30)
        assert [body["step"] for body in healthy.bodies] == list(range(10))
        dispatcher.close(timeout=0.1)
    finally:
        trickle.close()
        healthy.close()


def test_a_retry_waits_its_delay_while_the_alerts_behind_it_are_posted():
    """The first alert fails and is due again in 60 s; the two after it are posted at once
    (before: the retry's sleep held every alert behind it)."""
    receiver = Receiver(status=lambda body: 500 if body["run"] == "first" else 200)
    try:
        dispatcher = AlertDispatcher([receiver.url], AlertRules(), retry_delays=(60.0,))
        for run in ("first", "second", "third"):
            dispatcher.submit(run, columns([1], [float("nan")]))
        assert receiver.wait_for(3, 30)
        assert [body["run"] for body in receiver.bodies] == ["first", "second", "third"]
        assert dispatcher.counters.failed == 0   # its retry is still pending
        dispatcher.close(timeout=0.1)
    finally:
        receiver.close()

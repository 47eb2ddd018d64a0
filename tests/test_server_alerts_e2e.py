"""Alerts through a real `gradwatch serve` process and a local webhook receiver."""
from __future__ import annotations

import httpx
import numpy as np
import pytest

from gradwatch.server.commands.cli import build_parser, settings_from_args
from gradwatch.server.app.settings import Settings
from tests.test_server_alerts import Receiver, TrickleReceiver
from tests.test_server_support import make_batch, post, start_server


def test_flags_and_variable_configure_alerts(monkeypatch):
    monkeypatch.setenv("GRADWATCH_ALERT_WEBHOOK", "http://a/hook, http://b/hook")
    assert Settings().alert_webhook == ["http://a/hook", "http://b/hook"]
    args = build_parser().parse_args(["serve", "--alert-webhook", "http://c/1", "--alert-webhook", "http://c/2",
                                      "--alert-clip-rate", "0.25", "--alert-window", "50",
                                      "--alert-min-interval", "12.5"])
    settings = settings_from_args(args)
    assert settings.alert_webhook == ["http://c/1", "http://c/2"]  # flags win over the variable
    assert (settings.alert_clip_rate, settings.alert_window, settings.alert_min_interval) == (0.25, 50, 12.5)
    monkeypatch.delenv("GRADWATCH_ALERT_WEBHOOK")
    assert Settings().alert_min_interval == 300.0 and Settings().alert_webhook == []


def alert_server(tmp_path, receiver: Receiver):
    return start_server(f"sqlite:///{tmp_path / 'alerts.db'}", tmp_path,
                        extra_args=["--alert-webhook", receiver.url])


def test_a_nan_step_posts_one_alert_and_stores_it_as_an_event(tmp_path):
    receiver = Receiver()
    server = alert_server(tmp_path, receiver)
    try:
        rng = np.random.default_rng(0)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            first = make_batch(np.arange(0, 10), rng)
            first["pre_norm"][3] = "NaN"
            assert post(client, "r1", first).json()["accepted"] == 10
            assert receiver.received.wait(30)
            # Second batch: another NaN (held back by the 300 s limit) and a spike (sent). The
            # dispatcher handles batches in order, so once the spike arrives the NaN was decided.
            receiver.received.clear()
            second = make_batch(np.arange(10, 20), rng, spike_steps=[15])
            second["pre_norm"][1] = "NaN"
            assert post(client, "r1", second).json()["accepted"] == 10
            assert receiver.received.wait(30)
            bodies = receiver.bodies
            assert [(b["run"], b["kind"], b["step"]) for b in bodies] == [("r1", "nonfinite", 3), ("r1", "spike", 15)]
            assert bodies[0]["value"] == "NaN" and "step 3" in bodies[0]["text"] and "r1" in bodies[0]["text"]
            events = client.get("/api/runs/r1/events", params={"kind": "alert"}).json()
            assert sorted((e["step"], e["detail"]["kind"]) for e in events) == [(3, "nonfinite"), (15, "spike")]
    finally:
        server.stop()
        receiver.close()


def test_a_hanging_webhook_does_not_hold_up_ingest(tmp_path):
    receiver = Receiver(hang=True)
    server = alert_server(tmp_path, receiver)
    try:
        rng = np.random.default_rng(1)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            batch = make_batch(np.arange(0, 5), rng)
            batch["pre_norm"][0] = "NaN"
            assert post(client, "hang", batch).status_code == 200
            assert receiver.received.wait(30)  # the dispatcher is now stuck in the receiver
            for first in range(5, 205, 10):
                batch = make_batch(np.arange(first, first + 10), rng, nonfinite_every=3)
                answer = post(client, "hang", batch)
                assert answer.status_code == 200 and answer.json()["accepted"] == 10
            assert receiver.in_flight == 1  # every batch above was acked while the webhook hung
            assert client.get("/api/runs").json()[0]["steps"] == 205
    finally:
        receiver.release.set()
        server.stop()
        receiver.close()


@pytest.mark.slow
def test_a_webhook_trickling_a_byte_every_2_s_does_not_stop_a_healthy_one(tmp_path):
    """The issue's probe: with the old per-read timeout the single alert thread was held by
    such a receiver for good and a second webhook got nothing. Now each webhook has its own
    worker, and each post a whole-post deadline that cuts the trickle."""
    trickle, healthy = TrickleReceiver(every=2.0), Receiver()
    server = start_server(f"sqlite:///{tmp_path / 'alerts.db'}", tmp_path,
                          extra_args=["--alert-webhook", trickle.url, "--alert-webhook", healthy.url,
                                      "--alert-min-interval", "0"])
    try:
        rng = np.random.default_rng(3)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for index in range(6):
                batch = make_batch(np.arange(index * 10, index * 10 + 10), rng)
                batch["pre_norm"][4] = "NaN"
                assert post(client, "trickled", batch).status_code == 200
        assert healthy.wait_for(6, 30)
        assert [(b["kind"], b["step"]) for b in healthy.bodies] == [("nonfinite", i * 10 + 4) for i in range(6)]
        assert trickle.wait_for_cut(1, 30)     # the server ended the trickling post itself
    finally:
        server.stop()
        trickle.close()
        healthy.close()


def test_two_dispatchers_on_one_database_send_an_alert_once(tmp_path):
    """Two workers' dispatchers (one database claim table) see the same NaN: one post."""
    from gradwatch.server.alerts.dispatch import AlertDispatcher, AlertRules, DatabaseClaims
    from gradwatch.server.storage import create_schema, make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'claims.db'}")
    create_schema(engine)
    receiver = Receiver()
    batch = {"step": np.arange(5), "pre_norm": np.array([1.0, np.nan, 1.0, 1.0, 1.0])}
    dispatchers = [AlertDispatcher([receiver.url], AlertRules(min_interval=300), claim=DatabaseClaims(engine))
                   for _ in range(2)]
    try:
        for dispatcher in dispatchers:
            dispatcher.submit("shared", batch)
        assert all(dispatcher.wait_idle(30) for dispatcher in dispatchers)
        assert [(b["run"], b["kind"], b["step"]) for b in receiver.bodies] == [("shared", "nonfinite", 1)]
        assert sum(d.counters.suppressed for d in dispatchers) == 1
        # After the interval the claim is taken again (a clock 301 s later).
        late = AlertDispatcher([receiver.url], AlertRules(min_interval=300), claim=DatabaseClaims(engine),
                               clock=lambda: __import__("time").time() + 301)
        late.submit("shared", batch)
        assert late.wait_idle(30) and len(receiver.bodies) == 2
        late.close()
    finally:
        for dispatcher in dispatchers:
            dispatcher.close()
        receiver.close()
        engine.dispose()


@pytest.mark.slow
def test_two_servers_on_one_database_alert_once(tmp_path):
    receiver = Receiver()
    first = alert_server(tmp_path, receiver)
    second = start_server(f"sqlite:///{tmp_path / 'alerts.db'}", tmp_path, extra_args=["--alert-webhook", receiver.url])
    try:
        rng = np.random.default_rng(2)
        with httpx.Client(base_url=first.url, timeout=30) as a, httpx.Client(base_url=second.url, timeout=30) as b:
            batch = make_batch(np.arange(0, 10), rng)
            batch["pre_norm"][2] = "NaN"
            assert post(a, "both", batch).status_code == 200
            assert receiver.received.wait(30)
            receiver.received.clear()
            batch = make_batch(np.arange(10, 20), rng, spike_steps=[17])
            batch["pre_norm"][0] = "NaN"  # step 10: the other server must not alert again
            assert post(b, "both", batch).status_code == 200
            assert receiver.received.wait(30)  # the spike: the NaN before it was decided
            assert [(x["kind"], x["step"]) for x in receiver.bodies] == [("nonfinite", 2), ("spike", 17)]
    finally:
        first.stop()
        second.stop()
        receiver.close()

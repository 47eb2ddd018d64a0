"""agent/link.py alone: the connection's states and transitions, with the clock passed in."""
from __future__ import annotations

import pytest

from gradwatch.agent.connection import Backoff
from gradwatch.agent.link import FLUSH_RETRY, Link, LinkState


def link(**backoff) -> Link:
    return Link(Backoff(base=1.0, cap=8.0, jitter=lambda: 1.0, **backoff))


def test_offline_never_tries_and_is_away():
    offline = Link(offline=True)
    assert offline.state is LinkState.OFFLINE and not offline.due(0.0, flushing=True) and offline.away()


def test_an_attempt_then_success_then_a_lost_connection():
    ln = link()
    assert ln.due(0.0) and not ln.away()          # before the first attempt the server is not "away"
    ln.attempt(0.0)
    assert ln.state is LinkState.CONNECTING and not ln.due(0.0)
    ln.connected()
    assert ln.state is LinkState.UP and not ln.due(100.0) and not ln.away()
    ln.lost(10.0, soon=False)                     # an ordinary loss backs off
    assert ln.state is LinkState.DOWN and ln.failures == 1 and ln.away()
    assert not ln.due(10.0) and ln.due(12.0)      # base 1 s x 2**1, jitter 1.0


def test_failures_back_off_exponentially_and_a_success_resets():
    ln = link()
    for expected, now in zip((2.0, 4.0, 8.0, 8.0), (0.0, 10.0, 20.0, 30.0)):
        ln.attempt(now)
        first = ln.failed(now)
        assert first == (ln.failures == 1)
        assert ln.next_attempt() == pytest.approx(now + expected)
    ln.attempt(40.0)
    ln.connected()
    assert ln.failures == 0


def test_a_waiting_flush_retries_every_flush_retry_seconds_whatever_the_backoff():
    ln = link()
    for _ in range(4):
        ln.attempt(0.0)
        ln.failed(0.0)
    assert not ln.due(1.0) and ln.due(FLUSH_RETRY, flushing=True)
    assert not ln.due(FLUSH_RETRY / 2, flushing=True)


def test_stopping_makes_no_new_attempt_after_a_failure():
    ln = link()
    assert ln.due(0.0, stopping=True)
    ln.attempt(0.0)
    ln.failed(0.0)
    assert not ln.due(1000.0, stopping=True) and ln.due(1000.0)


def test_refused_is_final():
    ln = link()
    ln.attempt(0.0)
    ln.refused("the server refused the token")
    assert ln.state is LinkState.REFUSED and ln.away() and not ln.due(1e9, flushing=True)
    ln.lost(1.0, soon=True)
    assert ln.state is LinkState.REFUSED


def test_refused_by_the_host_is_noted_until_another_outcome():
    """`refused_since`: every attempt since then was refused by the host (nothing listens);
    what close() may give up on, never while connected."""
    ln = link()
    ln.attempt(0.0)
    ln.failed(0.0, nobody_listening=True)
    ln.attempt(3.0)
    ln.failed(3.0, nobody_listening=True)
    assert ln.refused_since == 0.0 and ln.gave_up_on() == 0.0
    ln.attempt(10.0)
    ln.failed(10.0)                                # a timeout: someone may be there
    assert ln.refused_since is None
    ln.attempt(20.0)
    ln.failed(20.0, nobody_listening=True)
    ln.attempt(30.0)
    ln.connected()
    assert ln.refused_since is None and ln.gave_up_on() is None


def test_a_message_too_big_retries_soon_without_counting_a_failure():
    ln = link()
    ln.attempt(0.0)
    ln.connected()
    ln.lost(5.0, soon=True)
    assert ln.state is LinkState.DOWN and ln.failures == 0 and ln.next_attempt() == pytest.approx(6.0)

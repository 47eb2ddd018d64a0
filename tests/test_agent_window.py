"""The sender's pure parts alone: the in-flight window (sequence numbers, in-order resolution,
resends after a lost connection, the culprit of a "message too big") and the backoff schedule.
No socket, no thread, no clock: every expected value is worked out by hand."""
from __future__ import annotations

import pytest

from gradwatch.agent.connection import Backoff
from gradwatch.agent.spool import Position
from gradwatch.agent.window import Inflight, InflightWindow


def live(steps: int, size: int = 100, sent_at: float = 0.0) -> Inflight:
    return Inflight("live", b"x" * size, steps, size=size, sent_at=sent_at)


def spooled(end: int, steps: int, size: int = 100) -> Inflight:
    return Inflight("spool", b"x" * size, steps, end=Position(1, end), size=size)


def test_sequence_numbers_count_up_from_one_and_say_the_next_before_adding():
    window = InflightWindow(limit=3)
    assert window.next_seq == 1
    assert [window.add(live(1)) for _ in range(3)] == [1, 2, 3]
    assert window.next_seq == 4 and window.full and window.room == 0 and len(window) == 3


def test_acks_resolve_in_sequence_order_only():
    window = InflightWindow(limit=8)
    first, second, third = (window.add(spooled(end, 10)) for end in (10, 20, 30))
    assert window.ack(third) == []  # out of order: held until 1 and 2 are stored
    assert window.ack(second) == []
    resolved = window.ack(first)
    assert [seq for seq, _ in resolved] == [1, 2, 3]
    assert [item.end for _, item in resolved] == [Position(1, 10), Position(1, 20), Position(1, 30)]
    assert not window and window.ack(first) == []  # an ack repeated or unknown resolves nothing


def test_an_item_needing_no_ack_resolves_in_its_place():
    window = InflightWindow(limit=8)
    assert [seq for seq, _ in window.add_done(spooled(5, 0))] == [1]  # nothing before it: now
    window.add(spooled(10, 10))
    assert window.add_done(spooled(15, 0)) == []  # behind seq 2: waits for it
    assert [seq for seq, _ in window.ack(2)] == [2, 3]


def test_a_refused_message_settles_in_order_without_counting_as_the_largest_acked():
    window = InflightWindow(limit=8)
    small, big = window.add(live(1, size=10)), window.add(live(1, size=500))
    assert window.settle(big) == []
    assert [seq for seq, _ in window.ack(small)] == [small, big]
    assert window.largest_acked == 10


def test_drain_after_a_lost_connection_says_which_were_stored_out_of_order():
    window = InflightWindow(limit=8)
    window.add(live(3))
    stored = window.add(live(4))
    window.add(Inflight("meta", b"", 1))
    window.ack(stored)
    drained = window.drain()
    assert [(item.kind, item.steps, acked) for item, acked in drained] == [
        ("live", 3, False), ("live", 4, True), ("meta", 1, False)]
    assert not window and window.next_seq == 4  # numbers keep counting on the next connection


def test_the_culprit_of_a_too_big_close_is_the_largest_unacked_message():
    window = InflightWindow(limit=8)
    window.add(live(1, size=300))
    biggest = window.add(live(1, size=900))
    window.add(live(1, size=900))  # as big: the first of equals is named
    window.add(live(1, size=50))
    assert window.culprit()[0] == biggest
    window.ack(biggest)  # acknowledged: cannot be the culprit any more
    assert window.culprit()[0] == biggest + 1
    assert InflightWindow(limit=1).culprit() is None


def test_suspect_means_a_message_bigger_than_any_acknowledged_is_unanswered():
    window = InflightWindow(limit=8)
    window.ack(window.add(live(1, size=1000)))
    assert not window.suspect()
    window.add(live(1, size=1000))
    assert not window.suspect()  # no bigger than what the server took before
    window.add(live(1, size=1001))
    assert window.suspect()


def test_steps_by_kind_and_the_oldest_unanswered_send_time():
    window = InflightWindow(limit=8)
    window.add(live(5, sent_at=7.0))
    window.add(spooled(10, 20))
    window.add(live(2, sent_at=9.0))
    assert window.steps("live") == 7 and window.steps("spool") == 20
    assert window.oldest_unacked_sent_at() == 0.0  # the spool item above was sent at 0.0
    removed = window.remove(2)
    assert removed.steps == 20 and window.oldest_unacked_sent_at() == 7.0
    assert window.has_kind("live") and not window.has_kind("spool")


def test_a_window_needs_room_for_one_message():
    with pytest.raises(ValueError, match="limit must be >= 1"):
        InflightWindow(limit=0)


def test_backoff_doubles_with_jitter_up_to_the_cap_and_resets_on_success():
    backoff = Backoff(base=0.1, cap=1.0, jitter=lambda: 1.0)  # the top of the jitter range
    delays = [backoff.failed(now=100.0) for _ in range(6)]
    assert delays == pytest.approx([0.2, 0.4, 0.8, 1.0, 1.0, 1.0])
    assert backoff.failures == 6 and backoff.next_attempt == pytest.approx(101.0)
    assert not backoff.due(100.5) and backoff.due(101.0)
    low = Backoff(base=0.1, cap=1.0, jitter=lambda: 0.0)  # the bottom: half the delay
    assert low.failed(now=0.0) == pytest.approx(0.1)
    backoff.succeeded()
    assert backoff.failures == 0 and backoff.due(0.0)


def test_backoff_now_and_soon_move_the_next_attempt_without_counting_a_failure():
    backoff = Backoff(base=0.1, cap=30.0, jitter=lambda: 1.0)
    for _ in range(10):
        backoff.failed(now=0.0)
    assert backoff.next_attempt == pytest.approx(30.0)
    backoff.now(5.0)  # a flush with records waiting: no waiting for the slot
    assert backoff.due(5.0) and backoff.failures == 10
    backoff.soon(6.0)
    assert backoff.next_attempt == pytest.approx(6.1) and backoff.failures == 10


def test_drop_ledger_counts_both_threads_and_forgets_only_what_was_reported():
    from gradwatch.agent.drops import DropLedger

    ledger = DropLedger()
    for _ in range(3):
        ledger.count_training("queue_full")  # the training thread: no lock
    ledger.count("spool_full", 5)
    assert ledger.totals() == {"queue_full": 3, "spool_full": 5}  # seen before any fold
    ledger.fold()
    ledger.fold()  # folding twice counts nothing twice
    assert ledger.totals() == {"queue_full": 3, "spool_full": 5}
    assert ledger.unreported() == {"queue_full": 3, "spool_full": 5}
    ledger.reported({"queue_full": 3, "spool_full": 2})  # the server stored this event
    ledger.count_training("queue_full")
    ledger.fold()
    assert ledger.unreported() == {"queue_full": 1, "spool_full": 3}
    ledger.report_earlier({"spool_full": 10})  # an earlier process's drops.json: reported, not counted
    assert ledger.unreported() == {"queue_full": 1, "spool_full": 13}
    assert ledger.totals() == {"queue_full": 4, "spool_full": 5}

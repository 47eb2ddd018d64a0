"""agent/flushing.py alone: when a flush is done, what it waited for, the wait itself."""
from __future__ import annotations

import threading

import pytest

from gradwatch.agent.flushing import FlushLedger

SETTINGS = dict(waiting=0, idle=False, spool_is_destination=False, live_in_flight=False, refused_since=None,
                now=0.0)


def ledger_waiting_for(target: int, taken: int, **request) -> FlushLedger:
    ledger = FlushLedger()
    ledger.took(taken)
    ledger.begin(target, timeout=60.0, **request)
    return ledger


def test_nothing_is_due_without_a_flush_or_before_its_records_are_taken():
    assert not FlushLedger().due(**{**SETTINGS, "idle": True})
    assert not ledger_waiting_for(10, 9).due(**{**SETTINGS, "idle": True})
    assert not ledger_waiting_for(10, 10).due(**{**SETTINGS, "idle": True, "waiting": 1})
    assert ledger_waiting_for(10, 10).due(**{**SETTINGS, "idle": True})


def test_delivered_or_durable_in_the_spool_but_never_with_a_live_batch_in_flight():
    ledger = ledger_waiting_for(5, 5)
    assert not ledger.due(**SETTINGS)                                   # held, in flight, or spooled
    assert ledger.due(**{**SETTINGS, "spool_is_destination": True})     # no url / refused token
    assert not ledger.due(**{**SETTINGS, "spool_is_destination": True, "live_in_flight": True})


def test_close_gives_up_on_a_refusing_host_only_after_its_grace():
    ledger = ledger_waiting_for(5, 5, give_up_refused=0.5)
    started = ledger.request.started
    assert not ledger.due(**{**SETTINGS, "refused_since": started, "now": started + 0.4})
    assert ledger.due(**{**SETTINGS, "refused_since": started, "now": started + 0.5})
    # refused before the flush began: counted from the flush's start
    assert not ledger.due(**{**SETTINGS, "refused_since": started - 10, "now": started + 0.1})
    # a plain flush() never gives up that way
    plain = ledger_waiting_for(5, 5)
    assert not plain.due(**{**SETTINGS, "refused_since": 0.0, "now": plain.request.started + 100})


def test_complete_means_every_record_arrived():
    ledger = ledger_waiting_for(3, 3)
    request = ledger.request
    assert not ledger.complete(request, pending=0, dropped=0, rejected=0, spooled=0, offline=False)  # not done
    ledger.finish()
    assert request.done
    assert ledger.complete(request, pending=0, dropped=0, rejected=0, spooled=0, offline=False)
    assert not ledger.complete(request, pending=0, dropped=0, rejected=0, spooled=3, offline=False)
    assert ledger.complete(request, pending=0, dropped=0, rejected=0, spooled=3, offline=True)
    assert not ledger.complete(request, pending=1, dropped=0, rejected=0, spooled=0, offline=True)
    assert not ledger.complete(request, pending=0, dropped=1, rejected=0, spooled=0, offline=True)


def test_held_counts_what_is_taken_until_it_is_settled():
    ledger = FlushLedger()
    ledger.took(7)
    ledger.settled(3)
    assert (ledger.taken, ledger.held) == (7, 4)


@pytest.mark.timeout(20)
def test_wait_returns_when_another_thread_finishes_the_flush():
    ledger = ledger_waiting_for(1, 1)
    request = ledger.request
    finisher = threading.Timer(0.05, ledger.finish)
    finisher.start()
    ledger.wait(request, alive=lambda: True)
    finisher.join()
    assert request.done and ledger.request is None


@pytest.mark.timeout(20)
def test_wait_ends_at_the_deadline_or_when_the_sender_thread_is_gone():
    ledger = FlushLedger()
    request = ledger.begin(1, timeout=0.0)
    ledger.wait(request, alive=lambda: True)
    assert not request.done and ledger.request is None
    request = ledger.begin(1, timeout=60.0)
    ledger.wait(request, alive=lambda: False)
    assert not request.done

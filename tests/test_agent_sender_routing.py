"""agent/routing.py and agent/batching.py alone: a real spool, window, buffer and ledger; no
socket (routing while connected is covered through a real server in test_agent_delivery)."""
from __future__ import annotations

import numpy as np

from gradwatch.agent.batching import Batcher
from gradwatch.agent.buffer import RecordBuffer
from gradwatch.agent.drops import DropLedger
from gradwatch.agent.flushing import FlushLedger
from gradwatch.agent.recorder import Layout, StepRecord
from gradwatch.agent.routing import Router
from gradwatch.agent.spool import Spool
from gradwatch.agent.stats import Stats
from gradwatch.agent.window import Inflight, InflightWindow

LAYOUT = Layout(("pre_norm", "clipped"), ("a",))


def record(step: int) -> StepRecord:
    return StepRecord(step, 1000.0 + step, LAYOUT, np.float32([step + 1.0, 0.0, 2.0]).tobytes())


def make_router(tmp_path, spool: bool = True):
    drops, ledger, stats = DropLedger(), FlushLedger(), Stats()
    said: list[tuple[str, str]] = []
    failed: list[Exception] = []
    the_spool = Spool(tmp_path / "spool") if spool else None
    router = Router("r", the_spool, None, InflightWindow(4), stats=stats, drops=drops, ledger=ledger,
                    max_batch_bytes=1 << 20, count_drop=drops.count, transport_failed=failed.append,
                    warn=lambda key, message: said.append((key, message)))
    return router, ledger, stats, drops, said


def spooled(spool: Spool) -> list[int]:
    """Steps of each frame not yet acknowledged, in order."""
    return [frame.steps for frame in spool.read(spool.acked, 100) if frame.payload]


def test_offline_batches_go_to_the_spool_and_are_settled(tmp_path):
    router, ledger, stats, drops, _ = make_router(tmp_path)
    ledger.took(10)
    router.route(b'{"run": "r", "batch": {"step": [0]}}', 6)
    router.route(b'{"run": "r", "batch": {"step": [1]}}', 4)
    router.spool.sync()
    assert spooled(router.spool) == [6, 4]
    assert ledger.held == 0 and stats.spooled_total == 10 and router.spool.pending_steps == 10
    assert not drops.totals()


def test_without_a_spool_records_are_dropped_and_counted(tmp_path):
    router, ledger, _, drops, _ = make_router(tmp_path, spool=False)
    ledger.took(3)
    router.route(b"{}", 3)
    assert ledger.held == 0 and drops.totals() == {"spool_unavailable": 3}


def test_acks_resolve_in_order_and_move_the_spool_position(tmp_path):
    router, ledger, stats, _, _ = make_router(tmp_path)
    spool = router.spool
    for steps in (2, 3):
        spool.append(b'{"batch": 1}', steps)
    frames = spool.read(spool.acked, 10)
    seqs = [router.window.add(Inflight("spool", frame.payload, frame.steps, frame.end)) for frame in frames]
    assert router.on_message({"type": "ack", "seq": seqs[1], "accepted": 3}) == "ack"
    assert stats.acked == 0 and spool.pending_steps == 5      # the later one waits for the first
    router.on_message({"type": "ack", "seq": seqs[0], "accepted": 2})
    assert stats.acked == 5 and stats.accepted == 5 and not router.window
    assert spool.pending_steps == 0 and not spool.pending()


def test_a_refused_batch_is_set_aside_and_counted_as_rejected(tmp_path):
    router, ledger, stats, _, said = make_router(tmp_path)
    ledger.took(2)
    seq = router.window.add(Inflight("live", b'{"bad": 1}', 2))
    router.on_message({"type": "error", "seq": seq, "status": 422, "detail": "pre_norm: not a number"})
    assert stats.rejected == 2 and stats.acked == 0 and ledger.held == 0
    assert (tmp_path / "spool" / "rejected.gws").exists() and said[0][0] == "error-422"


def test_a_lost_connection_spools_the_live_batches_in_flight(tmp_path):
    router, ledger, stats, _, _ = make_router(tmp_path)
    ledger.took(5)
    router.window.add(Inflight("live", b'{"one": 1}', 3))
    acked = router.window.add(Inflight("live", b'{"two": 2}', 2))
    router.window.ack(acked)   # acknowledged out of order: stored, but still in the window
    router.lost_connection()
    router.spool.sync()
    assert stats.acked == 2 and spooled(router.spool) == [3]
    assert ledger.held == 0 and not router.window and router.cursor is None


def test_message_too_big_halves_the_budget_or_sets_a_single_step_aside(tmp_path):
    router, ledger, _, drops, said = make_router(tmp_path)
    ledger.took(11)
    router.window.add(Inflight("live", b"x" * 10, 10, size=4000))
    router.message_too_big()
    assert router.max_batch_bytes == 2000 and len(router.window) == 1   # cut smaller when sent again
    router.window.drain()
    router.window.add(Inflight("live", b'{"one": 1}', 1, size=1500))
    router.message_too_big()
    assert not router.window and drops.totals() == {"too_big": 1} and said[-1][0] == "too-big"
    assert (tmp_path / "spool" / "rejected.gws").exists()


def batcher(buffer, ledger, drops, **kwargs) -> Batcher:
    def drop(reason, steps):
        ledger.settled(steps)
        drops.count(reason, steps)
    return Batcher("r", buffer, ledger, batch_steps=4, batch_interval=3600.0, budget=lambda: 1 << 20,
                   drop=drop, warn=lambda key, message: None, **kwargs)


def test_batches_close_at_batch_steps_or_when_forced():
    buffer, ledger, drops = RecordBuffer(100, wake_at=4), FlushLedger(), DropLedger()
    part = batcher(buffer, ledger, drops)
    for step in range(3):
        buffer.put(record(step))
    assert part.collect(force=False) == [] and len(part.open) == 3
    buffer.put(record(3))
    (closed,) = part.collect(force=False)
    assert [r.step for r in closed] == [0, 1, 2, 3] and not part.open
    for step in range(4, 14):   # behind: all taken at once, one batch
        buffer.put(record(step))
    (closed,) = part.collect(force=False)
    assert [r.step for r in closed] == list(range(4, 14))
    buffer.put(record(14))
    assert [[r.step for r in batch] for batch in part.collect(force=True)] == [[14]]
    assert ledger.taken == 15


def test_records_the_host_stage_cannot_complete_are_dropped_the_rest_go():
    buffer, ledger, drops = RecordBuffer(100, wake_at=4), FlushLedger(), DropLedger()
    part = batcher(buffer, ledger, drops, complete=lambda records: [r for r in records if r.step != 1])
    for step in range(4):
        buffer.put(record(step))
    (closed,) = part.collect(force=True)
    assert [r.step for r in closed] == [0, 2, 3] and drops.totals() == {"encode_error": 1}
    assert ledger.held == 3


def test_an_unencodable_record_is_dropped_and_the_others_encoded():
    ledger, drops = FlushLedger(), DropLedger()
    part = batcher(RecordBuffer(10, wake_at=4), ledger, drops)
    ledger.took(3)
    bad = StepRecord(9, 0.0, LAYOUT, b"\x00\x00")
    payloads = part.encode([record(0), bad, record(2)])
    assert sum(steps for _, steps in payloads) == 2 and drops.totals() == {"encode_error": 1}

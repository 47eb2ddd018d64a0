"""The per-process run cache stays equal to the database through appends, late steps and new columns."""
from __future__ import annotations

import math

import numpy as np

from gradwatch.server.storage import create_schema, make_engine, Store
from gradwatch.server.storage.registry import BOOL_FIELDS, FLOAT_FIELDS, VALUE_COLUMNS
from gradwatch.server.wire import parse_batch
from tests.test_server_support import make_batch


def _assert_same(cached, sent: dict[int, dict]) -> None:
    """The cached arrays against the values sent, step by step (first send of a step wins):
    None is missing, "NaN"/"Infinity" are the floats they spell; bools as 0.0/1.0."""
    names = tuple(cached.values)
    assert cached.steps.dtype == np.int64 and cached.steps.tolist() == sorted(sent)
    assert cached.count == len(sent)
    spelled = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
    for index, step in enumerate(cached.steps.tolist()):
        for name in names:
            value = sent[step].get(name)
            got = cached.values[name][index]
            absent = cached.missing[name] is not None and bool(cached.missing[name][index])
            if value is None:
                assert math.isnan(got) and absent, (name, step)
                continue
            value = spelled.get(value, value) if isinstance(value, str) else float(value)
            assert not absent, (name, step)
            assert (math.isnan(got) and math.isnan(value)) or got == value, (name, step, got, value)
            assert name in FLOAT_FIELDS or name in BOOL_FIELDS


def _remember(sent: dict[int, dict], batch: dict) -> dict:
    for index, step in enumerate(batch["step"]):
        sent.setdefault(step, {name: column[index] for name, column in batch.items() if name != "step"})
    return batch


def _with_gaps(batch: dict) -> dict:
    """Missing values and NaNs beside each other, which only the nan_mask tells apart."""
    batch["lr"][3] = None
    batch["clipped"][4] = None
    batch["threshold"][5] = "NaN"
    batch["loss"][6] = None
    return batch


def test_cache_follows_appends_late_steps_and_added_columns(tmp_path):
    db_path = tmp_path / "cache.db"
    engine = make_engine(f"sqlite:///{db_path}")
    create_schema(engine)
    store = Store(engine)
    rng = np.random.default_rng(0)
    sent: dict[int, dict] = {}
    store.ingest("c", parse_batch(_remember(sent, _with_gaps(make_batch(np.arange(0, 1000, 2), rng,
                                                                        nonfinite_every=9)))))
    run_id = store.run_id("c")
    first = store.cache.get(run_id, ("pre_norm",))
    assert set(first.values) == {"pre_norm"}
    _assert_same(first, sent)
    assert store.cache.get(run_id, ("pre_norm",)) is first            # unchanged: no reread

    store.ingest("c", parse_batch(_remember(sent, make_batch(np.arange(1000, 1100), rng))))   # an append
    appended = store.cache.get(run_id, ("pre_norm", "clipped"))       # and a new column
    assert appended.count == 600 and {"pre_norm", "clipped"} <= set(appended.values)
    _assert_same(appended, sent)

    store.ingest("c", parse_batch(_remember(sent, _with_gaps(make_batch(np.arange(1, 1000, 2), rng)))))  # late
    late = store.cache.get(run_id, VALUE_COLUMNS)
    assert late.count == 1100 and np.all(np.diff(late.steps) > 0)
    _assert_same(late, sent)

    # Far apart: steps in chunks 0, 3 and 9; then one late step into chunk 3 and a resend.
    far = [5, 3 * 4096 + 7, 9 * 4096 + 1]
    store.ingest("far", parse_batch(_remember(far_sent := {}, make_batch(np.array(far), rng))))
    far_id = store.run_id("far")
    before = store.cache.get(far_id, VALUE_COLUMNS)
    _assert_same(before, far_sent)
    store.ingest("far", parse_batch(_remember(far_sent, make_batch(np.array([3 * 4096 + 2, 9 * 4096 + 1]), rng))))
    after = store.cache.get(far_id, VALUE_COLUMNS)
    assert after.version == before.version + 1
    _assert_same(after, far_sent)
    engine.dispose()


def test_the_cache_holds_at_most_its_byte_budget(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'budget.db'}")
    create_schema(engine)
    store = Store(engine, cache_mb=0.1)   # 104,857 bytes: two runs of 3,000 steps x 2 columns do not fit
    rng = np.random.default_rng(1)
    for name in ("a", "b", "c"):
        store.ingest(name, parse_batch(make_batch(np.arange(3000), rng)))
    for name in ("a", "b", "c"):
        arrays = store.arrays(name, ("pre_norm", "loss"))
        assert arrays.count == 3000
        assert store.cache.held_bytes <= 0.1 * 2**20
    assert store.arrays("c", ("pre_norm", "loss")) is arrays   # the newest stayed
    whole = store.arrays("a")   # all columns: more than the budget, answered but not kept
    assert whole.count == 3000 and store.cache.held_bytes <= 0.1 * 2**20
    engine.dispose()

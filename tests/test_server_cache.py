"""The per-process run cache stays equal to the database through appends, late steps and new columns."""
from __future__ import annotations

import numpy as np

from gradwatch.server.db import create_schema, make_engine
from gradwatch.server.schemas import VALUE_COLUMNS, parse_batch
from gradwatch.server.storage import Store
from tests.test_server_support import make_batch


def _assert_same(cached, store: Store, run_id: int) -> None:
    steps, values, missing = store.fetch_steps(run_id)
    assert np.array_equal(cached.steps, steps) and cached.count == len(steps)
    for name, column in cached.values.items():
        assert np.array_equal(column, values[name], equal_nan=True), name
        a, b = cached.missing[name], missing[name]
        assert (a is None and b is None) or np.array_equal(a, b), name


def test_cache_follows_appends_late_steps_and_added_columns(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'cache.db'}")
    create_schema(engine)
    store = Store(engine)
    rng = np.random.default_rng(0)
    store.ingest("c", parse_batch(make_batch(np.arange(0, 1000, 2), rng, nonfinite_every=9)))
    run_id = store.run_id("c")
    first = store.cache.get(run_id, ("pre_norm",))
    assert set(first.values) == {"pre_norm"}
    _assert_same(first, store, run_id)
    assert store.cache.get(run_id, ("pre_norm",)) is first            # unchanged: no reread

    store.ingest("c", parse_batch(make_batch(np.arange(1000, 1100), rng)))   # an append
    appended = store.cache.get(run_id, ("pre_norm", "clipped"))       # and a new column
    assert appended.count == 600 and {"pre_norm", "clipped"} <= set(appended.values)
    _assert_same(appended, store, run_id)

    store.ingest("c", parse_batch(make_batch(np.arange(1, 1000, 2), rng)))   # late, in between
    late = store.cache.get(run_id, VALUE_COLUMNS)
    assert late.count == 1100 and np.all(np.diff(late.steps) > 0)
    _assert_same(late, store, run_id)
    engine.dispose()

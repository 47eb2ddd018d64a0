"""The per-process run cache stays equal to the database through appends, late steps and new columns."""
from __future__ import annotations

import math
import sqlite3

import numpy as np

from gradwatch.server.storage import create_schema, make_engine
from gradwatch.server.schemas import BOOL_FIELDS, FLOAT_FIELDS, VALUE_COLUMNS, parse_batch
from gradwatch.server.storage import Store
from tests.test_server_support import make_batch


def _assert_same(cached, db_path, run_id: int) -> None:
    """The cached arrays against the rows as plain `sqlite3` reads them, decoded here by the
    documented layout (NULL + nan_mask bit = NaN, NULL alone = missing), not by the server's
    own `arrays_from_rows`."""
    names = tuple(cached.values)
    with sqlite3.connect(db_path) as connection:
        rows = connection.execute(f"SELECT step, {', '.join(names)}, nan_mask FROM steps WHERE run_id = ? "
                                  "ORDER BY step", (run_id,)).fetchall()
    assert cached.steps.dtype == np.int64 and cached.steps.tolist() == [row[0] for row in rows]
    assert cached.count == len(rows)
    bits = {name: 1 << index for index, name in enumerate(FLOAT_FIELDS)}
    for position, name in enumerate(names, start=1):
        stored = [row[position] for row in rows]
        masks = [row[-1] for row in rows]
        missing = cached.missing[name]
        for index, (value, mask) in enumerate(zip(stored, masks)):
            got = cached.values[name][index]
            absent = bool(missing[index]) if missing is not None else False
            if value is None:
                assert math.isnan(got), (name, index)
                nan = name in FLOAT_FIELDS and bool(mask & bits[name])
                assert absent == (not nan), (name, index)
            else:
                assert not absent and got == (float(value) if name in FLOAT_FIELDS else float(bool(value))), \
                    (name, index, got, value)
                assert name in FLOAT_FIELDS or name in BOOL_FIELDS


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
    store.ingest("c", parse_batch(_with_gaps(make_batch(np.arange(0, 1000, 2), rng, nonfinite_every=9))))
    run_id = store.run_id("c")
    first = store.cache.get(run_id, ("pre_norm",))
    assert set(first.values) == {"pre_norm"}
    _assert_same(first, db_path, run_id)
    assert store.cache.get(run_id, ("pre_norm",)) is first            # unchanged: no reread

    store.ingest("c", parse_batch(make_batch(np.arange(1000, 1100), rng)))   # an append
    appended = store.cache.get(run_id, ("pre_norm", "clipped"))       # and a new column
    assert appended.count == 600 and {"pre_norm", "clipped"} <= set(appended.values)
    _assert_same(appended, db_path, run_id)

    store.ingest("c", parse_batch(_with_gaps(make_batch(np.arange(1, 1000, 2), rng))))   # late, in between
    late = store.cache.get(run_id, VALUE_COLUMNS)
    assert late.count == 1100 and np.all(np.diff(late.steps) > 0)
    _assert_same(late, db_path, run_id)
    engine.dispose()

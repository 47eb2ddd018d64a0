"""Events without HTTP: clip events read from the clipped steps, merged with the stored
events; the runs list's clip rate; migrating a version-1 database; reports of events
without a step. On SQLite and on PostgreSQL."""
from __future__ import annotations

import math

import pytest
from sqlalchemy import create_engine

from gradwatch.server.analysis import stats
from gradwatch.server.storage import SCHEMA_VERSION, create_schema, make_engine, normalize_url, Store
from gradwatch.server.wire import parse_batch
from tests.test_server_support import db_url_for


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    engine = make_engine(db_url_for(request.param, tmp_path, request))
    create_schema(engine)
    yield Store(engine)
    engine.dispose()


def count_rows(store: Store, sql: str, params: tuple = ()) -> int:
    return store.read(sql, params)[0][0]


PRE = [0.5, 0.6, 2.0, 0.7, 0.8, 40.0, 0.9, math.inf, 5.0, 3.0]
THRESHOLD = [1.5, 1.5, None, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5, "NaN"]
CLIPPED = [False, False, True, False, False, True, False, True, False, True]
TIME = [1.7e9 + s for s in range(10)]
TIME[5] = None


def first_batch() -> dict:
    return {"step": list(range(10)), "pre_norm": [("Infinity" if v == math.inf else v) for v in PRE],
            "threshold": THRESHOLD, "clipped": CLIPPED, "loss": [2.0] * 10,
            "spike": [s in (5, 8) for s in range(10)], "nonfinite": [s == 7 for s in range(10)],
            "time": TIME}


def expected_clip(step: int) -> dict:
    value = "Infinity" if PRE[step] == math.inf else PRE[step]
    return {"step": step, "kind": "clip", "value": value, "threshold": THRESHOLD[step],
            "message": f"pre-clip norm {value} clipped", "time": TIME[step]}


def fill_run(store: Store) -> int:
    store.ingest("ev", parse_batch(first_batch()))
    resent = first_batch()
    resent["loss"][5] = 9.0  # step 5 again with another loss: a conflict event at a clipped step
    assert store.ingest("ev", parse_batch({k: v[5:6] for k, v in resent.items()})).conflicts == 1
    store.ingest("ev", None, events=[{"kind": "drop", "step": 9, "message": "dropped 9"},
                                     {"kind": "drop", "step": None, "message": "dropped, no step"}])
    return store.run_id("ev")


def test_clip_events_come_from_the_steps_in_the_order_they_had_when_stored(store):
    run_id = fill_run(store)
    # No clip rows are written: every step may clip early in training.
    assert count_rows(store, "SELECT COUNT(*) FROM events WHERE kind = 'clip'") == 0
    assert count_rows(store, "SELECT COUNT(*) FROM events") == 6
    assert store.events(run_id, "clip", 1000) == [expected_clip(s) for s in (9, 7, 5, 2)]
    assert store.events(run_id, "clip", 2) == [expected_clip(9), expected_clip(7)]
    # Newest first; within a step the clip event after the stored ones (where ingest put it
    # when it stored clip events: first, so last in newest-first order); NULL steps where the
    # database sorts them (last in SQLite, first in PostgreSQL).
    order = [(9, "drop"), (9, "clip"), (8, "spike"), (7, "nonfinite"), (7, "clip"), (5, "conflict"),
             (5, "spike"), (5, "clip"), (2, "clip")]
    order = order + [(None, "drop")] if store.is_sqlite else [(None, "drop")] + order
    every = store.events(run_id, None, 1000)
    assert [(e["step"], e["kind"]) for e in every] == order
    assert [e for e in every if e["kind"] == "clip"] == store.events(run_id, "clip", 1000)
    for limit in range(1, len(order) + 1):
        assert store.events(run_id, None, limit) == every[:limit]
    assert [e["step"] for e in store.events(run_id, "spike", 1000)] == [8, 5]
    assert store.list_runs()[0]["clips"] == 4


def test_runs_list_clip_rate_agrees_with_stats(store):
    store.ingest("no-flag", parse_batch({"step": [0, 1, 2], "pre_norm": [1.0, 2.0, 3.0]}))
    store.ingest("some-flags", parse_batch({"step": [0, 1, 2, 3], "pre_norm": [1.0, 2.0, 3.0, 4.0],
                                            "clipped": [True, None, False, True]}))
    store.ingest("some-flags", parse_batch({"step": [4, 5], "pre_norm": [1.0, 2.0]}))  # no flags sent
    store.ingest("some-flags", parse_batch({"step": [6], "pre_norm": [9.0], "clipped": [True]}))
    store.ingest("some-flags", parse_batch({"step": [6], "pre_norm": [9.0], "clipped": [True]}))  # a duplicate
    runs = {run["name"]: run for run in store.list_runs()}
    for name, rate in (("no-flag", None), ("some-flags", 3 / 4)):
        arrays = store.cache.get(store.run_id(name), ("pre_norm", "clipped", "nonfinite"))
        from_stats = stats.window_stats(arrays.values["pre_norm"], arrays.values["clipped"],
                                        arrays.values["nonfinite"])["clip_rate"]
        assert runs[name]["clip_rate"] == from_stats == rate, name
    assert runs["some-flags"]["clips"] == 3 and runs["no-flag"]["clips"] == 0


V1_FLOATS = ("pre_norm", "post_norm", "scale", "threshold", "loss", "lr", "z", "ema", "time")
V1_COLUMNS = ("pre_norm", "post_norm", "scale", "threshold", "clipped", "loss", "lr", "z", "ema", "spike",
              "nonfinite", "time")
V1_DDL = (
    "CREATE TABLE steps (run_id INTEGER NOT NULL REFERENCES runs (id), step BIGINT NOT NULL, "
    + ", ".join(f"{name} {'BOOLEAN' if name in ('clipped', 'spike', 'nonfinite') else 'DOUBLE PRECISION'}"
                for name in V1_COLUMNS)
    + ", nan_mask SMALLINT NOT NULL, PRIMARY KEY (run_id, step))",
    "CREATE TABLE tensor_layouts (id INTEGER PRIMARY KEY, run_id INTEGER NOT NULL REFERENCES runs (id), "
    "digest VARCHAR(64) NOT NULL, names TEXT NOT NULL, UNIQUE (run_id, digest))",
    "CREATE TABLE tensor_norms (run_id INTEGER NOT NULL REFERENCES runs (id), step BIGINT NOT NULL, "
    "layout_id INTEGER NOT NULL REFERENCES tensor_layouts (id), norms BYTEA NOT NULL, PRIMARY KEY (run_id, step))",
)


def _downgrade_to_version_1(store: Store) -> None:
    """The layout of schema version 1 (a row per step, NaN as NULL plus a bit of nan_mask), holding
    the steps the store holds now, with the clip events that layout stored on ingest."""
    rows, clip_rows = [], []
    for (run_id,) in store.read("SELECT id FROM runs"):
        steps, values, missing = store.fetch_steps(run_id)
        for index, step in enumerate(steps.tolist()):
            mask, row = 0, [run_id, step]
            for name in V1_COLUMNS:
                value = float(values[name][index])
                absent = missing[name] is not None and bool(missing[name][index])
                if name in V1_FLOATS and value != value and not absent:
                    mask |= 1 << V1_FLOATS.index(name)
                row.append(None if value != value else (value == 1.0 if name not in V1_FLOATS else value))
            rows.append(tuple(row) + (mask,))
            if values["clipped"][index] == 1.0:
                clip_rows.append((run_id, step, row[2], row[5], mask, row[-1]))
    raw = store.engine.raw_connection()
    try:
        cursor = raw.cursor()
        for table in ("chunk_columns", "chunk_summaries", "chunks", "tensor_summaries", "tensor_chunks",
                      "alembic_version", "alert_claims"):  # releases before Alembic had only schema_version
            cursor.execute(f"DROP TABLE {table}")
        cursor.execute("ALTER TABLE runs DROP COLUMN clip_flags")
        for statement in V1_DDL:
            cursor.execute(statement.replace("BYTEA", "BLOB") if store.is_sqlite else statement)
        cursor.executemany(store._sql(f"INSERT INTO steps (run_id, step, {', '.join(V1_COLUMNS)}, nan_mask) "
                                      f"VALUES ({', '.join(['?'] * (len(V1_COLUMNS) + 3))})"), rows)
        cursor.execute("UPDATE schema_version SET version = 1")
        for run_id, step, value, threshold, mask, stamp in clip_rows:
            shown = "NaN" if value is None else ("Infinity" if value == math.inf else value)
            cursor.execute(store._sql("INSERT INTO events (run_id, step, kind, value, threshold, nan_mask, "
                                      "message, time) VALUES (?, ?, 'clip', ?, ?, ?, ?, ?)"),
                           (run_id, step, value, threshold, 2 if mask & 8 else 0,
                            f"pre-clip norm {shown} clipped", stamp))
        # and one an agent sent itself, which stays
        cursor.execute(store._sql("INSERT INTO events (run_id, step, kind, nan_mask, message, detail) "
                                  "VALUES (?, 3, 'clip', 0, 'agent: clipped by hand', '{\"by\": \"agent\"}')"),
                       (clip_rows[0][0],))
        if not store.is_sqlite:
            raw.commit()
        cursor.close()
    finally:
        raw.close()


def test_a_version_1_database_is_migrated_without_duplicate_clip_events(store):
    run_id = fill_run(store)
    store.ingest("ev", parse_batch({"step": [20, 21], "pre_norm": [1.0, 2.0]}))  # steps without a flag
    before = store.events(run_id, None, 1000)
    _downgrade_to_version_1(store)
    assert count_rows(store, "SELECT COUNT(*) FROM events WHERE kind = 'clip'") == 5
    url = store.engine.url
    for _ in range(2):  # a second start finds it migrated
        engine = make_engine(url.render_as_string(hide_password=False))
        create_schema(engine)
        migrated = Store(engine)
        assert count_rows(migrated, "SELECT MAX(version) FROM schema_version") == SCHEMA_VERSION == 7
        assert count_rows(migrated, "SELECT COUNT(*) FROM events WHERE kind = 'clip'") == 1
        agent_clip = {"step": 3, "kind": "clip", "value": None, "threshold": None,
                      "message": "agent: clipped by hand", "time": None, "detail": {"by": "agent"}}
        after = migrated.events(run_id, None, 1000)
        assert [e for e in after if e != agent_clip] == before
        assert agent_clip in after
        run = migrated.list_runs()[0]
        assert (run["clips"], run["steps"], run["clip_rate"]) == (4, 12, 4 / 10)
        engine.dispose()


def test_a_newer_schema_version_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'new.db'}"
    engine = make_engine(url)
    create_schema(engine)
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE schema_version SET version = 99")
    from gradwatch.server.storage import SchemaError

    with pytest.raises(SchemaError, match="99"):
        create_schema(create_engine(normalize_url(url)))
    engine.dispose()

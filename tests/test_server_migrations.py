"""Alembic migrations: a database written by release 3c20f55 upgrades in place and reads back.

`tests/fixtures/gradwatch-v2.db` was written by that release's own server
(`tests/fixtures/make_v2_fixture.py`) from the messages in `v2_input.json`;
`v2_answers.json` is what that release answered. Here today's code upgrades a
copy (SQLite), or the same rows loaded into that release's PostgreSQL DDL,
and every value must come back exactly: compared with the inputs sent (NaN,
+-Infinity and nulls kept apart) and with the old release's answers.
"""
from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from gradwatch.server.app.factory import create_app
from gradwatch.server.app.settings import Settings
from gradwatch.server.storage import SCHEMA_VERSION, SchemaError, Store, make_engine, upgrade_database
from gradwatch.server.storage.migrate import alembic_config, head_revision
from gradwatch.server.wire.columns import parse_batch

FIXTURES = Path(__file__).resolve().parent / "fixtures"
INPUT = json.loads((FIXTURES / "v2_input.json").read_text())
ANSWERS = json.loads((FIXTURES / "v2_answers.json").read_text())
OLD_COLUMNS = ("pre_norm", "post_norm", "scale", "threshold", "clipped", "loss", "lr", "z", "ema", "spike",
               "nonfinite", "time")
DERIVED_KINDS = {"level_shift", "loss_spike", "skipped"}
TABLES = ("runs", "schema_version", "steps", "tensor_layouts", "tensor_norms", "events")


def _sqlite_copy(tmp_path: Path) -> str:
    target = tmp_path / "old.db"
    shutil.copy(FIXTURES / "gradwatch-v2.db", target)
    return f"sqlite:///{target}"


def _postgres_copy(postgres_url: str) -> str:
    """A new PostgreSQL database with the old release's DDL and the fixture's rows, ids kept."""
    name = "gw_" + uuid.uuid4().hex[:12]
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    url = postgres_url.rsplit("/", 1)[0] + "/" + name
    engine = create_engine(url)
    source = sqlite3.connect(FIXTURES / "gradwatch-v2.db")
    with engine.begin() as connection:
        for statement in (FIXTURES / "schema-v2-postgresql.sql").read_text().split(";"):
            if statement.strip():
                connection.exec_driver_sql(statement)
        for table in TABLES:
            cursor = source.execute(f"SELECT * FROM {table}")
            names = [column[0] for column in cursor.description]
            types = dict(connection.exec_driver_sql(
                "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = %s",
                (table,)).fetchall())
            rows = [tuple(bool(value) if value is not None and types[n] == "boolean" else value
                          for n, value in zip(names, row)) for row in cursor.fetchall()]
            if rows:
                connection.exec_driver_sql(
                    f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join(['%s'] * len(names))})", rows)
            if "id" in names:
                connection.exec_driver_sql(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                                           f"(SELECT COALESCE(MAX(id), 1) FROM {table}))")
    source.close()
    engine.dispose()
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def old_database(request, tmp_path) -> str:
    if request.param == "sqlite":
        return _sqlite_copy(tmp_path)
    return _postgres_copy(request.getfixturevalue("postgres_url"))


def _sent_alpha() -> dict[int, dict]:
    """Step -> the values the agent sent for run 'alpha' (the first batch wins: a re-sent
    step is a duplicate or a conflict, never an overwrite)."""
    rows: dict[int, dict] = {}
    for message in INPUT:
        if message["run"] != "alpha" or "batch" not in message:
            continue
        batch = message["batch"]
        for index, step in enumerate(batch["step"]):
            if step not in rows:
                rows[step] = {name: batch[name][index] if name in batch else None for name in OLD_COLUMNS}
    return rows


def test_the_old_release_database_upgrades_and_reads_back_exactly(old_database):
    with TestClient(create_app(Settings(db_url=old_database)), base_url="http://localhost") as client:
        health = client.get("/healthz").json()
        assert health["schema_version"] == SCHEMA_VERSION == 7
        # The list leaves `meta` to GET /api/runs/{run} (issue 14); the rest is the old answer.
        assert client.get("/api/runs").json() == [{k: v for k, v in run.items() if k != "meta"}
                                                  for run in ANSWERS["runs"]]
        for run in ANSWERS["runs"]:
            assert client.get("/api/runs/" + run["name"]).json() == run
        series = client.get("/api/runs/alpha/series", params={"fields": "all", "points": 100000}).json()
        # against the inputs, independently of any server's answer
        sent = _sent_alpha()
        assert series["step"] == sorted(sent)
        for position, step in enumerate(series["step"]):
            for name in OLD_COLUMNS:
                assert series[name][position] == sent[step][name], (step, name)
            for name in ("skipped", "robust_z", "level_shift"):  # columns the old release did not have
                assert series[name][position] is None
        for run, old in ANSWERS["per_run"].items():
            path = "/api/runs/" + run
            if old["series"] is not None:
                now = client.get(path + "/series", params={"fields": "all", "points": 100000}).json()
                assert {name: now[name] for name in old["series"]} == old["series"], run
            # Events the old release stored; kinds the server now derives at read time
            # (level shifts, loss spikes, skipped steps) did not exist then, nor threshold_kind.
            events = [{k: v for k, v in e.items() if k != "threshold_kind"}
                      for e in client.get(path + "/events", params={"limit": 1000}).json()
                      if e["kind"] not in DERIVED_KINDS]
            expected = old["events"]
            if "postgresql" in old_database:  # events without a step sort as the database sorts NULL
                expected = [e for e in expected if e["step"] is None] + [e for e in expected if e["step"] is not None]
            assert events == expected, run
            assert client.get(path + "/tensors", params={"points": 1000}).json() == old["tensors"], run
        tensors = client.get("/api/runs/alpha/tensors", params={"points": 1000}).json()
        sent_norms = INPUT[0]["batch"]["tensor_norms"]
        assert tensors["names"] == sent_norms["names"]
        assert [list(row) for row in zip(*tensors["norms"])] == sent_norms["norms"]
        # the upgraded database takes the new columns
        answer = client.post("/api/runs/alpha/steps", json={"step": [13], "pre_norm": [1.0], "skipped": [True],
                                                            "robust_z": ["NaN"], "level_shift": [False]})
        assert answer.json() == {"accepted": 1, "duplicates": 0, "conflicts": 0}
        last = client.get("/api/runs/alpha/series", params={"fields": "skipped,robust_z,level_shift",
                                                           "start": 13}).json()
        assert last == {"step": [13], "skipped": [True], "robust_z": ["NaN"], "level_shift": [False]}
    assert upgrade_database(old_database) == (head_revision(), head_revision())  # a second start: nothing to do


@pytest.mark.slow
def test_several_servers_starting_at_once_upgrade_once(old_database):
    code = ("import sys; from gradwatch.server.storage import upgrade_database; "
            "print(upgrade_database(sys.argv[1]))")
    starters = [subprocess.Popen([sys.executable, "-c", code, old_database], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [starter.communicate(timeout=120) for starter in starters]
    assert all(starter.returncode == 0 for starter in starters), results
    befores = sorted(out.strip() for out, _ in results)
    progress = [err for out, err in results if out.strip() == "('0002', '0007')"][0]
    assert "moving steps into chunks" in progress and "steps" in progress.splitlines()[-1]  # said how far it got
    assert befores == ["('0002', '0007')"] + ["('0007', '0007')"] * 3  # exactly one did the upgrade
    engine = create_engine(old_database)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == ["0007"]
        assert connection.execute(text("SELECT version FROM schema_version")).scalars().all() == [7]
        assert connection.execute(text("SELECT clip_flags FROM runs WHERE name = 'alpha'")).scalar() == 11
    engine.dispose()


def test_a_server_older_than_the_database_refuses_naming_both_versions(tmp_path):
    url = _sqlite_copy(tmp_path)
    upgrade_database(url)
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0042'"))
        connection.execute(text("UPDATE schema_version SET version = 42"))
    engine.dispose()
    with pytest.raises(SchemaError) as error:
        upgrade_database(url)
    assert "42" in str(error.value) and f"version {SCHEMA_VERSION}" in str(error.value)
    result = subprocess.run([sys.executable, "-m", "gradwatch.server.commands.cli", "serve", "--db", url, "--port", "1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "schema version 42" in result.stderr and f"schema version {SCHEMA_VERSION}" in result.stderr


def test_a_fresh_database_at_head_matches_the_tables(tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from gradwatch.server.storage.tables import metadata

    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    assert upgrade_database(url) == (None, head_revision())
    engine = create_engine(url)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), metadata)
        tables = {row[0] for row in connection.execute(text("SELECT name FROM sqlite_master WHERE type = 'table'"))}
    engine.dispose()
    assert diff == []
    assert {"chunks", "chunk_columns", "chunk_summaries", "tensor_chunks", "tensor_summaries"} <= tables
    assert not tables & {"steps", "tensor_norms", "tensor_layouts"}  # moved into chunks by 0005


def test_schemas_6_and_7_rekey_the_chunk_tables_and_keep_every_row(tmp_path):
    """Down from head to 0005 and up again, on a run written at head in 500-step batches (so
    each chunk has several segments, each with its own summary entries):
    - 0007's downgrade merges each chunk's summary segments into one row per chunk and width,
      which decodes to the run's summary as head read it (NumPy checks the block counts);
    - 0006 rebuilds `chunk_columns` keyed (run, chunk, segment, column), every blob bit for bit,
      and its downgrade puts the old key back;
    - 0007 keys `chunk_summaries` by (run, width, chunk, segment), the stored rows segment 0,
      and the run reads the same and takes new segments after."""
    from alembic import command

    from gradwatch.server.storage.chunks import BLOCK, decode_summaries

    url = f"sqlite:///{tmp_path / 'rekey.db'}"

    def migrate(action, revision: str) -> None:
        engine = create_engine(url)
        with engine.begin() as connection:
            action(alembic_config(connection), revision)
        engine.dispose()

    def rows_and_key(table: str) -> tuple[list, list[str]]:
        columns = {"chunk_columns": "run_id, name, chunk_id, seg, data"}.get(table, "*")
        engine = create_engine(url)
        with engine.connect() as connection:
            rows = sorted(connection.execute(text(f"SELECT {columns} FROM {table}")).all())
            key = [row[2] for row in connection.execute(text(f"PRAGMA index_info('{table}')")).all()]
        engine.dispose()
        return rows, key

    def ingest(steps: range) -> None:
        engine = make_engine(url)
        store = Store(engine)
        for begin in range(steps.start, steps.stop, 500):
            part = slice(begin, min(begin + 500, steps.stop))
            store.ingest("r", parse_batch({"step": all_steps[part], "pre_norm": norms[part].tolist(),
                                           "loss": [1.0] * len(all_steps[part]),
                                           "spike": (norms[part] > 2.5).tolist()}))
        engine.dispose()

    def read_back(last: int) -> tuple:
        engine = make_engine(url)
        store = Store(engine)
        arrays = store.arrays("r", ("pre_norm",))
        with store.reader.snapshot() as cursor:
            summary = store.reader.rows.summaries(cursor, store.run_id("r"), 0, 10, BLOCK)
        engine.dispose()
        assert arrays.steps.tolist() == all_steps[:last] and np.array_equal(arrays.values["pre_norm"], norms[:last])
        return summary

    all_steps = list(range(14000))
    norms = np.exp(np.random.default_rng(2).normal(0, 0.3, len(all_steps)))
    assert upgrade_database(url) == (None, "0007")
    ingest(range(0, 7000))
    summary = read_back(7000)
    blocks = np.asarray(all_steps[:7000]) // BLOCK
    assert summary.rows.tolist() == np.bincount(blocks).tolist()
    assert summary.nums["pre_norm"].max.tolist() == [norms[:7000][blocks == b].max() for b in np.unique(blocks)]
    segmented, _ = rows_and_key("chunk_summaries")
    assert max(row[3] for row in segmented if row[2] == 1) == 5   # chunk 1: 4096-4499, then 5 appends

    migrate(command.downgrade, "0005")
    summaries_5, _ = rows_and_key("chunk_summaries")
    assert [row[:3] for row in summaries_5] == [(1, w, c) for w in (0, BLOCK) for c in range(2)]
    merged = decode_summaries([row[3] for row in summaries_5 if row[1] == BLOCK])
    assert merged.start.tolist() == summary.start.tolist() and merged.rows.tolist() == summary.rows.tolist()
    assert merged.nums["pre_norm"].max.tolist() == summary.nums["pre_norm"].max.tolist()
    assert np.allclose(merged.nums["pre_norm"].sum, summary.nums["pre_norm"].sum, rtol=1e-12, atol=0)
    before, old_key = rows_and_key("chunk_columns")
    assert old_key == ["run_id", "name", "chunk_id", "seg"]

    migrate(command.upgrade, "0006")
    after, new_key = rows_and_key("chunk_columns")
    assert new_key == ["run_id", "chunk_id", "seg", "name"]
    assert after == before and len({row[2] for row in after}) == 2   # 2 chunks, every blob kept
    assert upgrade_database(url) == ("0006", "0007")
    summaries_7, key_7 = rows_and_key("chunk_summaries")
    assert key_7 == ["run_id", "width", "chunk_id", "seg"]
    assert summaries_7 == [(*row[:3], 0, row[3]) for row in summaries_5]
    assert read_back(7000).rows.tolist() == summary.rows.tolist()
    ingest(range(7000, 14000))   # appends after the migration: new segments beside segment 0
    assert read_back(14000).rows.tolist() == np.bincount(np.asarray(all_steps) // BLOCK).tolist()

    migrate(command.downgrade, "0006")
    migrate(command.downgrade, "0005")
    back, key = rows_and_key("chunk_columns")
    assert key == ["run_id", "name", "chunk_id", "seg"] and {row[2] for row in back} == {0, 1, 2, 3}


def test_schema_7_on_postgresql_downgrades_merging_segments_and_upgrades_again(postgres_url):
    """PostgreSQL's path of 0007 (a column added, the primary key swapped): a run written in
    500-step batches has summary segments; down to 0006 each chunk has one summary row per
    width whose entries count every step; up again, the run reads the same and appends."""
    from alembic import command

    from gradwatch.server.storage.chunks import BLOCK, decode_summaries
    from tests.test_server_support import fresh_postgres_db

    url = fresh_postgres_db(postgres_url)
    steps = list(range(6000))
    norms = np.exp(np.random.default_rng(4).normal(0, 0.3, len(steps)))

    def ingest(lo: int, hi: int) -> None:
        engine = make_engine(url)
        store = Store(engine)
        for begin in range(lo, hi, 500):
            part = slice(begin, min(begin + 500, hi))
            store.ingest("r", parse_batch({"step": steps[part], "pre_norm": norms[part].tolist()}))
        engine.dispose()

    def migrate(action, revision: str) -> None:
        engine = make_engine(url)
        with engine.begin() as connection:
            action(alembic_config(connection), revision)
        engine.dispose()

    upgrade_database(url)
    ingest(0, 5000)
    engine = make_engine(url)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT MAX(seg) FROM chunk_summaries")).scalar() >= 1
    engine.dispose()
    migrate(command.downgrade, "0006")
    engine = make_engine(url)
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT width, chunk_id, data FROM chunk_summaries ORDER BY width, chunk_id")).all()
        columns = [row[0] for row in connection.execute(text(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'chunk_summaries'")).all()]
    engine.dispose()
    assert "seg" not in columns and [row[:2] for row in rows] == [(w, c) for w in (0, BLOCK) for c in range(2)]
    merged = decode_summaries([bytes(row[2]) for row in rows if row[0] == BLOCK])
    assert merged.rows.tolist() == np.bincount(np.asarray(steps[:5000]) // BLOCK).tolist()
    assert upgrade_database(url) == ("0006", head_revision())
    ingest(5000, 6000)
    engine = make_engine(url)
    arrays = Store(engine).arrays("r", ("pre_norm",))
    engine.dispose()
    assert arrays.steps.tolist() == steps and np.array_equal(arrays.values["pre_norm"], norms)

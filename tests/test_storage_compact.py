"""Compaction: once a run moves past a group of chunks written in many appends, each chunk's
summary segments and kept-row segments are joined into one row of each. Checked against
references computed apart from it: the summary of the whole stored chunk at once
(`summarize`), the kept rows picked from the chunk by NumPy, `pack_rows` of all the rows,
and the overview of the same steps held as whole chunks in memory (`MemorySource`)."""
from __future__ import annotations

import numpy as np
import pytest

from gradwatch.server.storage import Store, create_schema, make_engine
from gradwatch.server.storage.chunk_rows import KEPT_WIDTH, KEY, SPEC, join_packed_rows, pack_rows, unpack_rows
from gradwatch.server.storage.chunks import BLOCK, CHUNK, Chunk, MemorySource, overview, series_from_arrays, summarize
from gradwatch.server.storage.compact import COMPACT_GROUP, COMPACT_SEGMENTS
from gradwatch.server.wire.models import Batch, Column

from tests.test_server_support import db_url_for
from tests.test_storage_summaries import same

FIELDS = ("pre_norm", "loss", "clipped", "spike", "time")


def columns_of(steps: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = len(steps)
    pre = np.exp(rng.normal(0.0, 0.3, n))
    pre[rng.choice(n, 40, replace=False)] = np.nan      # kept rows: non-finite norms...
    spike = np.zeros(n, bool)
    spike[rng.choice(n, 40, replace=False)] = True       # ...and flags on ordinary norms
    return {"pre_norm": pre, "loss": rng.normal(size=n), "spike": spike.astype(float),
            "clipped": (pre > 1.2).astype(float), "time": 1.7e9 + steps * 0.25}


def batch_of(steps: np.ndarray, columns: dict[str, np.ndarray], rows: np.ndarray) -> Batch:
    return Batch(steps[rows], {name: Column(values[rows]) for name, values in columns.items()})


def summary_segments(store: Store, run_id: int, width: int) -> dict[int, int]:
    """chunk id -> how many `width` rows (segments) it has in chunk_summaries."""
    return dict(store.reader.read("SELECT chunk_id, COUNT(*) FROM chunk_summaries WHERE run_id = ? AND width = ? "
                                  "GROUP BY chunk_id", (run_id, width)))


def memory_overview(steps: np.ndarray, columns: dict[str, np.ndarray], lo: int, hi: int, points: int):
    memory = MemorySource(SPEC, KEY)
    for chunk in series_from_arrays(steps, SPEC, {name: (values, np.zeros(len(steps), bool))
                                                  for name, values in columns.items()}):
        memory.put(chunk)
    return overview(memory, SPEC, lo, hi, points, FIELDS, key=KEY)


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_a_group_the_run_moved_past_is_read_from_one_summary_row_per_chunk(tmp_path, request, db):
    """300-step appends (chunks of 14 segments) over two groups and a bit: the chunks of the
    two passed groups have one summary row and one kept-rows row each, equal to the whole
    chunk's summary and kept rows; the group still written to keeps its segments. The
    overview equals that of whole chunks, before and after a late step lands in a joined chunk."""
    total = 2 * COMPACT_GROUP * CHUNK + 3000
    steps = np.delete(np.arange(total + 1), 5000)       # step 5000 comes late
    columns = columns_of(steps, seed=3)
    engine = make_engine(db_url_for(db, tmp_path, request))
    create_schema(engine)
    store = Store(engine)
    try:
        for start in range(0, len(steps), 300):
            store.ingest("run", batch_of(steps, columns, np.arange(start, min(start + 300, len(steps)))))
        run_id = store.run_id("run")
        passed = range(2 * COMPACT_GROUP)
        current = 2 * COMPACT_GROUP
        entries, kept = summary_segments(store, run_id, BLOCK), summary_segments(store, run_id, KEPT_WIDTH)
        assert all(entries[chunk_id] == 1 and kept[chunk_id] == 1 for chunk_id in passed), (entries, kept)
        assert entries[current] >= COMPACT_SEGMENTS     # not passed: still in segments
        with store.reader.snapshot() as cursor:
            chunks = store.reader.rows.load(cursor, run_id, list(passed))
            kept_rows = store.reader.rows.kept_rows(cursor, run_id, list(passed), tuple(SPEC))
            for chunk_id in passed:
                chunk = chunks[chunk_id]
                same(store.reader.rows.summaries_of(cursor, run_id, [chunk_id]), summarize(chunk, SPEC, KEY))
                pre, spike = chunk.values["pre_norm"], chunk.values["spike"]
                want = chunk.steps[~np.isfinite(pre) | (spike == 1.0)]
                assert kept_rows[chunk_id].steps.tolist() == want.tolist()
                np.testing.assert_array_equal(kept_rows[chunk_id].values["loss"],
                                              chunk.values["loss"][np.isin(chunk.steps, want)])
        for lo, hi, points in ((0, total, 80), (0, total, 500), (4000, 40000, 300), (4990, 5010, 100)):
            stored = store.reader.overview(run_id, lo, hi, points, FIELDS)
            expected = memory_overview(steps, columns, lo, hi, points)
            assert stored.steps.tolist() == expected.steps.tolist(), (lo, hi, points)
            for name in FIELDS:
                assert np.array_equal(stored.values[name], expected.values[name], equal_nan=True), name

        late = {name: np.array([np.nan if name == "pre_norm" else 0.5]) for name in columns}
        store.ingest("run", Batch(np.array([5000]), {name: Column(values) for name, values in late.items()}))
        all_steps = np.arange(total + 1)
        all_columns = {name: np.insert(values, 5000, late[name][0]) for name, values in columns.items()}
        for lo, hi, points in ((0, total, 80), (4990, 5010, 100)):
            stored = store.reader.overview(run_id, lo, hi, points, FIELDS)
            expected = memory_overview(all_steps, all_columns, lo, hi, points)
            assert stored.total == hi - lo + 1
            assert stored.steps.tolist() == expected.steps.tolist(), (lo, hi, points)
            assert np.array_equal(stored.values["pre_norm"], expected.values["pre_norm"], equal_nan=True)
        assert 5000 in stored.steps.tolist()   # 21 steps at 100 points: every one, the late one too
    finally:
        engine.dispose()


def test_chunks_of_few_segments_are_left_as_they_are(tmp_path):
    """2,000-step appends give chunks of 3 segments: below COMPACT_SEGMENTS, never joined."""
    steps = np.arange(COMPACT_GROUP * CHUNK * 2)
    columns = columns_of(steps, seed=4)
    engine = make_engine(f"sqlite:///{tmp_path / 'few.db'}")
    create_schema(engine)
    store = Store(engine)
    try:
        for start in range(0, len(steps), 2000):
            store.ingest("run", batch_of(steps, columns, np.arange(start, min(start + 2000, len(steps)))))
        entries = summary_segments(store, store.run_id("run"), BLOCK)
        assert COMPACT_SEGMENTS > 3 and max(entries.values()) == 3
        assert sum(count > 1 for count in entries.values()) > COMPACT_GROUP
    finally:
        engine.dispose()


def test_joined_kept_row_blobs_equal_packing_all_the_rows_at_once():
    rng = np.random.default_rng(5)
    steps = np.sort(rng.choice(CHUNK, 30, replace=False))
    chunk = Chunk(0, steps)
    for name in ("pre_norm", "loss", "spike"):
        chunk.values[name] = rng.normal(size=len(steps))
        chunk.valid[name] = None
    chunk.valid["loss"] = rng.random(len(steps)) < 0.7

    def part(rows: slice) -> Chunk:
        piece = Chunk(0, steps[rows])
        piece.values = {name: values[rows] for name, values in chunk.values.items()}
        piece.valid = {name: None if valid is None else valid[rows] for name, valid in chunk.valid.items()}
        return piece

    blobs = [pack_rows(part(slice(a, b))) for a, b in ((0, 9), (9, 10), (10, 30))]
    assert join_packed_rows(blobs) == pack_rows(chunk)
    other = part(slice(30, 30))
    other.values.pop("spike")
    assert join_packed_rows([blobs[0], pack_rows(other)]) is None   # other columns: left apart
    joined = unpack_rows(0, blobs, ("pre_norm", "loss"))
    assert joined.steps.tolist() == steps.tolist()


def test_a_summary_blob_that_does_not_decode_does_not_fail_the_batch_that_passes_it(tmp_path, caplog):
    """Joining is an optimisation: a broken blob leaves the group in segments and the batch
    that opened the next group is stored all the same (refused, the agent would resend it
    forever)."""
    steps = np.arange(COMPACT_GROUP * CHUNK + 600)
    columns = columns_of(steps, seed=6)
    engine = make_engine(f"sqlite:///{tmp_path / 'broken.db'}")
    create_schema(engine)
    store = Store(engine)
    try:
        boundary = COMPACT_GROUP * CHUNK
        for start in range(0, boundary, 300):
            store.ingest("run", batch_of(steps, columns, np.arange(start, min(start + 300, boundary))))
        run_id = store.run_id("run")
        with engine.begin() as connection:
            connection.exec_driver_sql("UPDATE chunk_summaries SET data = x'00' WHERE run_id = ? AND width = ? "
                                       "AND chunk_id = 2 AND seg = 3", (run_id, BLOCK))
        with caplog.at_level("WARNING", logger="gradwatch.server"):
            result = store.ingest("run", batch_of(steps, columns, np.arange(boundary, len(steps))))
        assert result.accepted == 600 and store.reader.read("SELECT last_step FROM runs")[0][0] == len(steps) - 1
        assert "not joined" in caplog.text
        assert summary_segments(store, run_id, BLOCK)[0] > 1      # the group left in segments
    finally:
        engine.dispose()

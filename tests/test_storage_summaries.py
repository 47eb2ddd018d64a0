"""Summaries kept up to date at ingest: batches appended one after another (each append a
segment with its own summary entries, a block a batch boundary cuts in two merged when read),
late steps and chunk boundaries leave every chunk's summary as read equal to summarising the
stored chunk afresh (the float sums up to their last bits, added in another order), and that
to NumPy per block."""
from __future__ import annotations

import numpy as np

from gradwatch.server.storage.chunks import BLOCK, CHUNK, summarize
from gradwatch.server.storage import Store, create_schema, make_engine
from gradwatch.server.storage.chunk_rows import KEY, SPEC
from gradwatch.server.wire.models import Batch, Column


def make_batch(steps: np.ndarray, rng) -> Batch:
    n = len(steps)
    pre = np.exp(rng.normal(0.0, 1.0, n))
    pre[rng.random(n) < 0.02] = np.nan
    pre[rng.random(n) < 0.02] = np.inf
    loss = rng.normal(size=n)
    loss_missing = rng.random(n) < 0.1
    loss[loss_missing] = np.nan
    clipped = (pre > 2.0).astype(float)
    clipped_missing = rng.random(n) < 0.05
    clipped[clipped_missing] = np.nan
    return Batch(np.asarray(steps, np.int64), {
        "pre_norm": Column(pre), "loss": Column(loss, loss_missing),
        "clipped": Column(clipped, clipped_missing), "spike": Column((pre > 5.0).astype(float)),
        "time": Column(1.7e9 + np.asarray(steps, float) * 0.25)})


def stored_summaries(store: Store, run_id: int) -> dict[int, object]:
    """Each stored chunk's summary as reads see it (its segments' entries, split blocks merged)."""
    ids = [row[0] for row in store.reader.read("SELECT DISTINCT chunk_id FROM chunk_summaries WHERE run_id = ?",
                                               (run_id,))]
    with store.reader.snapshot() as cursor:
        return {chunk_id: store.reader.rows.summaries_of(cursor, run_id, [chunk_id]) for chunk_id in ids}


def segment_rows(store: Store, run_id: int) -> int:
    return store.reader.read("SELECT COUNT(*) FROM chunk_summaries WHERE run_id = ? AND width = ? AND seg > 0",
                             (run_id, BLOCK))[0][0]


def same(a, b) -> None:
    def bits(x):
        x = np.asarray(x)
        return x.view(np.uint64).tolist() if x.dtype == np.float64 else x.tolist()

    for name in ("start", "rows", "first", "last"):
        assert bits(getattr(a, name)) == bits(getattr(b, name)), name
    for name in a.nums:
        for field in ("count", "nan", "inf", "min", "min_step", "max", "max_step"):
            assert bits(getattr(a.nums[name], field)) == bits(getattr(b.nums[name], field)), (name, field)
        for field in ("sum", "sumsq"):   # a block split across segments adds its two halves' sums
            assert np.allclose(getattr(a.nums[name], field), getattr(b.nums[name], field), rtol=1e-13, atol=0,
                               equal_nan=True), (name, field)
    for name in a.flags:
        assert bits(a.flags[name].true) == bits(b.flags[name].true), name
        assert bits(a.flags[name].valid) == bits(b.flags[name].valid), name
    for side in ("at_min", "at_max"):
        for name, (values, ok) in getattr(a, side).items():
            other_values, other_ok = getattr(b, side)[name]
            assert ok.tolist() == other_ok.tolist(), (side, name)
            assert bits(values[ok]) == bits(other_values[other_ok]), (side, name)


def test_appended_batches_keep_each_chunk_summary_equal_to_a_fresh_one(tmp_path):
    rng = np.random.default_rng(7)
    engine = make_engine(f"sqlite:///{tmp_path / 'summaries.db'}")
    create_schema(engine)
    store = Store(engine)
    try:
        start = 0
        sizes = [700, 1, 63, 64, 65, 2000, 3000, 129, 4096, 10]  # across blocks and chunks
        for size in sizes:
            store.ingest("run", make_batch(np.arange(start, start + size), rng))
            start += size
        late = np.array([start + 5000, start + 5003])           # a gap, then steps into it
        store.ingest("run", make_batch(late, rng))
        store.ingest("run", make_batch(np.array([start + 4999, start + 5001, start + 5002]), rng))
        run_id = store.run_id("run")
        assert segment_rows(store, run_id) >= 3   # appends wrote segments of their own
        summaries = stored_summaries(store, run_id)
        with store.reader.snapshot() as cursor:
            chunks = store.reader.rows.load(cursor, run_id, sorted(summaries))
        assert sorted(summaries) == sorted(chunks) == list(range(int(late.max()) // CHUNK + 1))
        for chunk_id, chunk in chunks.items():
            fresh = summarize(chunk, SPEC, KEY)
            same(summaries[chunk_id], fresh)
            # and against NumPy on the chunk's pre-norms, block by block
            pre = chunk.values["pre_norm"]
            blocks = chunk.steps // BLOCK
            for entry, block in enumerate(np.unique(blocks).tolist()):
                rows = blocks == block
                finite = pre[rows][np.isfinite(pre[rows])]
                s = summaries[chunk_id].nums["pre_norm"]
                assert s.count[entry] == len(finite) and s.nan[entry] == np.isnan(pre[rows]).sum()
                if len(finite):
                    assert s.min[entry] == finite.min() and s.max[entry] == finite.max()
                    assert s.min_step[entry] == chunk.steps[rows][np.flatnonzero(pre[rows] == finite.min())[0]]
    finally:
        engine.dispose()


def test_kept_rows_round_trip_and_the_schema_6_layout_still_reads():
    """`pack_rows` -> `unpack_rows`: every column's values and nulls back as they were (NaN,
    +-Inf, bools, a column null in every row read back as null); a blob in the layout schemas 5
    and 6 wrote (an array per column) reads the same, and so do a chunk's segments, of one
    layout or of both, unpacked together."""
    from gradwatch.server.storage.chunk_rows import pack_rows, unpack_rows
    from gradwatch.server.storage.chunks import Chunk
    from gradwatch.server.storage.chunks.codec import pack_arrays

    steps = np.array([4100, 4105, 4170, 5000], np.int64)
    values = {"pre_norm": np.array([np.nan, np.inf, 3.5, -np.inf]), "loss": np.array([1.0, np.nan, 2.0, 0.0]),
              "spike": np.array([True, False, True, False]), "lr": np.array([np.nan] * 4)}
    valid = {"pre_norm": None, "loss": np.array([True, False, True, True]), "spike": np.array([True, True, False, True]),
             "lr": np.zeros(4, bool)}
    chunk = Chunk(1, steps, values, valid)
    old_layout = {"step": steps}
    for name in values:
        old_layout["v:" + name] = values[name]
        if valid[name] is not None:
            old_layout["m:" + name] = valid[name]
    columns = ("pre_norm", "loss", "spike", "lr", "z")

    def half(rows: slice) -> Chunk:
        return Chunk(1, steps[rows], {n: v[rows] for n, v in values.items()},
                     {n: (None if ok is None else ok[rows]) for n, ok in valid.items()})

    segments = [pack_rows(half(slice(0, 1))), pack_rows(half(slice(1, 4)))]   # loss all valid in the first
    mixed = [pack_arrays({"step": steps[:2], **{k: v[:2] for k, v in old_layout.items() if k != "step"}}),
             pack_rows(half(slice(2, 4)))]
    uneven = [pack_rows(half(slice(0, 1))), pack_rows(half(slice(1, 2))), pack_rows(half(slice(2, 4)))]   # loss: no row in the 2nd
    for blob in (pack_rows(chunk), pack_arrays(old_layout), segments, mixed, uneven):
        back = unpack_rows(1, blob, columns)
        assert back.steps.tolist() == steps.tolist()
        assert np.array_equal(back.values["pre_norm"], values["pre_norm"], equal_nan=True)
        assert back.valid["pre_norm"] is None
        assert back.valid["loss"].tolist() == [True, False, True, True]
        assert back.values["loss"][[0, 2, 3]].tolist() == [1.0, 2.0, 0.0]
        assert back.values["spike"].dtype == bool and back.values["spike"].tolist() == [True, False, True, False]
        assert back.valid["spike"].tolist() == [True, True, False, True]
        for null in ("lr", "z"):   # null in every row, and never stored
            assert not back.valid[null].any() and np.isnan(back.values[null]).all()


def test_overview_of_appended_segments_equals_the_overview_of_whole_chunks(tmp_path):
    """A run stored in 300-step appends (chunks of up to 14 segments, each with its summary
    entries and kept rows) gives, at every width the overview uses, the same series as the
    same steps held as whole chunks in memory (`MemorySource`, one summary per chunk): every
    spike and non-finite step kept, min and max per bucket, the values beside them."""
    from gradwatch.server.storage.chunks import MemorySource, overview, series_from_arrays

    rng = np.random.default_rng(21)
    engine = make_engine(f"sqlite:///{tmp_path / 'segments.db'}")
    create_schema(engine)
    store = Store(engine)
    try:
        total = 3 * CHUNK + 1000
        pre = np.exp(rng.normal(0.0, 0.3, total))
        pre[rng.choice(total, 12, replace=False)] = np.nan          # kept rows: a few non-finite norms...
        spike = np.zeros(total, bool)
        spike[rng.choice(total, 12, replace=False)] = True           # ...and flags on ordinary norms
        loss = rng.normal(size=total)

        def batch_of(rows: slice) -> Batch:
            return Batch(np.arange(total)[rows], {"pre_norm": Column(pre[rows]), "loss": Column(loss[rows]),
                                                  "spike": Column(spike[rows].astype(float)),
                                                  "clipped": Column((pre[rows] > 1.2).astype(float)),
                                                  "time": Column(1.7e9 + np.arange(total)[rows] * 0.25)})

        batches = [batch_of(slice(start, min(start + 300, total))) for start in range(0, total, 300)]
        for batch in batches:
            store.ingest("run", batch)
        run_id = store.run_id("run")
        assert store.reader.read("SELECT MAX(seg) FROM chunk_summaries WHERE run_id = ?", (run_id,))[0][0] >= 10
        steps = np.concatenate([batch.steps for batch in batches])
        columns = {name: (np.concatenate([batch.columns[name].values for batch in batches]),
                          np.concatenate([batch.columns[name].missing if batch.columns[name].missing is not None
                                          else np.zeros(len(batch), bool) for batch in batches]))
                   for name in batches[0].columns}
        memory = MemorySource(SPEC, KEY)
        for chunk in series_from_arrays(steps, SPEC, columns):
            memory.put(chunk)
        fields = ("pre_norm", "loss", "clipped", "spike", "time")
        for lo, hi, points in ((0, total - 1, 60), (0, total - 1, 400), (700, 9000, 300), (100, 250, 1000)):
            stored = store.reader.overview(run_id, lo, hi, points, fields)
            expected = overview(memory, SPEC, lo, hi, points, fields, key=KEY)
            kept = np.flatnonzero((np.isnan(pre) | spike)[lo:hi + 1]) + lo
            assert set(kept.tolist()) <= set(stored.steps.tolist()), (lo, hi, points)
            assert stored.steps.tolist() == expected.steps.tolist(), (lo, hi, points)
            for name in fields:
                assert np.array_equal(stored.values[name], expected.values[name], equal_nan=True), name
    finally:
        engine.dispose()

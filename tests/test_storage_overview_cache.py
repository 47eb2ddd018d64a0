"""The overview read through the run cache (decoded summaries, kept rows and edge chunks held
per run version) equals the overview read cold, before and after appends, a late step into
an old chunk, and a new chunk; entries are refreshed by the chunks written since, and held
within the cache's byte budget."""
from __future__ import annotations

import numpy as np
import pytest

from gradwatch.server.storage.chunks import CHUNK
from gradwatch.server.storage import Store, create_schema, make_engine
from tests.test_storage_summaries import Batch, Column

FIELDS = ("pre_norm", "post_norm", "threshold", "clipped", "loss", "spike", "nonfinite")


def make_batch(steps, rng) -> Batch:
    steps = np.asarray(steps, np.int64)
    n = len(steps)
    pre = np.exp(rng.normal(0.0, 0.4, n))
    pre[rng.random(n) < 0.003] *= 40.0
    pre[rng.random(n) < 0.001] = np.nan
    loss = rng.normal(size=n)
    loss_missing = rng.random(n) < 0.05
    loss[loss_missing] = np.nan
    threshold = np.full(n, 1.5)
    return Batch(steps, {
        "pre_norm": Column(pre), "post_norm": Column(np.minimum(pre, threshold)),
        "threshold": Column(threshold), "clipped": Column((pre > threshold).astype(float)),
        "loss": Column(loss, loss_missing), "spike": Column((pre > 10).astype(float)),
        "nonfinite": Column((~np.isfinite(pre)).astype(float))})


def same_series(a, b) -> None:
    assert a.total == b.total
    assert a.steps.tolist() == b.steps.tolist()
    for name in FIELDS:
        assert np.array_equal(a.values[name], b.values[name], equal_nan=True), name
        ma, mb = a.missing[name], b.missing[name]
        assert (ma is None) == (mb is None) and (ma is None or ma.tolist() == mb.tolist()), name


READS = [(None, None, 2000), (None, None, 300), (None, None, 40), (5000, 40000, 500), (12345, 12999, 100)]


@pytest.fixture
def stores(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'overview.db'}")
    create_schema(engine)
    cached, cold = Store(engine, cache_mb=64), Store(engine)
    yield cached, cold
    engine.dispose()


def check(cached: Store, cold: Store, run_id: int) -> None:
    for start, end, points in READS:
        for _ in range(2):   # the second read comes from the entry the first one filled
            warm = cached.overview(run_id, start, end, points, FIELDS)
            fresh = cold.reader.overview(run_id, start, end, points, FIELDS)   # no cache at all
            same_series(warm, fresh)


def test_cached_overview_equals_the_cold_one_after_appends_and_late_steps(stores):
    cached, cold = stores
    rng = np.random.default_rng(3)
    for begin in range(0, 60_000, 2000):
        cached.ingest("run", make_batch(np.arange(begin, begin + 2000, 3), rng))   # gaps: late steps fit
    run_id = cached.run_id("run")
    check(cached, cold, run_id)
    entry = cached.cache.overview_entry(run_id, cached.reader.run_version(run_id)[1])
    assert entry is not None and entry.levels and entry.kept
    widths = set(entry.levels)

    cached.ingest("run", make_batch(np.arange(60_000, 61_000), rng))              # an append
    check(cached, cold, run_id)
    cached.ingest("run", make_batch([1, 2, 4 * CHUNK + 1, 4 * CHUNK + 2], rng))    # late steps, old chunks
    check(cached, cold, run_id)
    cached.ingest("run", make_batch(np.arange(70 * CHUNK, 70 * CHUNK + 500), rng))  # a new chunk past a gap
    check(cached, cold, run_id)
    version = cached.reader.run_version(run_id)
    entry = cached.cache.overview_entry(run_id, version[1])
    assert entry.version == version[0] and set(entry.levels) >= widths   # refreshed, not read again
    assert cached.cache.held_bytes <= cached.cache.max_bytes


def test_an_entry_over_the_budget_is_not_kept_and_answers_the_same(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'tiny.db'}")
    create_schema(engine)
    try:
        tiny, cold = Store(engine, cache_mb=0.01), Store(engine)
        rng = np.random.default_rng(5)
        for begin in range(0, 30_000, 2000):
            tiny.ingest("run", make_batch(np.arange(begin, begin + 2000), rng))
        run_id = tiny.run_id("run")
        check(tiny, cold, run_id)
        assert tiny.cache.held_bytes <= tiny.cache.max_bytes
        assert tiny.cache.overview_entry(run_id, tiny.reader.run_version(run_id)[1]) is None
    finally:
        engine.dispose()

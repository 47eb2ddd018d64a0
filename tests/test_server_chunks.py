"""Chunked storage through a real server (SQLite and PostgreSQL): chunk boundaries, late
steps, duplicates and conflicts inside a chunk, NaN/Inf/null, float32 or float64 per
column, the stored summaries against NumPy, and two writers on one run."""
from __future__ import annotations

import csv
import io
import math

import httpx
import numpy as np
import pytest
from sqlalchemy import create_engine, text

from gradwatch.server.storage.chunks import BLOCK, CHUNK, column_storage, decode_summaries
from gradwatch.server.wire import parse_batch
from gradwatch.server.storage import Store, create_schema, make_engine, normalize_url
from tests.test_server_support import db_url_for, post, start_server

SPELLED = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


@pytest.fixture(params=["sqlite", "postgresql"])
def served(request, tmp_path):
    url = db_url_for(request.param, tmp_path, request)
    server = start_server(url, tmp_path)
    yield url, server
    server.stop()


def rows_of(db_url: str, sql: str, params: dict | None = None) -> list[tuple]:
    engine = create_engine(normalize_url(db_url))
    with engine.connect() as connection:
        rows = connection.execute(text(sql), params or {}).fetchall()
    engine.dispose()
    return rows


def batch_of(steps, pre, loss=None) -> dict:
    body = {"step": list(steps), "pre_norm": list(pre)}
    if loss is not None:
        body["loss"] = list(loss)
    return body


def as_float(value):
    if value is None:
        return None
    return (SPELLED[value] if value in SPELLED else float(value)) if isinstance(value, str) else float(value)


def same(a, b) -> bool:
    a, b = as_float(a), as_float(b)
    return a is None and b is None or (a is not None and b is not None and
                                       (a == b or math.isnan(a) and math.isnan(b)))


def test_batches_across_chunks_late_steps_duplicates_and_conflicts(served):
    url, server = served
    rng = np.random.default_rng(0)
    sent: dict[int, tuple] = {}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        # one batch spanning three chunks, with NaN, +-Inf and missing values
        steps = list(range(CHUNK - 50, 2 * CHUNK + 30))
        pre = [float(v) for v in np.exp(rng.normal(size=len(steps)))]
        pre[3], pre[60], pre[61] = "NaN", "Infinity", "NaN"
        loss = [float(v) for v in rng.normal(size=len(steps))]
        loss[4], loss[70] = None, "-Infinity"
        answer = post(client, "c", batch_of(steps, pre, loss)).json()
        assert answer == {"accepted": len(steps), "duplicates": 0, "conflicts": 0}
        sent.update({s: (p, l) for s, p, l in zip(steps, pre, loss)})
        # late steps into the first chunk (before everything stored), one more past the end
        late = [7, 11, 5 * CHUNK + 1]
        answer = post(client, "c", batch_of(late, [0.25, 0.5, 0.75], [1.0, None, 2.0])).json()
        assert answer["accepted"] == 3
        sent.update({7: (0.25, 1.0), 11: (0.5, None), 5 * CHUNK + 1: (0.75, 2.0)})
        # inside one chunk: an equal resend (duplicate), a different one (conflict), a new step
        resend = [CHUNK + 10, CHUNK + 11, 2 * CHUNK + 100]
        index = {s: i for i, s in enumerate(steps)}
        values = [pre[index[CHUNK + 10]], 99.0, 1.5]
        losses = [loss[index[CHUNK + 10]], loss[index[CHUNK + 11]], None]
        answer = post(client, "c", batch_of(resend, values, losses)).json()
        assert answer == {"accepted": 1, "duplicates": 1, "conflicts": 1}
        sent[2 * CHUNK + 100] = (1.5, None)
        conflicts = client.get("/api/runs/c/events", params={"kind": "conflict"}).json()
        assert [(e["step"], e["detail"]["fields"]) for e in conflicts] == [(CHUNK + 11, ["pre_norm"])]
        series = client.get("/api/runs/c/series", params={"fields": "pre_norm,loss", "points": 100_000}).json()
        exported = list(csv.DictReader(io.StringIO(client.get("/api/runs/c/export.csv").text)))
    assert [int(row["step"]) for row in exported] == sorted(sent)   # streamed chunk by chunk
    for row in exported:
        assert same(row["pre_norm"], sent[int(row["step"])][0]) and \
            same(row["loss"] or None, sent[int(row["step"])][1]), row
    assert series["step"] == sorted(sent)
    for position, step in enumerate(series["step"]):
        assert same(series["pre_norm"][position], sent[step][0]), step
        assert same(series["loss"][position], sent[step][1]), step
    chunk_rows = dict(rows_of(url, "SELECT chunk_id, n FROM chunks"))
    expected = {}
    for step in sent:
        expected[step // CHUNK] = expected.get(step // CHUNK, 0) + 1
    assert chunk_rows == expected


def test_float32_only_where_exact_and_summaries_equal_numpy(served):
    url, server = served
    rng = np.random.default_rng(1)
    steps = np.sort(rng.choice(3 * CHUNK, 5000, replace=False))
    pre32 = rng.lognormal(size=len(steps)).astype(np.float32).astype(np.float64)   # exact in float32
    loss64 = rng.normal(size=len(steps))                                             # not
    pre32[[10, 20]] = [np.nan, np.inf]
    body = {"step": steps.tolist(), "pre_norm": [("NaN" if v != v else "Infinity" if v == np.inf else v)
                                                 for v in pre32.tolist()],
            "loss": loss64.tolist(), "clipped": (pre32 > 1.5).tolist()}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        assert post(client, "s", body).json()["accepted"] == len(steps)
    stored = rows_of(url, "SELECT name, chunk_id, data FROM chunk_columns")
    kinds = {(name, chunk_id): column_storage(bytes(data)) for name, chunk_id, data in stored}
    for chunk_id in range(3):
        assert kinds[("pre_norm", chunk_id)] == "float32"
        assert kinds[("loss", chunk_id)] == "float64"
        assert kinds[("clipped", chunk_id)] == "bool"
        assert ("lr", chunk_id) not in kinds    # never sent: no row (read back as null)
    blobs = [bytes(row[0]) for row in rows_of(url, "SELECT data FROM chunk_summaries WHERE width = 64 ORDER BY chunk_id")]
    summary = decode_summaries(blobs)
    blocks = steps // BLOCK
    assert summary.start.tolist() == (np.unique(blocks) * BLOCK).tolist()
    for entry, block in enumerate(np.unique(blocks).tolist()):
        inside = blocks == block
        pre, loss = pre32[inside], loss64[inside]
        finite = np.isfinite(pre)
        nums = summary.nums["pre_norm"]
        assert summary.rows[entry] == inside.sum()
        assert nums.count[entry] == finite.sum() and nums.nan[entry] == np.isnan(pre).sum()
        assert nums.inf[entry] == np.isinf(pre).sum()
        assert nums.min[entry] == pre[finite].min() and nums.max[entry] == pre[finite].max()
        assert nums.min_step[entry] == steps[inside][finite][np.argmin(pre[finite])]
        assert nums.sum[entry] == pytest.approx(pre[finite].sum(), rel=1e-12)
        assert summary.nums["loss"].sumsq[entry] == pytest.approx((loss ** 2).sum(), rel=1e-12)
        assert summary.flags["clipped"].true[entry] == (pre > 1.5).sum()


def test_two_writers_on_one_run_keep_each_others_steps(tmp_path, request):
    """Two stores (as two server processes) append to one run in turns: each one's kept
    tail chunk is stale after the other wrote, and must be read again, not reused."""
    url = db_url_for("sqlite", tmp_path, request)
    engines = [make_engine(url), make_engine(url)]
    create_schema(engines[0])
    stores = [Store(engine) for engine in engines]
    rng = np.random.default_rng(2)
    sent = {}
    for turn in range(8):
        steps = np.arange(turn * 500, turn * 500 + 500)
        pre = rng.lognormal(size=500)
        sent.update(zip(steps.tolist(), pre.tolist()))
        answer = stores[turn % 2].ingest("w", parse_batch({"step": steps.tolist(), "pre_norm": pre.tolist()}))
        assert answer.accepted == 500
    for store in stores:
        arrays = store.arrays("w", ("pre_norm",))
        assert arrays.steps.tolist() == sorted(sent)
        assert arrays.values["pre_norm"].tolist() == [sent[s] for s in sorted(sent)]
    for engine in engines:
        engine.dispose()


@pytest.mark.parametrize("lo,hi,points", [(None, None, 2000), (1000, 70_000, 500), (4095, 4096 * 9 + 7, 300),
                                          (30_000, 30_100, 50)])
def test_the_overview_from_the_database_equals_the_reference(tmp_path, lo, hi, points):
    """Stored in shuffled batches (late steps everywhere), read back through `Reader.overview`:
    the rows equal an independent per-bucket loop, and only the range's edge chunks are
    decoded (the spikes and non-finite steps come from the rows kept beside the summaries)."""
    from tests.test_chunks_summaries import reference_overview

    rng = np.random.default_rng(3)
    steps = np.sort(rng.choice(80_000, 60_000, replace=False))
    pre = np.exp(rng.normal(0.0, 0.3, len(steps)))
    pre[rng.choice(len(steps), 40, replace=False)] *= 50.0
    pre[rng.choice(len(steps), 4, replace=False)] = [np.nan, np.inf, np.inf, np.nan]
    spike = pre > 20
    engine = make_engine(f"sqlite:///{tmp_path / 'o.db'}")
    create_schema(engine)
    store = Store(engine)
    order = rng.permutation(len(steps))
    spelled = {math.inf: "Infinity", -math.inf: "-Infinity"}
    for part in np.array_split(order, 12):
        part = np.sort(part)
        store.ingest("o", parse_batch({
            "step": steps[part].tolist(),
            "pre_norm": ["NaN" if v != v else spelled.get(v, v) for v in pre[part].tolist()],
            "spike": spike[part].tolist(), "nonfinite": (~np.isfinite(pre[part])).tolist()}))
    series = store.reader.overview(store.run_id("o"), lo, hi, points, ("pre_norm", "spike"))
    first, last = (0 if lo is None else lo), (int(steps[-1]) if hi is None else hi)
    keep = spike | ~np.isfinite(pre)
    assert series.steps.tolist() == reference_overview(steps, pre, keep, max(first, int(steps[0])), last, points)
    edges = {max(first, int(steps[0])) // CHUNK, last // CHUNK}
    assert set(series.decoded) <= edges, series.decoded
    np.testing.assert_array_equal(series.values["pre_norm"], pre[np.searchsorted(steps, series.steps)])
    engine.dispose()


def test_the_recommendation_reads_the_runs_tail_and_answers_as_for_the_whole_run(tmp_path):
    """A long run's recommendation reads the newest chunks only; the answer must be the rule's
    answer on the whole run's arrays (default window, an explicit one, a target rate)."""
    from fastapi.testclient import TestClient

    from gradwatch.server.analysis import stats
    from gradwatch.server.app.factory import create_app
    from gradwatch.server.app.settings import Settings

    rng = np.random.default_rng(4)
    n = 30_000
    pre = np.exp(rng.normal(0.0, 0.3, n))
    pre[rng.choice(n, 30, replace=False)] *= 40.0
    threshold = np.where(np.arange(n) < 20_000, 1.0, 2.0)
    with TestClient(create_app(Settings(db_url=f"sqlite:///{tmp_path / 'r.db'}")),
                    base_url="http://localhost") as client:
        for begin in range(0, n, 5000):
            part = slice(begin, begin + 5000)
            assert post(client, "long", {"step": list(range(begin, min(begin + 5000, n))),
                                         "pre_norm": pre[part].tolist(),
                                         "threshold": threshold[part].tolist()}).status_code == 200
        for params in ({}, {"window": 1000}, {"target_clip_rate": 0.01}):
            got = client.get("/api/runs/long/recommendation", params=params).json()
            expected = stats.recommend(np.arange(n), pre, threshold, window=params.get("window"),
                                       target_clip_rate=params.get("target_clip_rate"))
            assert got == json_round_trip(expected), params
            assert got["current_threshold"] == 2.0


def json_round_trip(value):
    import json

    return json.loads(json.dumps(value))


def test_per_step_tensor_norms_across_chunks_and_layouts(tmp_path):
    """`Reader.tensor_steps` (the grouped heatmap's input): every step's norms in first-seen
    name order, a tensor a step did not report marked absent, across chunks and a layout
    that grew mid-run; compared with the values sent."""
    engine = make_engine(f"sqlite:///{tmp_path / 't.db'}")
    create_schema(engine)
    store = Store(engine)
    rng = np.random.default_rng(6)
    first = np.arange(CHUNK - 100, CHUNK + 100)
    a = rng.random((len(first), 2)).astype(np.float32)
    store.ingest("t", parse_batch({"step": first.tolist(), "pre_norm": [1.0] * len(first),
                                   "tensor_norms": {"names": ["x", "y"], "norms": a.tolist()}}))
    later = np.arange(3 * CHUNK, 3 * CHUNK + 50)
    b = rng.random((len(later), 3)).astype(np.float32)
    store.ingest("t", parse_batch({"step": later.tolist(), "pre_norm": [1.0] * len(later),
                                   "tensor_norms": {"names": ["y", "z", "x"], "norms": b.tolist()}}))
    names, steps, norms, absent = store.reader.tensor_steps(store.run_id("t"), CHUNK - 50, None)
    assert names == ["x", "y", "z"]
    keep = first >= CHUNK - 50
    assert steps.tolist() == first[keep].tolist() + later.tolist()
    n = int(keep.sum())
    np.testing.assert_array_equal(norms[:n, :2], a[keep])
    assert absent[:n, 2].all() and not absent[:n, :2].any()
    np.testing.assert_array_equal(norms[n:], b[:, [2, 0, 1]])
    assert not absent[n:].any()
    engine.dispose()


@pytest.mark.parametrize("level", ["block", "module", "tensor"])
def test_grouped_tensors_streamed_by_chunk_equal_the_whole_matrix(tmp_path, level):
    """`/tensors?group=` reduces each stored chunk to its groups as it is read: each step's
    group norm must be the L2 of its members' sent norms (NumPy, from the values sent), and
    the answer the one computed from the whole per-step matrix, a layout growing mid-run
    included."""
    from gradwatch.server.analysis import tensor_groups

    engine = make_engine(f"sqlite:///{tmp_path / 'g.db'}")
    create_schema(engine)
    store = Store(engine)
    rng = np.random.default_rng(7)
    small = ["layers.0.mlp.up.weight", "layers.0.attn.q.weight", "layers.1.mlp.up.weight"]
    grown = small + ["layers.1.attn.q.weight", "norm.weight"]
    sent: dict[int, dict[str, float]] = {}
    for begin, names in ((0, small), (3 * CHUNK // 2, grown), (3 * CHUNK, list(reversed(grown)))):
        steps = np.arange(begin, begin + 3 * CHUNK // 2)
        norms = np.exp(rng.normal(size=(len(steps), len(names)))).astype(np.float32)
        norms[rng.choice(len(steps), 5), 0] *= 50
        store.ingest("g", parse_batch({"step": steps.tolist(), "pre_norm": [1.0] * len(steps),
                                       "tensor_norms": {"names": names, "norms": norms.tolist()}}))
        for row, step in enumerate(steps.tolist()):
            sent[step] = dict(zip(names, norms[row].tolist()))
    run_id = store.run_id("g")
    plan, steps, values, missing = tensor_groups.streamed_groups(
        store.reader.iter_tensor_steps(run_id, None, None), level)
    assert steps.tolist() == sorted(sent)
    for column, members in enumerate(plan.members):
        reported = [[sent[s][m] for m in members if m in sent[s]] for s in steps.tolist()]
        expected = np.array([np.sqrt(np.sum(np.square(np.float32(r)))) if r else np.nan for r in reported])
        assert missing[:, column].tolist() == [not r for r in reported]
        np.testing.assert_allclose(values[~missing[:, column], column], expected[~missing[:, column]], rtol=1e-6)
    streamed = json_round_trip(tensor_groups.orjson.loads(
        tensor_groups.grouped_json(store, run_id, None, None, level, 300)))
    whole = tensor_groups.grouped_answer(*store.reader.tensor_steps(run_id, None, None), level, 300)
    assert streamed == json_round_trip(tensor_groups.orjson.loads(tensor_groups.encode_answer(whole)))
    assert sum(streamed["spikes"]) >= 1   # the answer holds spikes to compare
    engine.dispose()


def test_appends_become_segments_and_a_late_step_rewrites_the_chunk(served):
    """Small appends to one chunk are stored as segments (never a rewrite), at most
    MAX_SEGMENTS of them; a step landing inside the chunk rewrites it as one segment.
    Every read sees the chunk whole throughout."""
    from gradwatch.server.storage.chunk_rows import MAX_SEGMENTS

    url, server = served
    rng = np.random.default_rng(8)
    sent: dict[int, float] = {}

    def segments() -> int:
        return rows_of(url, "SELECT segments FROM chunks WHERE chunk_id = 0")[0][0]

    def stored_segments() -> int:
        return rows_of(url, "SELECT COUNT(DISTINCT seg) FROM chunk_columns WHERE chunk_id = 0")[0][0]

    with httpx.Client(base_url=server.url, timeout=60) as client:
        seen = []
        for batch in range(MAX_SEGMENTS + 2):
            steps = list(range(batch * 200, batch * 200 + 200, 2))   # even steps only, appended
            values = rng.lognormal(size=len(steps)).tolist()
            sent.update(zip(steps, values))
            assert post(client, "seg", batch_of(steps, values)).json()["accepted"] == len(steps)
            seen.append(segments())
            assert stored_segments() == seen[-1]
            got = client.get("/api/runs/seg/series", params={"fields": "pre_norm", "points": 100_000}).json()
            assert got["step"] == sorted(sent) and got["pre_norm"] == [sent[s] for s in sorted(sent)]
        # the first batch writes the chunk, the next ones add a segment each, up to the cap
        assert seen[:MAX_SEGMENTS] == list(range(1, MAX_SEGMENTS + 1)) and seen[MAX_SEGMENTS] == 1
        late = [101, 103]                                          # odd: inside the chunk
        assert post(client, "seg", batch_of(late, [7.0, 8.0])).json()["accepted"] == 2
        sent.update({101: 7.0, 103: 8.0})
        assert segments() == 1 and stored_segments() == 1
        got = client.get("/api/runs/seg/series", params={"fields": "pre_norm", "points": 100_000}).json()
        assert got["step"] == sorted(sent) and got["pre_norm"] == [sent[s] for s in sorted(sent)]
        stats = client.get("/api/runs/seg/stats").json()
        assert stats["count"] == len(sent)
        np.testing.assert_allclose(stats["percentiles"]["p50"], np.percentile(list(sent.values()), 50))


def test_tensor_norms_in_segments_read_back_whole(tmp_path):
    """Small batches add tensor segments (and an eighth rewrites the chunk), late steps and a
    layout change included: the per-step norms and the bucketed heatmap equal the values sent."""
    from gradwatch.server.storage.chunk_rows import MAX_SEGMENTS

    engine = make_engine(f"sqlite:///{tmp_path / 'ts.db'}")
    create_schema(engine)
    store = Store(engine)
    rng = np.random.default_rng(9)
    sent: dict[int, dict[str, float]] = {}
    batches = [np.arange(b * 100, b * 100 + 100, 2) for b in range(MAX_SEGMENTS + 3)]   # even steps
    batches.append(np.arange(1, 200, 2))                                                 # late odd steps
    for index, steps in enumerate(batches):
        names = ["a", "b"] if index < 4 else ["b", "c", "a"]
        norms = rng.random((len(steps), len(names))).astype(np.float32)
        store.ingest("ts", parse_batch({"step": steps.tolist(), "pre_norm": [1.0] * len(steps),
                                        "tensor_norms": {"names": names, "norms": norms.tolist()}}))
        for row, step in enumerate(steps.tolist()):
            sent[step] = dict(zip(names, norms[row].tolist()))
    segments = store.read("SELECT COUNT(*) FROM tensor_chunks")[0][0]
    assert 1 <= segments < MAX_SEGMENTS
    names, steps, norms, absent = store.reader.tensor_steps(store.run_id("ts"), None, None)
    assert steps.tolist() == sorted(sent) and names == ["a", "b", "c"]
    for row, step in enumerate(steps.tolist()):
        for column, name in enumerate(names):
            if name in sent[step]:
                assert not absent[row, column] and norms[row, column] == np.float32(sent[step][name])
            else:
                assert absent[row, column]
    heat_names, labels, heat, heat_absent = store.tensor_norms(store.run_id("ts"), None, None, 50)
    order = sorted(sent)
    for bucket, label in enumerate(labels.tolist()):
        end = labels[bucket + 1] if bucket + 1 < len(labels) else order[-1] + 1
        inside = [s for s in order if label <= s < end]
        for column, name in enumerate(heat_names):
            values = [sent[s][name] for s in inside if name in sent[s]]
            if values:
                assert heat[bucket, column] == np.float32(max(values))
            else:
                assert heat_absent[bucket, column]
    engine.dispose()

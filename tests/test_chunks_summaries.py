"""Summaries against NumPy on the raw values; combining; the summary-based overview against
today's `stats.downsample_indices` and an independent per-bucket loop; tensor heatmaps."""
from __future__ import annotations

import math

import numpy as np
import pytest

from gradwatch.server.storage.chunks import (BLOCK, CHUNK, MemorySource, bucket_grid, combine, concat,
                                             decode_summary, decode_tensor_summary, decode_tensors,
                                             encode_summary, encode_tensor_summary, encode_tensors, heatmap,
                                             merge_tensors, overview, series_from_arrays, summarize,
                                             summarize_tensors)
from gradwatch.server.analysis.stats import downsample_indices
from gradwatch.server.storage.chunks.tensors import TensorChunk

SPEC = {"pre_norm": "float", "loss": "float", "clipped": "bool", "spike": "bool", "nonfinite": "bool"}


def make_run(steps: np.ndarray, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = len(steps)
    pre = np.exp(rng.normal(0.0, 0.3, n))
    spikes = rng.choice(n, max(n // 50_000, 3), replace=False)
    pre[spikes] *= 50.0
    pre[rng.choice(n, 4, replace=False)] = [np.nan, np.inf, -np.inf, np.nan]
    loss = rng.normal(size=n)
    loss_missing = rng.random(n) < 0.1
    clipped = (pre > 1.5).astype(float)
    clipped[rng.random(n) < 0.05] = np.nan
    spike = (pre > 20).astype(float)
    nonfinite = (~np.isfinite(pre)).astype(float)
    columns = {"pre_norm": pre, "loss": (loss, loss_missing), "clipped": clipped, "spike": spike,
               "nonfinite": nonfinite}
    return columns


def store(steps, columns, key="pre_norm") -> MemorySource:
    source = MemorySource(SPEC, key)
    for chunk in series_from_arrays(steps, SPEC, columns):
        source.put(chunk)
    return source


def test_block_summaries_match_numpy_per_block():
    steps = np.sort(np.random.default_rng(1).choice(3 * CHUNK, 9000, replace=False))
    columns = make_run(steps)
    source = store(steps, columns)
    summary = concat([decode_summary(source.block_summaries[c]) for c in sorted(source.block_summaries)])
    pre = columns["pre_norm"]
    loss, loss_missing = columns["loss"]
    blocks = steps // BLOCK
    assert summary.start.tolist() == (np.unique(blocks) * BLOCK).tolist()
    for i, start in enumerate(summary.start.tolist()):
        rows = np.flatnonzero(blocks == start // BLOCK)
        assert summary.rows[i] == len(rows) and summary.first[i] == steps[rows[0]]
        for name, values, missing in (("pre_norm", pre, np.zeros(len(pre), bool)), ("loss", loss, loss_missing)):
            s = summary.nums[name]
            v = values[rows][~missing[rows]]
            fin = v[np.isfinite(v)]
            assert s.count[i] == len(fin) and s.nan[i] == np.isnan(v).sum() and s.inf[i] == np.isinf(v).sum()
            if len(fin):
                assert s.min[i] == fin.min() and s.max[i] == fin.max()
                present = rows[~missing[rows]]
                assert s.min_step[i] == steps[present[np.flatnonzero(values[present] == fin.min())[0]]]
                assert s.max_step[i] == steps[present[np.flatnonzero(values[present] == fin.max())[0]]]
                assert math.isclose(s.sum[i], math.fsum(fin.tolist()), rel_tol=1e-12, abs_tol=1e-12)
                assert math.isclose(s.sumsq[i], math.fsum((fin * fin).tolist()), rel_tol=1e-12)
            else:
                assert s.min_step[i] == -1 and s.max_step[i] == -1
        clipped = columns["clipped"][rows]
        assert summary.flags["clipped"].true[i] == np.sum(clipped == 1.0)
        assert summary.flags["clipped"].valid[i] == np.sum(~np.isnan(clipped))
        at = np.flatnonzero(steps == summary.nums["pre_norm"].max_step[i])
        if len(at):   # the loss at the pre-norm's max step rides along
            value, ok = summary.at_max["loss"][0][i], summary.at_max["loss"][1][i]
            assert ok == (not loss_missing[at[0]]) and (not ok or value == loss[at[0]])


@pytest.mark.parametrize("width", [8 * BLOCK, CHUNK, 4 * CHUNK])
def test_combined_summaries_equal_summaries_of_the_raw_values(width):
    steps = np.sort(np.random.default_rng(2).choice(5 * CHUNK, 15000, replace=False))
    columns = make_run(steps, seed=2)
    source = store(steps, columns)
    blocks = concat([decode_summary(source.block_summaries[c]) for c in sorted(source.block_summaries)])
    combined = combine(blocks, width)
    pre = columns["pre_norm"]
    groups = steps // width
    assert combined.start.tolist() == (np.unique(groups) * width).tolist()
    for i, start in enumerate(combined.start.tolist()):
        rows = np.flatnonzero(groups == start // width)
        v = pre[rows]
        fin = np.isfinite(v)
        s = combined.nums["pre_norm"]
        assert combined.rows[i] == len(rows)
        assert s.count[i] == fin.sum() and s.nan[i] + s.inf[i] == (~fin).sum()
        assert s.min[i] == v[fin].min() and s.max[i] == v[fin].max()
        assert s.min_step[i] == steps[rows[np.flatnonzero(fin & (v == v[fin].min()))[0]]]
        assert s.max_step[i] == steps[rows[np.flatnonzero(fin & (v == v[fin].max()))[0]]]
        assert math.isclose(s.sum[i], math.fsum(v[fin].tolist()), rel_tol=1e-12)
        assert combined.flags["spike"].true[i] == np.sum(columns["spike"][rows] == 1.0)
    # summaries of summaries: combining twice is combining once
    twice = combine(combine(blocks, 8 * BLOCK), width) if width > 8 * BLOCK else combined
    assert twice.nums["pre_norm"].max_step.tolist() == combined.nums["pre_norm"].max_step.tolist()
    assert decode_summary(encode_summary(combined)).nums["pre_norm"].min.tolist() == s.min.tolist()


def test_grouping_the_stored_matrices_equals_grouping_field_by_field():
    """`group_by` on a matrix-backed summary (what is decoded) and on the same summary held field
    by field: every field equal, ties and empty entries (a column all null) included."""
    from gradwatch.server.storage.chunks.summaries import Summary, group_by

    steps = np.sort(np.random.default_rng(5).choice(4 * CHUNK, 7000, replace=False))
    columns = make_run(steps, seed=5)
    columns["loss"] = (columns["loss"][0], columns["loss"][1] | (steps // BLOCK % 7 == 0))   # some blocks all null
    source = store(steps, columns)
    matrix = concat([decode_summary(source.block_summaries[c]) for c in sorted(source.block_summaries)])
    fields = Summary(matrix.width, matrix.start, matrix.rows, matrix.first, matrix.last, dict(matrix.nums),
                     dict(matrix.flags), matrix.key, dict(matrix.at_min), dict(matrix.at_max))
    labels = matrix.start // (5 * BLOCK)
    a, b = group_by(matrix, labels, 5 * BLOCK), group_by(fields, labels, 5 * BLOCK)
    assert a.matrices is not None and b.matrices is None and a.width == b.width == 5 * BLOCK
    for name in ("start", "rows", "first", "last"):
        assert getattr(a, name).tolist() == getattr(b, name).tolist()
    for name in a.nums:
        for field in ("count", "nan", "inf", "min", "min_step", "max", "max_step", "sum", "sumsq"):
            assert np.array_equal(getattr(a.nums[name], field), getattr(b.nums[name], field), equal_nan=True), field
    for name in a.flags:
        assert a.flags[name].true.tolist() == b.flags[name].true.tolist()
        assert a.flags[name].valid.tolist() == b.flags[name].valid.tolist()
    for side in ("at_min", "at_max"):
        for name, (values, ok) in getattr(a, side).items():
            other, other_ok = getattr(b, side)[name]
            assert ok.tolist() == other_ok.tolist() and values[ok].tolist() == other[other_ok].tolist()


@pytest.mark.parametrize("seed", [3, 4])
def test_segments_cut_anywhere_join_to_the_summary_of_the_whole_chunk(seed):
    """A chunk cut into segments at random steps (inside blocks too), each summarised on its
    own, concatenated and `join_split_blocks`-ed: the summary of the uncut chunk, the first
    step holding a tied minimum included, the sums to their last bits (another order)."""
    from gradwatch.server.storage.chunks.summaries import join_split_blocks

    rng = np.random.default_rng(seed)
    steps = np.sort(rng.choice(CHUNK, 3000, replace=False))
    columns = make_run(steps, seed=seed)
    inside = int(np.flatnonzero(steps // BLOCK == steps[1500] // BLOCK)[0]) + 1   # a row with one before it in its block
    columns["pre_norm"][[inside - 1, inside]] = 1e-9   # a tie for the block's minimum, cut apart below
    [chunk] = series_from_arrays(steps, SPEC, columns)
    cuts = np.unique(np.r_[0, rng.choice(np.arange(1, len(steps)), 12, replace=False), inside, len(steps)])
    parts = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        part = type(chunk)(chunk.chunk_id, chunk.steps[a:b], {n: v[a:b] for n, v in chunk.values.items()},
                           {n: (ok[a:b] if ok is not None else None) for n, ok in chunk.valid.items()})
        parts.append(summarize(part, SPEC, "pre_norm"))
    joined = join_split_blocks(concat(parts))
    whole = summarize(chunk, SPEC, "pre_norm")
    assert len(concat(parts)) > len(whole)   # some block was cut
    for name in ("start", "rows", "first", "last"):
        assert getattr(joined, name).tolist() == getattr(whole, name).tolist()
    for name in ("pre_norm", "loss"):
        a, b = joined.nums[name], whole.nums[name]
        for field in ("count", "nan", "inf", "min", "min_step", "max", "max_step"):
            assert getattr(a, field).tolist() == getattr(b, field).tolist(), (name, field)
        assert np.allclose(a.sum, b.sum, rtol=1e-13, atol=0) and np.allclose(a.sumsq, b.sumsq, rtol=1e-13, atol=0)
    assert steps[inside - 1] in whole.nums["pre_norm"].min_step.tolist()   # the first step of the tie
    for name in ("clipped", "spike"):
        assert joined.flags[name].true.tolist() == whole.flags[name].true.tolist()
        assert joined.flags[name].valid.tolist() == whole.flags[name].valid.tolist()
    for side in ("at_min", "at_max"):
        (values, ok), (other, other_ok) = getattr(joined, side)["loss"], getattr(whole, side)["loss"]
        assert ok.tolist() == other_ok.tolist() and values[ok].tolist() == other[other_ok].tolist()


def reference_overview(steps, pre, keep, lo, hi, points):
    """Independent per-bucket loop on raw values over the same grid: the rows an overview must hold."""
    inside = np.flatnonzero((steps >= lo) & (steps <= hi))
    if points >= len(inside):
        return steps[inside].tolist()
    grid = bucket_grid(lo, hi, points)
    chosen = set()
    buckets: dict[int, list[int]] = {}
    for i in inside.tolist():
        buckets.setdefault((int(steps[i]) - grid.anchor) // grid.width, []).append(i)
    for rows in buckets.values():
        finite = [i for i in rows if math.isfinite(pre[i])]
        if finite:
            chosen.add(min(finite, key=lambda i: (pre[i], i)))
            chosen.add(min(finite, key=lambda i: (-pre[i], i)))
    extra = [i for i in inside.tolist() if not math.isfinite(pre[i]) or keep[i]]
    if len(extra) <= points:
        chosen.update(extra)
    return sorted(int(steps[i]) for i in chosen)


def test_overview_equals_todays_function_on_a_dense_aligned_range():
    n = 1000 * 512
    steps = np.arange(n)
    columns = make_run(steps, seed=4)
    source = store(steps, columns)
    pre = columns["pre_norm"]
    keep = (columns["spike"] == 1.0) | (columns["nonfinite"] == 1.0)
    for points in (2000, 2 * n // BLOCK, 50_000, n, n + 1):
        source.decoded.clear()
        series = overview(source, SPEC, 0, n - 1, points, ("pre_norm", "loss", "clipped"))
        assert series.steps.tolist() == downsample_indices(pre, points, keep).tolist(), points
        assert series.total == n
        loss, loss_missing = columns["loss"]
        np.testing.assert_array_equal(series.values["pre_norm"], pre[series.steps])
        np.testing.assert_array_equal(series.values["loss"], np.where(loss_missing, np.nan, loss)[series.steps])
        np.testing.assert_array_equal(series.values["clipped"], columns["clipped"][series.steps])
        if series.missing["loss"] is not None:
            assert series.missing["loss"].tolist() == loss_missing[series.steps].tolist()
        if points == 2000:   # from summaries: only the chunks holding non-finite/flagged steps were decoded
            flagged = sorted(set((steps[keep] // CHUNK).tolist()))
            assert sorted(set(source.decoded)) == flagged and len(flagged) < n // CHUNK / 4


@pytest.mark.parametrize("lo,hi,points", [(1000, 400_000, 2000), (4095, 4096 * 60 + 7, 300),
                                          (123_457, 130_000, 400), (0, 599_999, 10), (70_000, 70_100, 20)])
def test_overview_matches_the_numpy_reference_on_any_range(lo, hi, points):
    rng = np.random.default_rng(lo)
    steps = np.sort(rng.choice(600_000, 450_000, replace=False))    # sparse: gaps everywhere
    columns = make_run(steps, seed=5)
    source = store(steps, columns)
    keep = (columns["spike"] == 1.0) | (columns["nonfinite"] == 1.0)
    pre = columns["pre_norm"]
    series = overview(source, SPEC, lo, hi, points, ("pre_norm", "spike"))
    expected = reference_overview(steps, pre, keep, lo, hi, points)
    assert series.steps.tolist() == expected
    inside = (steps >= lo) & (steps <= hi)
    assert series.total == inside.sum()
    # the guarantees, stated directly: the range's max survives, every spike and non-finite step survives
    chosen = set(series.steps.tolist())
    fin = inside & np.isfinite(pre)
    assert int(steps[fin][np.argmax(pre[fin])]) in chosen
    if (keep & inside).sum() <= points:
        assert set(steps[keep & inside].tolist()) <= chosen
    assert len(series.steps) <= points + (keep & inside).sum()
    np.testing.assert_array_equal(series.values["pre_norm"], pre[np.searchsorted(steps, series.steps)])


def test_points_at_least_the_steps_returns_every_step_unchanged():
    steps = np.array([3, 9, 4096 * 7 + 1, 4096 * 300])
    columns = make_run(steps, seed=6)
    source = store(steps, columns)
    series = overview(source, SPEC, 0, 2 ** 40, 4, ("pre_norm", "loss"))
    assert series.steps.tolist() == steps.tolist() and not series.downsampled
    np.testing.assert_array_equal(series.values["pre_norm"], columns["pre_norm"])


def test_tensor_heatmap_matches_a_loop_over_raw_rows():
    rng = np.random.default_rng(7)
    steps = np.sort(rng.choice(3 * CHUNK, 9000, replace=False))
    names_a, names_b = ["w0", "w1", "w2"], ["w1", "w3"]
    norms_a = rng.random((len(steps), 3)).astype(np.float32)
    norms_a[100, 1] = np.nan
    norms_b = rng.random((len(steps), 2)).astype(np.float32)
    late = steps >= 2 * CHUNK            # a tensor appears mid-run; w0/w2 stop being reported
    chunks, summaries = {}, {}
    for c in range(3):
        rows = steps // CHUNK == c
        chunk = None
        early = rows & ~late
        if early.any():
            chunk = merge_tensors(chunk, c, steps[early], names_a, norms_a[early])
        if (rows & late).any():
            chunk = merge_tensors(chunk, c, steps[rows & late], names_b, norms_b[rows & late])
        chunk = merge_tensors(chunk, c, steps[rows][:5], names_a, norms_a[rows][:5] + 9)   # resend: ignored
        chunks[c] = encode_tensors(chunk)
        summaries[c] = encode_tensor_summary(summarize_tensors(chunk))
    def load(c):
        return decode_tensors(c, chunks[c]) if c in chunks else None

    def load_summaries(a, b):
        return [decode_tensor_summary(summaries[c]) for c in range(a, b + 1) if c in summaries]

    table = {}   # step -> {name: norm}
    for i, step in enumerate(steps.tolist()):
        row = dict(zip(names_b, norms_b[i].tolist())) if late[i] else dict(zip(names_a, norms_a[i].tolist()))
        table[step] = row
    for lo, hi, points in ((0, 3 * CHUNK - 1, 100), (1000, 9000, 40), (50, 300, 1000), (10, 5000, 70)):
        result = heatmap(load, load_summaries, lo, hi, points)
        if hi == 3 * CHUNK - 1:
                    assert sorted(set(result.decoded)) == []      # whole blocks only: summaries alone
        in_range = [s for s in steps.tolist() if lo <= s <= hi]
        grid = bucket_grid(lo, hi, points * 2)
        if len(in_range) <= points:
            groups = [[s] for s in in_range]
        else:
            by: dict[int, list[int]] = {}
            for s in in_range:
                by.setdefault((s - grid.anchor) // grid.width, []).append(s)
            groups = list(by.values())
        assert result.labels.tolist() == [g[0] for g in groups]
        for b, group in enumerate(groups):
            for j, name in enumerate(result.names):
                values = [table[s][name] for s in group if name in table[s]]
                if not values:
                    assert result.absent[b, j] and math.isnan(result.norms[b, j])
                elif any(math.isnan(v) for v in values):
                    assert math.isnan(result.norms[b, j])
                else:
                    assert result.norms[b, j] == np.float32(max(values))


def test_a_fresh_tensor_segment_and_its_summary_equal_the_general_path():
    """The agent's case (ascending steps, each name once, nothing stored) takes a short cut in
    merge_tensors and summarize_tensors: the same chunk and summary as the general path, NaN included."""
    rng = np.random.default_rng(4)
    steps = np.arange(4096 * 2 + 10, 4096 * 2 + 700, dtype=np.int64)
    names = [f"layers.{i}.weight" for i in range(30)]
    norms = rng.random((len(steps), len(names))).astype(np.float32)
    norms[[5, 300], [3, 7]] = np.nan
    fast = merge_tensors(None, 2, steps, names, norms)
    general = merge_tensors(None, 2, steps, names, norms, accept=np.ones(len(steps), bool))  # no short cut
    assert fast.present is None and general.present is None and fast.names == general.names
    np.testing.assert_array_equal(fast.steps, general.steps)
    np.testing.assert_array_equal(fast.norms, general.norms)
    quick = summarize_tensors(fast)
    slow = summarize_tensors(TensorChunk(2, steps, names, norms, np.ones(norms.shape, bool)))  # the masked path
    np.testing.assert_array_equal(quick.start, slow.start)
    np.testing.assert_array_equal(quick.max, slow.max)   # NaN where a NaN was seen, in both
    np.testing.assert_array_equal(quick.seen, slow.seen)
    block = (steps[5] // 64) * 64
    assert np.isnan(quick.max[quick.start == block, 3]).all()
    reference = np.max(norms[(steps >= block) & (steps < block + 64)][:, 0])
    assert quick.max[quick.start == block, 0][0] == reference

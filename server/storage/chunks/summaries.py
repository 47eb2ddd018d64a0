"""Summaries of consecutive steps, written at ingest, combinable into coarser ones.

An entry summarises the steps present in `[start, start + width)`: how many;
for every numeric column the count of finite values, of NaN and of ±Inf, the
min and max of the finite values with the (first) step holding each, their
sum and sum of squares; for every bool column the count of true and of
non-null values. Nulls count nowhere. Entries exist only where steps do.

For the downsampled overview one column is the `key` (the pre-clip norm): an
entry also keeps every other column's value at the key's min step and at its
max step (`at_min`, `at_max`), so an overview row can be drawn from a summary
without decoding the chunk it came from.

`summarize(chunk)` makes BLOCK-wide entries (64 steps: 64 entries a chunk);
`combine(summary, width)` merges entries into wider ones (summaries of
summaries: 512 steps, a chunk, ...), exactly as summarising the raw steps at
that width would (the sums up to float rounding order).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

import numpy as np

from .codec import BLOCK, Chunk, Spec, pack_arrays, unpack_arrays

_NUM_FIELDS = ("count", "nan", "inf", "min", "min_step", "max", "max_step", "sum", "sumsq")
_FLAG_FIELDS = ("true", "valid")


@dataclass
class NumStats:
    count: np.ndarray      # int64: finite values
    nan: np.ndarray        # int64
    inf: np.ndarray        # int64: +Inf and -Inf
    min: np.ndarray        # float64, +Inf where count == 0
    min_step: np.ndarray   # int64, -1 where count == 0
    max: np.ndarray        # float64, -Inf where count == 0
    max_step: np.ndarray
    sum: np.ndarray        # float64, finite values
    sumsq: np.ndarray


@dataclass
class FlagStats:
    true: np.ndarray       # int64
    valid: np.ndarray      # int64: non-null values


@dataclass
class Summary:
    width: int
    start: np.ndarray                       # int64 entry starts (multiples of width), ascending
    rows: np.ndarray                        # int64 steps present
    first: np.ndarray                       # int64 first step present
    last: np.ndarray                        # int64 last step present
    nums: dict[str, NumStats] = field(default_factory=dict)
    flags: dict[str, FlagStats] = field(default_factory=dict)
    key: str | None = None
    at_min: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # name -> (float64, valid)
    at_max: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    # (layout meta, ints, floats) when the fields above are column views of these two matrices
    # (made by `summarize` or decoded): taking, concatenating and encoding then move whole
    # matrices, not one array per field. The fields are never assigned after construction.
    matrices: tuple[dict, np.ndarray, np.ndarray] | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.start)

    def take(self, index: np.ndarray | slice) -> "Summary":
        """The entries at `index` (a slice or sorted indices)."""
        if self.matrices is not None:
            meta, ints, floats = self.matrices
            return from_matrices(meta, ints[index], floats[index])
        return Summary(self.width, self.start[index], self.rows[index], self.first[index], self.last[index],
                       {n: NumStats(*(getattr(s, f)[index] for f in _NUM_FIELDS)) for n, s in self.nums.items()},
                       {n: FlagStats(*(getattr(s, f)[index] for f in _FLAG_FIELDS)) for n, s in self.flags.items()},
                       self.key,
                       {n: (v[index], ok[index]) for n, (v, ok) in self.at_min.items()},
                       {n: (v[index], ok[index]) for n, (v, ok) in self.at_max.items()})


def _as_float(kind: str, values: np.ndarray) -> np.ndarray:
    return values.astype(np.float64) if kind != "float" else values


def _first_where(hit: np.ndarray, cuts: np.ndarray, n: int) -> np.ndarray:
    """Per group (starting at `cuts`), the first index where `hit`, or n when none."""
    return np.minimum.reduceat(np.where(hit, np.arange(n), n), cuts)


def summarize(chunk: Chunk, spec: Spec, key: str | None = None, width: int = BLOCK) -> Summary:
    """Entries of `width` steps (a divisor of CHUNK) over one decoded chunk (all columns of `spec`)."""
    parts = summary_matrices(chunk, spec, key, width)
    return empty_summary(spec, key, width) if parts is None else from_matrices(*parts)


@functools.lru_cache(maxsize=64)
def _layout_of(spec: tuple[tuple[str, str], ...], key: str | None
               ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], list[int]]:
    """A spec's numeric columns, bool columns, anchors (every column but the key) and each
    anchor's row among the numeric-then-bool rows `summary_matrices` reads."""
    nums = tuple(name for name, kind in spec if kind != "bool")
    flags = tuple(name for name, kind in spec if kind == "bool")
    if key is not None and key not in nums:
        raise ValueError(f"key column '{key}' is not a numeric column of the spec")
    anchors = tuple(name for name, _ in spec if name != key) if key is not None else ()
    order = [nums.index(name) if name in nums else len(nums) + flags.index(name) for name in anchors]
    return nums, flags, anchors, order


def summary_matrices(chunk: Chunk, spec: Spec, key: str | None = None, width: int = BLOCK
                     ) -> tuple[dict, np.ndarray, np.ndarray] | None:
    """`summarize`'s (layout meta, ints, floats), None for a chunk without steps.

    All numeric columns are summarised at once as one (columns x steps) matrix, the bool
    columns as another, straight into the two matrices a summary is stored as (one NumPy
    call per statistic instead of one per statistic and column: a 2,000-step batch's
    summary went from about 0.8 to 0.2 ms). Each row is reduced in step order, so every
    figure is bit for bit what a per-column pass gives."""
    steps = chunk.steps
    n = len(steps)
    if n == 0:
        return None
    nums, flags, anchors, order = _layout_of(tuple(spec.items()), key)
    meta = {"width": width, "key": key, "nums": list(nums), "flags": list(flags), "anchors": list(anchors)}
    bucket = steps // width
    inner = np.flatnonzero(bucket[1:] != bucket[:-1]) + 1   # (np.r_ and np.append cost ~10 us a call)
    cuts = np.concatenate(([0], inner))
    ends = np.concatenate((inner, [n]))
    g = len(cuts)
    k, b, a = len(nums), len(flags), len(anchors)
    ints = np.empty((g, 4 + 5 * k + 2 * b + 2 * a), np.int64)
    floats = np.empty((g, 4 * k + 2 * a), np.float64)
    ints[:, 0] = bucket[cuts] * width
    ints[:, 1] = ends - cuts
    ints[:, 2] = steps[cuts]
    ints[:, 3] = steps[ends - 1]
    every = np.ones(n, dtype=bool)
    # every column as rows of one matrix: the numeric ones' values (k x n) and the bool ones'
    # (b x n), each with its valid mask; the stored fields are written through views of `ints`
    # and `floats` (entries x column x statistic), not stacked and transposed
    v = np.empty((k, n), np.float64)
    v_ok = np.empty((k, n), dtype=bool)
    for row, name in enumerate(nums):
        v[row] = chunk.values[name]
        valid = chunk.valid.get(name)
        v_ok[row] = every if valid is None else valid
    on = np.empty((b, n), dtype=bool)
    on_ok = np.empty((b, n), dtype=bool)
    for row, name in enumerate(flags):
        on[row] = chunk.values[name]
        valid = chunk.valid.get(name)
        on_ok[row] = every if valid is None else valid
    key_rows = None
    if k:
        finite = np.isfinite(v)
        nan = np.isnan(v)
        finite &= v_ok
        nan &= v_ok
        inf = v_ok & ~finite & ~nan
        low = np.where(finite, v, np.inf)
        high = np.where(finite, v, -np.inf)
        mn = np.minimum.reduceat(low, cuts, axis=1)
        mx = np.maximum.reduceat(high, cuts, axis=1)
        sizes = ends - cuts
        index = np.arange(n)
        min_at = np.minimum.reduceat(np.where(finite & (low == np.repeat(mn, sizes, axis=1)), index, n), cuts, axis=1)
        max_at = np.minimum.reduceat(np.where(finite & (high == np.repeat(mx, sizes, axis=1)), index, n), cuts, axis=1)
        count = np.add.reduceat(finite, cuts, axis=1, dtype=np.int64)
        finite_v = np.where(finite, v, 0.0)
        with np.errstate(over="ignore"):
            squares = finite_v * finite_v
        has = count > 0
        min_rows, max_rows = np.minimum(min_at, n - 1), np.minimum(max_at, n - 1)
        num_ints = ints[:, 4:4 + 5 * k].reshape(g, k, 5)
        num_ints[:, :, 0] = count.T
        num_ints[:, :, 1] = np.add.reduceat(nan, cuts, axis=1, dtype=np.int64).T
        num_ints[:, :, 2] = np.add.reduceat(inf, cuts, axis=1, dtype=np.int64).T
        num_ints[:, :, 3] = np.where(has, steps[min_rows], -1).T
        num_ints[:, :, 4] = np.where(has, steps[max_rows], -1).T
        num_floats = floats[:, :4 * k].reshape(g, k, 4)
        num_floats[:, :, 0] = mn.T
        num_floats[:, :, 1] = mx.T
        num_floats[:, :, 2] = np.add.reduceat(finite_v, cuts, axis=1).T
        num_floats[:, :, 3] = np.add.reduceat(squares, cuts, axis=1).T
        if key is not None:
            row = nums.index(key)
            key_rows = (min_rows[row], max_rows[row], has[row])
    if b:
        flag_ints = ints[:, 4 + 5 * k:4 + 5 * k + 2 * b].reshape(g, b, 2)
        flag_ints[:, :, 0] = np.add.reduceat(on & on_ok, cuts, axis=1, dtype=np.int64).T
        flag_ints[:, :, 1] = np.add.reduceat(on_ok, cuts, axis=1, dtype=np.int64).T
    if a:   # every other column's value at the key's min row and max row
        min_rows, max_rows, has = key_rows
        picks = np.concatenate([min_rows, max_rows])
        values = np.concatenate([v[:, picks], on[:, picks]])[order]          # anchors x 2g
        valid = np.concatenate([v_ok[:, picks], on_ok[:, picks]])[order]
        valid &= np.concatenate([has, has])
        anchor_ints = ints[:, 4 + 5 * k + 2 * b:].reshape(g, a, 2)
        anchor_ints[:, :, 0] = valid[:, :g].T
        anchor_ints[:, :, 1] = valid[:, g:].T
        anchor_floats = floats[:, 4 * k:].reshape(g, a, 2)
        anchor_floats[:, :, 0] = values[:, :g].T
        anchor_floats[:, :, 1] = values[:, g:].T
    return meta, ints, floats


def empty_summary(spec: Spec, key: str | None = None, width: int = BLOCK) -> Summary:
    i, f = np.zeros(0, np.int64), np.zeros(0, np.float64)
    summary = Summary(width, i, i, i, i, key=key)
    for name, kind in spec.items():
        if kind == "bool":
            summary.flags[name] = FlagStats(i, i)
        else:
            summary.nums[name] = NumStats(i, i, i, f, i, f, i, f, f)
        if key is not None and name != key:
            summary.at_min[name] = summary.at_max[name] = (f, np.zeros(0, bool))
    return summary


def concat(summaries: list[Summary]) -> Summary:
    """Entries of several summaries of one width, in the order given (ascending steps expected)."""
    if not summaries:
        raise ValueError("nothing to concatenate")
    if len(summaries) == 1:
        return summaries[0]
    head = summaries[0]
    if all(s.matrices is not None and s.matrices[0] == head.matrices[0] for s in summaries):
        return from_matrices(head.matrices[0], np.concatenate([s.matrices[1] for s in summaries]),
                             np.concatenate([s.matrices[2] for s in summaries]))
    cat = np.concatenate
    return Summary(
        head.width, cat([s.start for s in summaries]), cat([s.rows for s in summaries]),
        cat([s.first for s in summaries]), cat([s.last for s in summaries]),
        {n: NumStats(*(cat([getattr(s.nums[n], f) for s in summaries]) for f in _NUM_FIELDS)) for n in head.nums},
        {n: FlagStats(*(cat([getattr(s.flags[n], f) for s in summaries]) for f in _FLAG_FIELDS))
         for n in head.flags},
        head.key,
        {n: (cat([s.at_min[n][0] for s in summaries]), cat([s.at_min[n][1] for s in summaries]))
         for n in head.at_min},
        {n: (cat([s.at_max[n][0] for s in summaries]), cat([s.at_max[n][1] for s in summaries]))
         for n in head.at_max})


def group_by(summary: Summary, labels: np.ndarray, width: int | None = None) -> Summary:
    """Merge consecutive entries with equal `labels` (non-decreasing) into one entry each;
    `start` of a merged entry is its first entry's start. The general form of `combine`;
    `width` (default: the summary's) is the merged entries'."""
    m = len(summary)
    width = summary.width if width is None else width
    if m == 0:
        if width == summary.width:
            return summary
        empty = summary.take(slice(0, 0))
        if empty.matrices is not None:
            return from_matrices({**empty.matrices[0], "width": width}, empty.matrices[1], empty.matrices[2])
        empty.width = width
        return empty
    cuts = np.concatenate(([0], np.flatnonzero(labels[1:] != labels[:-1]) + 1))
    if summary.matrices is not None:
        return _group_matrices(summary.matrices, cuts, width)
    add = np.add.reduceat
    out = Summary(width, summary.start[cuts], add(summary.rows, cuts), summary.first[cuts],
                  np.maximum.reduceat(summary.last, cuts), key=summary.key)
    key_pick = None
    for name, s in summary.nums.items():
        mn = np.minimum.reduceat(s.min, cuts)
        mx = np.maximum.reduceat(s.max, cuts)
        group = np.repeat(np.arange(len(cuts)), np.diff(np.append(cuts, m)))
        has = s.count > 0
        min_pick = _first_where(has & (s.min == mn[group]), cuts, m)
        max_pick = _first_where(has & (s.max == mx[group]), cuts, m)
        count = add(s.count, cuts)
        safe_min, safe_max = np.minimum(min_pick, m - 1), np.minimum(max_pick, m - 1)
        with np.errstate(over="ignore", invalid="ignore"):
            out.nums[name] = NumStats(count, add(s.nan, cuts), add(s.inf, cuts), mn,
                                      np.where(count > 0, s.min_step[safe_min], -1), mx,
                                      np.where(count > 0, s.max_step[safe_max], -1),
                                      add(s.sum, cuts), add(s.sumsq, cuts))
        if name == summary.key:
            key_pick = (safe_min, safe_max, count > 0)
    for name, s in summary.flags.items():
        out.flags[name] = FlagStats(add(s.true, cuts), add(s.valid, cuts))
    if key_pick is not None:
        min_pick, max_pick, has = key_pick
        out.at_min = {n: (v[min_pick], ok[min_pick] & has) for n, (v, ok) in summary.at_min.items()}
        out.at_max = {n: (v[max_pick], ok[max_pick] & has) for n, (v, ok) in summary.at_max.items()}
    return out


def _group_matrices(matrices: tuple[dict, np.ndarray, np.ndarray], cuts: np.ndarray, width: int) -> Summary:
    """`group_by` on a summary's two stored matrices (`_layout`): each statistic of every
    column in one NumPy call over a (entries x columns) block. Not faster than a pass per
    field (a 1M-step run's 16k entries to chunks: 5.6 against 5.2 ms), but the result is
    again matrix-backed, so `join_split_blocks` can write grouped entries into a matrix and
    what follows (take, concat, encode) moves whole matrices."""
    meta, ints, floats = matrices
    k, b, a = len(meta["nums"]), len(meta["flags"]), len(meta["anchors"])
    m, g = len(ints), len(cuts)
    out_ints = np.empty((g, ints.shape[1]), np.int64)
    out_floats = np.empty((g, floats.shape[1]), np.float64)
    add = np.add.reduceat
    out_ints[:, 0] = ints[cuts, 0]
    out_ints[:, 1] = add(ints[:, 1], cuts)
    out_ints[:, 2] = ints[cuts, 2]
    out_ints[:, 3] = np.maximum.reduceat(ints[:, 3], cuts)
    group = np.repeat(np.arange(g), np.diff(np.append(cuts, m)))
    entry = np.arange(m)[:, None]
    key_pick = None
    if k:
        num_i = ints[:, 4:4 + 5 * k].reshape(m, k, 5)
        num_f = floats[:, :4 * k].reshape(m, k, 4)
        out_i = out_ints[:, 4:4 + 5 * k].reshape(g, k, 5)
        out_f = out_floats[:, :4 * k].reshape(g, k, 4)
        out_i[:, :, :3] = add(num_i[:, :, :3], cuts, axis=0)   # count, nan, inf
        mn = np.minimum.reduceat(num_f[:, :, 0], cuts, axis=0)
        mx = np.maximum.reduceat(num_f[:, :, 1], cuts, axis=0)
        has = num_i[:, :, 0] > 0
        picks = []
        for stat, extreme in ((0, mn), (1, mx)):   # the first entry holding the group's extreme
            pick = np.minimum.reduceat(np.where(has & (num_f[:, :, stat] == extreme[group]), entry, m), cuts, axis=0)
            picks.append(np.minimum(pick, m - 1))
        count = out_i[:, :, 0]
        for stat, pick in zip((3, 4), picks):   # min_step, max_step
            out_i[:, :, stat] = np.where(count > 0, np.take_along_axis(num_i[:, :, stat], pick, axis=0), -1)
        out_f[:, :, 0], out_f[:, :, 1] = mn, mx
        with np.errstate(over="ignore", invalid="ignore"):
            out_f[:, :, 2:] = add(num_f[:, :, 2:], cuts, axis=0)   # sum, sumsq
        if meta["key"] is not None:
            column = meta["nums"].index(meta["key"])
            key_pick = (picks[0][:, column], picks[1][:, column], count[:, column] > 0)
    if b:
        out_ints[:, 4 + 5 * k:4 + 5 * k + 2 * b] = add(ints[:, 4 + 5 * k:4 + 5 * k + 2 * b], cuts, axis=0)
    if a:
        min_pick, max_pick, has = key_pick
        anchor_i = ints[:, 4 + 5 * k + 2 * b:].reshape(m, a, 2)
        anchor_f = floats[:, 4 * k:].reshape(m, a, 2)
        out_ai = out_ints[:, 4 + 5 * k + 2 * b:].reshape(g, a, 2)
        out_af = out_floats[:, 4 * k:].reshape(g, a, 2)
        for side, pick in ((0, min_pick), (1, max_pick)):
            out_ai[:, :, side] = (anchor_i[pick, :, side] != 0) & has[:, None]
            out_af[:, :, side] = anchor_f[pick, :, side]
    return from_matrices({**meta, "width": width}, out_ints, out_floats)


def join_split_blocks(summary: Summary) -> Summary:
    """Entries in step order where a block may have several consecutive entries (a chunk's
    segments, each summarising its own rows: a block a batch boundary cut in two has an entry
    in each) with each block's entries merged into one. As summarising the block's rows at
    once, but for the float sums, added in another order (they may differ in the last bits)."""
    start = summary.start
    split = start[1:] == start[:-1]
    if not split.any():
        return summary
    if summary.matrices is None:
        return group_by(summary, start)
    # one entry per block (its first, a row gather), then the split blocks' rows overwritten
    # by their entries grouped: only those are grouped (a 500-step batch splits one block in 8)
    firsts = np.flatnonzero(np.concatenate(([True], ~split)))
    sizes = np.diff(np.append(firsts, len(start)))
    involved = np.repeat(sizes > 1, sizes)
    joined = group_by(summary.take(np.flatnonzero(involved)), start[involved])
    out = summary.take(firsts)
    rows = np.flatnonzero(sizes > 1)
    out.matrices[1][rows] = joined.matrices[1]
    out.matrices[2][rows] = joined.matrices[2]
    return from_matrices(*out.matrices)   # fields read again from the matrices (the bool views are copies)


def combine(summary: Summary, width: int) -> Summary:
    """Summaries of summaries: entries `width` steps wide (a multiple of the current width)."""
    if width % summary.width:
        raise ValueError(f"width {width} is not a multiple of {summary.width}")
    out = group_by(summary, summary.start // width, width)
    if out.matrices is not None:   # its fields are views of the matrices: set the column, not the field
        out.matrices[1][:, 0] //= width
        out.matrices[1][:, 0] *= width
        return out
    out.start = out.start // width * width
    return out


def slice_steps(summary: Summary, lo: int, hi: int) -> Summary:
    """The entries whose whole span lies inside [lo, hi] (inclusive)."""
    a = np.searchsorted(summary.start, lo, side="left")
    b = np.searchsorted(summary.start + summary.width - 1, hi, side="right")
    return summary.take(slice(a, max(a, b)))


# ----- bytes -----
#
# One blob per summary: a small JSON header and two matrices (entries x int64
# fields, entries x float64 fields), so decoding a chunk's summary is two
# `frombuffer` calls and many chunks' summaries stack before being split once.

def _layout(meta: dict) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    ints: list[tuple[str, ...]] = [("start",), ("rows",), ("first",), ("last",)]
    floats: list[tuple[str, ...]] = []
    for name in meta["nums"]:
        ints += [("n", name, f) for f in ("count", "nan", "inf", "min_step", "max_step")]
        floats += [("n", name, f) for f in ("min", "max", "sum", "sumsq")]
    for name in meta["flags"]:
        ints += [("b", name, "true"), ("b", name, "valid")]
    for name in meta["anchors"]:
        ints += [("a", name, "min_ok"), ("a", name, "max_ok")]
        floats += [("a", name, "min"), ("a", name, "max")]
    return ints, floats


def _meta(summary: Summary) -> dict:
    return {"width": summary.width, "key": summary.key, "nums": list(summary.nums),
            "flags": list(summary.flags), "anchors": list(summary.at_min)}


def _get(summary: Summary, path: tuple[str, ...]) -> np.ndarray:
    if len(path) == 1:
        return getattr(summary, path[0])
    kind, name, f = path
    if kind == "n":
        return getattr(summary.nums[name], f)
    if kind == "b":
        return getattr(summary.flags[name], f)
    pair = summary.at_min[name] if f.startswith("min") else summary.at_max[name]
    return pair[1] if f.endswith("_ok") else pair[0]


def encode_matrices(meta: dict, int_matrix: np.ndarray, float_matrix: np.ndarray) -> bytes:
    """A summary's blob from its layout meta and two matrices (`summary_matrices`)."""
    return pack_arrays({"meta": json.dumps(meta).encode(), "i": int_matrix, "f": float_matrix})


def encode_summary(summary: Summary) -> bytes:
    if summary.matrices is not None:
        return encode_matrices(*summary.matrices)
    meta = _meta(summary)
    ints, floats = _layout(meta)
    m = len(summary)
    int_matrix = np.empty((m, len(ints)), np.int64)
    float_matrix = np.empty((m, len(floats)), np.float64)
    for j, path in enumerate(ints):
        int_matrix[:, j] = _get(summary, path)
    for j, path in enumerate(floats):
        float_matrix[:, j] = _get(summary, path)
    return encode_matrices(meta, int_matrix, float_matrix)


def decode_summaries(blobs: list[bytes]) -> Summary:
    """Several summaries of one layout (ascending), decoded and concatenated in one pass."""
    if not blobs:
        raise ValueError("nothing to decode")
    parts = [unpack_arrays(blob) for blob in blobs]
    meta = json.loads(parts[0]["meta"])
    if any(p["meta"] != parts[0]["meta"] for p in parts[1:]):   # registry changed between chunks
        return concat([decode_summary(blob) for blob in blobs])
    int_matrix = np.concatenate([p["i"] for p in parts]) if len(parts) > 1 else parts[0]["i"]
    float_matrix = np.concatenate([p["f"] for p in parts]) if len(parts) > 1 else parts[0]["f"]
    return from_matrices(meta, int_matrix, float_matrix)


def from_matrices(meta: dict, int_matrix: np.ndarray, float_matrix: np.ndarray) -> Summary:
    """A summary whose fields are column views of its two stored matrices (`_layout(meta)`:
    start, rows, first, last, 5 ints per numeric column, 2 per bool column, 2 per anchor;
    4 floats per numeric column, 2 per anchor)."""
    nums, flags, anchors = meta["nums"], meta["flags"], meta["anchors"]
    ci = list(int_matrix.T)
    cf = list(float_matrix.T)
    base = 4 + 5 * len(nums) + 2 * len(flags)
    oks = list((int_matrix[:, base:] != 0).T)
    summary = Summary(meta["width"], ci[0], ci[1], ci[2], ci[3], key=meta["key"],
                      matrices=(meta, int_matrix, float_matrix))
    for i, name in enumerate(nums):
        b, f = 4 + 5 * i, 4 * i
        summary.nums[name] = NumStats(ci[b], ci[b + 1], ci[b + 2], cf[f], ci[b + 3], cf[f + 1], ci[b + 4],
                                      cf[f + 2], cf[f + 3])
    b = 4 + 5 * len(nums)
    for i, name in enumerate(flags):
        summary.flags[name] = FlagStats(ci[b + 2 * i], ci[b + 2 * i + 1])
    f = 4 * len(nums)
    for i, name in enumerate(anchors):
        summary.at_min[name] = (cf[f + 2 * i], oks[2 * i])
        summary.at_max[name] = (cf[f + 2 * i + 1], oks[2 * i + 1])
    return summary


def decode_summary(blob: bytes) -> Summary:
    return decode_summaries([blob])

"""The downsampled overview of a step range, from summaries, decoding raw values only at the edges.

Semantics (today's `stats.downsample_indices`, in step space): the range is
cut into at most points/2 buckets of consecutive steps; each bucket keeps the
row of its smallest and of its largest finite key value (the first such row
on ties); rows whose key is NaN/±Inf or whose `keep` flags are true (spikes,
non-finite flags) are added when there are at most `points` of them; with
`points` >= the steps in range every step comes back unchanged. Never samples.

The bucket grid (`bucket_grid`): width w = ceil(span / buckets). When w is
finer than a summary block, raw values are read (buckets anchored at `lo`,
exactly today's buckets for a dense range). Otherwise the grid is anchored at
`lo` rounded down to the coarsest summary level g <= w (64 steps, 512, a chunk) and w is
rounded up to a multiple of g, so every bucket is whole summary entries except
where the range cuts an entry (at most one at each edge): those steps are
decoded. Rows flagged by `keep` or non-finite keys are found by decoding only
the chunks whose summaries count some. For a dense range starting on a
multiple of g with w a multiple of g the rows chosen equal today's function.

Difference from today: a bucket with no finite key value adds no min/max row
(today it adds its first row; such rows are non-finite, so they come back as
extras whenever there are at most `points` extras).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol

import numpy as np

from .codec import BLOCK, CHUNK, Chunk, Spec, decode_chunk, encode_chunk
from .summaries import Summary, combine, decode_summaries, empty_summary, encode_summary, summarize

LEVELS = (BLOCK, 8 * BLOCK, CHUNK)   # summary widths the overview reads (64, 512, 4096)
EXTRA_CHUNKS = 16   # chunks decoded at once for the rows kept beside the min/max (bounds memory)


class ChunkSource(Protocol):
    """What the overview needs from storage (the storage package implements it over SQL).

    Optionally also `kept_flags` (bool column names) and `kept_rows(chunk_ids, columns) ->
    {chunk_id: Chunk}`: per chunk, the rows whose key is not finite or that one of those
    flags marks (`kept_rows_of`), stored beside the summaries, so the rows an overview always
    keeps are read without decoding whole chunks.
    """

    def summaries(self, first_chunk: int, last_chunk: int, width: int) -> Summary:
        """Entries of `width` (one of LEVELS) over the stored chunks first..last, ascending."""

    def chunk(self, chunk_id: int, columns: tuple[str, ...]) -> Chunk | None:
        """The decoded chunk with at least `columns`, or None when not stored."""


@dataclass
class Series:
    """Rows at `steps`, in the server's RunArrays convention: float64 values, NaN where NaN or
    missing, bools as 0.0/1.0/NaN; `missing[name]` marks nulls (None when none)."""

    steps: np.ndarray
    values: dict[str, np.ndarray]
    missing: dict[str, np.ndarray | None]
    total: int                     # steps in the range
    decoded: list[int] = field(default_factory=list)   # chunk ids whose raw values were read

    @property
    def downsampled(self) -> bool:
        return len(self.steps) < self.total


@dataclass
class Grid:
    anchor: int     # first bucket starts here
    width: int      # steps per bucket
    level: int      # summary width used; 0 = raw values


def bucket_grid(lo: int, hi: int, points: int) -> Grid:
    """The buckets an overview of [lo, hi] at `points` uses (see the module docstring)."""
    buckets = max(points // 2, 1)
    span = hi - lo + 1
    width = -(-span // buckets)
    if width < BLOCK:
        return Grid(lo, max(width, 1), 0)
    level = max([g for g in LEVELS if g <= width] or [BLOCK])
    anchor = lo - lo % level
    width = -(-(hi + 1 - anchor) // buckets)
    width = -(-width // level) * level
    return Grid(anchor, width, level)


class _Rows:
    """Candidate rows: steps, key values and the wanted columns (RunArrays convention)."""

    def __init__(self, steps, key_values, values, missing):
        self.steps, self.key, self.values, self.missing = steps, key_values, values, missing

    @classmethod
    def of_chunks(cls, chunks: list[Chunk], spec: Spec, key: str, fields: tuple[str, ...], lo: int, hi: int):
        if chunks:
            steps = np.concatenate([c.steps for c in chunks])
        else:
            steps = np.zeros(0, np.int64)
        inside = (steps >= lo) & (steps <= hi)
        values, missing = {}, {}
        for name in set(fields) | {key}:   # joined first, converted once (many small chunks: kept rows)
            kind = spec[name]
            if chunks:
                v = np.concatenate([c.values[name] for c in chunks]).astype(np.float64, copy=False)[inside]
                oks = [c.valid.get(name) for c in chunks]
                ok = np.ones(len(v), bool) if all(o is None for o in oks) else np.concatenate(
                    [np.ones(len(c.steps), bool) if o is None else o for c, o in zip(chunks, oks)])[inside]
            else:
                v, ok = np.zeros(0), np.zeros(0, bool)
            if kind != "float":
                v = np.where(ok, v, np.nan)
            values[name], missing[name] = v, ~ok
        return cls(steps[inside], values[key], values, missing)

    def take(self, index) -> "_Rows":
        return _Rows(self.steps[index], self.key[index], {k: v[index] for k, v in self.values.items()},
                     {k: m[index] for k, m in self.missing.items()})

    @staticmethod
    def join(parts: list["_Rows"], names) -> "_Rows":
        return _Rows(np.concatenate([p.steps for p in parts]), np.concatenate([p.key for p in parts]),
                     {n: np.concatenate([p.values[n] for p in parts]) for n in names},
                     {n: np.concatenate([p.missing[n] for p in parts]) for n in names})


def _extremes(bucket: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per run of equal `bucket` labels (non-decreasing), the index of the first minimum and of
    the first maximum of the finite `key` values; buckets without one are left out."""
    n = len(key)
    if n == 0:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    finite = np.isfinite(key)
    cuts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
    group = np.repeat(np.arange(len(cuts)), np.diff(np.r_[cuts, n]))
    low = np.where(finite, key, np.inf)
    high = np.where(finite, key, -np.inf)
    mn = np.minimum.reduceat(low, cuts)
    mx = np.maximum.reduceat(high, cuts)
    idx = np.arange(n)
    lows = np.minimum.reduceat(np.where(finite & (low == mn[group]), idx, n), cuts)
    highs = np.minimum.reduceat(np.where(finite & (high == mx[group]), idx, n), cuts)
    return lows[lows < n], highs[highs < n]


def _keep_mask(rows: _Rows, keep: tuple[str, ...]) -> np.ndarray:
    """Rows always kept: a non-finite (or null) key, or a true `keep` flag."""
    mask = ~np.isfinite(rows.key)
    for name in keep:
        mask |= rows.values[name] == 1.0
    return mask


def _series(rows: _Rows, fields: tuple[str, ...], spec: Spec, total: int, decoded: list[int]) -> Series:
    values = {n: rows.values[n] for n in fields}
    missing = {}
    for n in fields:
        m = rows.missing[n]
        missing[n] = m if m.any() else None
    return Series(rows.steps, values, missing, total, decoded)


def overview(source: ChunkSource, spec: Spec, lo: int, hi: int, points: int, fields: tuple[str, ...],
             key: str = "pre_norm", keep: tuple[str, ...] = ("spike", "nonfinite")) -> Series:
    """Min/max-per-bucket overview of steps [lo, hi] (inclusive) for `fields` (see module docstring)."""
    if points < 1:
        raise ValueError("points must be >= 1")
    fields = tuple(f for f in fields if f != "step")
    keep = tuple(k for k in keep if spec.get(k) == "bool")
    names = tuple(dict.fromkeys(fields + (key,) + keep))
    first_chunk, last_chunk = lo // CHUNK, hi // CHUNK
    decoded: list[int] = []
    cache: dict[int, Chunk | None] = {}

    def chunks(ids) -> list[Chunk]:
        ids = list(ids)
        todo = [chunk_id for chunk_id in ids if chunk_id not in cache]
        if todo:
            cache.update(dict.fromkeys(todo))
            cache.update({chunk.chunk_id: chunk for chunk in _fetch(source, todo, names, decoded)})
        return [cache[chunk_id] for chunk_id in ids if cache[chunk_id] is not None]

    def raw(ids, a=lo, b=hi) -> _Rows:
        return _Rows.of_chunks(chunks(ids), spec, key, names, a, b)

    grid = bucket_grid(lo, hi, points)
    if grid.level == 0 or hi - lo + 1 <= points:
        rows = raw(range(first_chunk, last_chunk + 1))
        return _select(rows, grid, points, fields, keep, spec, decoded)

    level = grid.level
    entries = source.summaries(first_chunk, last_chunk, level)
    ends = entries.start + level - 1
    inner_mask = (entries.start >= lo) & (ends <= hi)
    inside = np.flatnonzero(inner_mask)     # contiguous: entries are sorted, [lo, hi] an interval
    inner = entries.take(slice(int(inside[0]), int(inside[-1]) + 1) if len(inside) else slice(0, 0))
    edge_chunks = sorted({int(s) // CHUNK for s in entries.start[~inner_mask]})
    edge_rows = raw(edge_chunks) if edge_chunks else _Rows.of_chunks([], spec, key, names, lo, hi)
    if edge_chunks:   # only the steps of the cut entries; the rest of those chunks is in `inner`
        cut = np.zeros(len(edge_rows.steps), bool)
        for s in entries.start[~inner_mask]:
            cut |= (edge_rows.steps >= s) & (edge_rows.steps < s + level)
        edge_rows = edge_rows.take(cut)
    total = int(inner.rows.sum()) + len(edge_rows.steps)
    if points >= total:   # every step: decode the chunks that hold some (never loop over empty ids)
        rows = raw(sorted({int(s) // CHUNK for s in entries.start}))
        return _select(rows, grid, points, fields, keep, spec, decoded)

    # min/max candidates: edge rows before lo's entry end, summary entries, edge rows after
    k = inner.nums[key]
    has = k.count > 0
    summary_min = _anchor_rows(inner, has, "min", names, key, spec)
    summary_max = _anchor_rows(inner, has, "max", names, key, spec)
    split = np.searchsorted(edge_rows.steps, inner.start[0] if len(inner) else hi + 1)
    before, after = edge_rows.take(slice(0, split)), edge_rows.take(slice(split, None))
    mins = _Rows.join([before, summary_min, after], names)
    maxs = _Rows.join([before, summary_max, after], names)
    low_index, _ = _extremes((mins.steps - grid.anchor) // grid.width, mins.key)
    _, high_index = _extremes((maxs.steps - grid.anchor) // grid.width, maxs.key)
    chosen = [mins.take(low_index), maxs.take(high_index)]

    # extras: non-finite keys and keep flags, from the chunks whose summaries count some
    nonfinite = inner.rows - k.count          # NaN, ±Inf and null keys
    counts = nonfinite.copy()
    for name in keep:
        counts = counts + inner.flags[name].true
    edge_extra = _keep_mask(edge_rows, keep)
    lower = max([int(nonfinite.sum())] + [int(inner.flags[n].true.sum()) for n in keep])
    if lower <= points:
        flagged = sorted({int(s) // CHUNK for s in inner.start[counts > 0]})
        parts = [_Rows.of_chunks([], spec, key, names, lo, hi)]
        stored = getattr(source, "kept_rows", None)
        if stored is not None and set(keep) <= set(getattr(source, "kept_flags", ())):
            held = stored(flagged, names)   # chunk id -> the chunk's kept rows, written at ingest
        else:
            held = {}
        missing = [chunk_id for chunk_id in flagged if chunk_id not in held]
        if held:   # small: a handful of rows per chunk, joined at once
            rows = _Rows.of_chunks([held[c] for c in flagged if c in held], spec, key, names, lo, hi)
            parts.append(rows.take(_keep_mask(rows, keep)))
        for begin in range(0, len(missing), EXTRA_CHUNKS):   # a few chunks at a time, kept rows only
            group = missing[begin:begin + EXTRA_CHUNKS]
            for chunk in _fetch(source, group, names, decoded):
                rows = _Rows.of_chunks([chunk], spec, key, names, lo, hi)
                parts.append(rows.take(_keep_mask(rows, keep)))
        extras = _Rows.join(parts + [edge_rows.take(edge_extra)], names)
        if len(np.unique(extras.steps)) <= points:
            chosen.append(extras)
    rows = _Rows.join(chosen, names)
    steps, first = np.unique(rows.steps, return_index=True)
    return _series(rows.take(first), fields, spec, total, decoded)


def kept_rows_of(chunk: Chunk, key: str, flags: tuple[str, ...]) -> Chunk:
    """The rows of `chunk` an overview always keeps: a key that is not finite, or a true flag."""
    mask = ~np.isfinite(chunk.values[key]) if key in chunk.values else np.zeros(len(chunk), bool)
    for name in flags:
        values = chunk.values.get(name)
        if values is not None:
            valid = chunk.valid.get(name)
            mask |= values if valid is None else values & valid
    rows = np.flatnonzero(mask)
    return Chunk(chunk.chunk_id, chunk.steps[rows], {n: v[rows] for n, v in chunk.values.items()},
                 {n: (ok[rows] if ok is not None else None) for n, ok in chunk.valid.items()})


def _fetch(source: ChunkSource, ids: list[int], names: tuple[str, ...], decoded: list[int]) -> list[Chunk]:
    """The stored chunks among `ids` (ascending), read at once when the source can (a `chunks`
    method: one query), else one by one; `decoded` records the ids asked for."""
    many = getattr(source, "chunks", None)
    got = many(ids, names) if many is not None else {c: source.chunk(c, names) for c in ids}
    decoded.extend(ids)
    return [got[c] for c in ids if got.get(c) is not None]


def _anchor_rows(inner: Summary, has: np.ndarray, which: str, names, key: str, spec: Spec) -> _Rows:
    k = inner.nums[key]
    steps = (k.min_step if which == "min" else k.max_step)[has]
    key_values = (k.min if which == "min" else k.max)[has]
    anchors = inner.at_min if which == "min" else inner.at_max
    values, missing = {key: key_values}, {key: np.zeros(len(steps), bool)}
    for name in names:
        if name == key:
            continue
        v, ok = anchors[name]
        v, ok = v[has], ok[has]
        values[name] = np.where(ok, v, np.nan)
        missing[name] = ~ok
    return _Rows(steps, key_values, values, missing)


def _select(rows: _Rows, grid: Grid, points: int, fields, keep, spec, decoded) -> Series:
    """The overview from raw rows (today's algorithm, buckets in step space)."""
    total = len(rows.steps)
    if points >= total:
        return _series(rows, fields, spec, total, decoded)
    low_index, high_index = _extremes((rows.steps - grid.anchor) // grid.width, rows.key)
    parts = [low_index, high_index]
    extra = np.flatnonzero(_keep_mask(rows, keep))
    if len(extra) <= points:
        parts.append(extra)
    return _series(rows.take(np.unique(np.concatenate(parts))), fields, spec, total, decoded)


class MemorySource:
    """A ChunkSource over encoded blobs in dicts: the storage layout without a database.

    Used by the tests and the benchmark; `decoded` lists every chunk decoded, so
    a test can hold the overview to "summaries, plus the edges"."""

    def __init__(self, spec: Spec, key: str | None = "pre_norm"):
        self.spec = dict(spec)
        self.key = key
        self.blobs: dict[int, dict[str, bytes]] = {}
        self.levels: dict[int, dict[int, bytes]] = {width: {} for width in LEVELS}   # width -> chunk -> blob
        self.decoded: list[int] = []

    @property
    def block_summaries(self) -> dict[int, bytes]:
        return self.levels[BLOCK]

    def put(self, chunk: Chunk) -> None:
        """Store a chunk and its summaries at every level of LEVELS (what ingest writes)."""
        self.blobs[chunk.chunk_id] = encode_chunk(chunk, self.spec)
        summary = summarize(chunk, self.spec, self.key)
        for width in LEVELS:
            summary = combine(summary, width) if width != summary.width else summary
            self.levels[width][chunk.chunk_id] = encode_summary(summary)

    def load(self, chunk_id: int) -> Chunk | None:
        blobs = self.blobs.get(chunk_id)
        return decode_chunk(chunk_id, blobs, self.spec) if blobs is not None else None

    def chunk(self, chunk_id: int, columns: tuple[str, ...]) -> Chunk | None:
        blobs = self.blobs.get(chunk_id)
        if blobs is None:
            return None
        self.decoded.append(chunk_id)
        return decode_chunk(chunk_id, blobs, self.spec, columns)

    def summaries(self, first_chunk: int, last_chunk: int, width: int) -> Summary:
        table = self.levels[width]
        ids = [c for c in sorted(table) if first_chunk <= c <= last_chunk]
        if not ids:
            return empty_summary(self.spec, self.key, width)
        return decode_summaries([table[c] for c in ids])


def series_from_arrays(steps: np.ndarray, spec: Spec, columns: Mapping[str, tuple[np.ndarray, np.ndarray | None]],
                       ) -> list[Chunk]:
    """Chunks from whole-run arrays (sorted unique steps): for loading and migration."""
    from .merge import normalize
    from .codec import split_by_chunk
    steps = np.asarray(steps, dtype=np.int64)
    values, valid = normalize(spec, len(steps), columns)
    out = []
    for chunk_id, rows in split_by_chunk(steps):
        rows = np.sort(rows)
        out.append(Chunk(chunk_id, steps[rows], {n: v[rows] for n, v in values.items()},
                         {n: (None if ok is None or ok[rows].all() else ok[rows]) for n, ok in valid.items()}))
    return out

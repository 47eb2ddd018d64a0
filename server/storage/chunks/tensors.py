"""Per-tensor norms in the chunk layout: a (steps x tensors) float32 matrix per chunk,
plus per-block per-tensor maxima, so the heatmap of a long run reads summaries.

A chunk keeps its own list of tensor names (a model may add tensors mid-run);
`present` marks which (step, tensor) cells were reported (an absent cell is not
NaN: NaN is a reported norm). Heatmap semantics are today's
`Store.tensor_norms`: past `points` steps, consecutive steps are grouped into
buckets; each tensor keeps its largest norm in the bucket, a NaN wins (it is the
thing to see), a bucket is labelled by its first step, `absent` marks tensors
a bucket never saw. Buckets are in step space (`bucket_grid` with points
buckets): whole BLOCK entries from the summaries, raw rows at the edges only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from .codec import BLOCK, CHUNK, decode_steps, encode_steps, pack_arrays, unpack_arrays
from .downsample import Grid, bucket_grid


@dataclass
class TensorChunk:
    chunk_id: int
    steps: np.ndarray            # int64, sorted
    names: list[str]
    norms: np.ndarray            # float32 (steps, names)
    present: np.ndarray | None   # bool (steps, names); None = every cell reported


@dataclass
class TensorSummary:
    """Per entry (`width` steps) and tensor: max norm (NaN if any NaN), and whether seen."""

    width: int
    start: np.ndarray            # int64
    first: np.ndarray            # int64 first step present
    names: list[str]
    max: np.ndarray              # float32 (entries, names); NaN where a NaN was seen or never seen
    seen: np.ndarray             # bool (entries, names)


def merge_tensors(chunk: TensorChunk | None, chunk_id: int, steps: np.ndarray, names: list[str],
                  norms: np.ndarray, accept: np.ndarray | None = None,
                  present: np.ndarray | None = None) -> TensorChunk:
    """Add the rows of steps not stored yet (and in `accept`, the step merge's `added` mask):
    tensor rows follow their step's fate, so a duplicate or conflicting step adds nothing.
    `present` (rows x names) marks the cells the new rows hold, when not all (a stored
    segment's own mask)."""
    incoming = present
    steps = np.asarray(steps, np.int64)
    norms = np.asarray(norms, np.float32).reshape(len(steps), len(names))
    if chunk is None and accept is None and present is None and _ascending_unique(steps, names):
        # A new segment as the agent sends it (ascending steps, each tensor once): the rows as
        # they are, without the matrix, the name index and the sort the general case builds.
        return TensorChunk(chunk_id, steps, list(names), np.ascontiguousarray(norms), None)
    if chunk is None:
        chunk = TensorChunk(chunk_id, np.zeros(0, np.int64), [], np.zeros((0, 0), np.float32), None)
    take = np.ones(len(steps), bool) if accept is None else np.asarray(accept, bool).copy()
    take &= ~np.isin(steps, chunk.steps)
    if not take.any():
        return chunk
    all_names = list(chunk.names) + [n for n in names if n not in set(chunk.names)]
    index = {n: i for i, n in enumerate(all_names)}
    old_n, new_n, width = len(chunk.steps), int(take.sum()), len(all_names)
    matrix = np.full((old_n + new_n, width), np.nan, np.float32)
    present = np.zeros((old_n + new_n, width), bool)
    matrix[:old_n, :len(chunk.names)] = chunk.norms
    present[:old_n, :len(chunk.names)] = True if chunk.present is None else chunk.present
    columns = np.array([index[n] for n in names], np.intp)
    matrix[old_n:, columns] = norms[take]
    present[old_n:, columns] = True if incoming is None else np.asarray(incoming, bool)[take]
    all_steps = np.concatenate([chunk.steps, steps[take]])
    order = np.argsort(all_steps, kind="stable")
    present = present[order]
    return TensorChunk(chunk_id, all_steps[order], all_names, matrix[order], None if present.all() else present)


def _ascending_unique(steps: np.ndarray, names: list[str]) -> bool:
    return len(steps) > 0 and bool(np.all(steps[1:] > steps[:-1])) and len(set(names)) == len(names)


def encode_tensors(chunk: TensorChunk) -> bytes:
    arrays = {"steps": encode_steps(chunk.chunk_id, chunk.steps), "names": json.dumps(chunk.names).encode(),
              "norms": chunk.norms.astype("<f4", copy=False)}
    if chunk.present is not None:
        arrays["present"] = np.packbits(chunk.present, axis=None, bitorder="little").tobytes()
    return pack_arrays(arrays)


def decode_tensors(chunk_id: int, blob: bytes) -> TensorChunk:
    arrays = unpack_arrays(blob)
    steps = decode_steps(chunk_id, arrays["steps"])
    names = json.loads(arrays["names"])
    norms = np.asarray(arrays["norms"]).reshape(len(steps), len(names))
    present = None
    if "present" in arrays:
        bits = np.unpackbits(np.frombuffer(arrays["present"], np.uint8), count=norms.size, bitorder="little")
        present = bits.astype(bool).reshape(norms.shape)
    return TensorChunk(chunk_id, steps, names, norms, present)


def _bucket_max(labels: np.ndarray, norms: np.ndarray, seen: np.ndarray | None) -> tuple:
    """Per run of equal labels: cut positions, max with NaN winning, and seen (None: every cell)."""
    cuts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
    if seen is None:   # every cell reported: np.maximum keeps a NaN, one pass
        return cuts, np.maximum.reduceat(norms, cuts, axis=0).astype(np.float32, copy=False), \
            np.ones((len(cuts), norms.shape[1]), bool)
    nan = np.isnan(norms) & seen
    high = np.maximum.reduceat(np.where(seen & ~nan, norms, -np.inf), cuts, axis=0)
    any_nan = np.logical_or.reduceat(nan, cuts, axis=0)
    any_seen = np.logical_or.reduceat(seen, cuts, axis=0)
    high = high.astype(np.float32)
    high[any_nan | ~any_seen] = np.nan
    return cuts, high, any_seen


def summarize_tensors(chunk: TensorChunk, width: int = BLOCK) -> TensorSummary:
    if len(chunk.steps) == 0:
        return TensorSummary(width, np.zeros(0, np.int64), np.zeros(0, np.int64), list(chunk.names),
                             np.zeros((0, len(chunk.names)), np.float32), np.zeros((0, len(chunk.names)), bool))
    labels = chunk.steps // width
    cuts, high, any_seen = _bucket_max(labels, chunk.norms, chunk.present)
    return TensorSummary(width, labels[cuts] * width, chunk.steps[cuts], list(chunk.names), high, any_seen)


def encode_tensor_summary(summary: TensorSummary) -> bytes:
    return pack_arrays({"meta": json.dumps({"width": summary.width, "names": summary.names}).encode(),
                        "start": summary.start, "first": summary.first, "max": summary.max.astype("<f4"),
                        "seen": summary.seen.astype(np.uint8)})


def decode_tensor_summary(blob: bytes) -> TensorSummary:
    a = unpack_arrays(blob)
    meta = json.loads(a["meta"])
    return TensorSummary(meta["width"], a["start"], a["first"], meta["names"], a["max"], a["seen"].astype(bool))


@dataclass
class Heatmap:
    names: list[str]
    labels: np.ndarray     # int64: first step of each bucket (each step when not downsampled)
    norms: np.ndarray      # float32 (buckets, names); NaN where a NaN was reported or absent
    absent: np.ndarray     # bool (buckets, names)
    decoded: list[int]


def heatmap(load_chunk, load_summaries, lo: int, hi: int, points: int) -> Heatmap:
    """Per-tensor norms over [lo, hi] in at most about `points` buckets.

    `load_chunk(chunk_id) -> TensorChunk | None`; `load_summaries(first_chunk, last_chunk)
    -> list[TensorSummary]` (BLOCK entries, ascending). Raw rows are decoded only
    for entries the range cuts, or everything when the buckets are finer than a block.
    """
    first_chunk, last_chunk = lo // CHUNK, hi // CHUNK
    grid = bucket_grid(lo, hi, max(points, 1) * 2)   # `points` buckets (the grid halves points)
    decoded: list[int] = []
    pieces: list[tuple[np.ndarray, np.ndarray, list[str], np.ndarray, np.ndarray]] = []  # steps, first, names, max, seen

    def raw(chunk_ids, keep) -> None:
        for chunk_id in chunk_ids:
            chunk = load_chunk(chunk_id)
            decoded.append(chunk_id)
            if chunk is None:
                continue
            mask = (chunk.steps >= lo) & (chunk.steps <= hi) & keep(chunk.steps)
            if mask.any():
                seen = np.ones(chunk.norms.shape, bool) if chunk.present is None else chunk.present
                pieces.append((chunk.steps[mask], chunk.steps[mask], chunk.names, chunk.norms[mask], seen[mask]))

    if grid.level == 0 or hi - lo + 1 <= points:
        raw(range(first_chunk, last_chunk + 1), lambda s: np.ones(len(s), bool))
        grid = Grid(lo, 1, 0) if sum(len(p[0]) for p in pieces) <= points else grid
    else:
        summaries = [s for s in load_summaries(first_chunk, last_chunk) if len(s.start)]
        cut_starts = []
        for s in summaries:
            inside = (s.start >= lo) & (s.start + s.width - 1 <= hi)
            if inside.any():
                pieces.append((s.start[inside], s.first[inside], s.names, s.max[inside], s.seen[inside]))
            cut_starts.extend(s.start[~inside].tolist())
        if cut_starts:
            cut = np.array(cut_starts)
            raw(sorted({c // CHUNK for c in cut_starts}),
                lambda steps: np.isin(steps // BLOCK * BLOCK, cut))
    names: list[str] = []
    index: dict[str, int] = {}
    for piece in pieces:
        for name in piece[2]:
            if name not in index:
                index[name] = len(names)
                names.append(name)
    if not pieces:
        return Heatmap(names, np.zeros(0, np.int64), np.zeros((0, 0), np.float32), np.zeros((0, 0), bool), decoded)
    pieces.sort(key=lambda p: int(p[1][0]))
    keys = np.concatenate([p[0] for p in pieces])
    firsts = np.concatenate([p[1] for p in pieces])
    order = np.argsort(firsts, kind="stable")
    width = len(names)
    matrix = np.full((len(keys), width), np.nan, np.float32)
    seen = np.zeros((len(keys), width), bool)
    row = 0
    for piece in pieces:
        columns = np.array([index[n] for n in piece[2]], np.intp)
        count = len(piece[0])
        matrix[row:row + count, columns] = piece[3]
        seen[row:row + count, columns] = piece[4]
        row += count
    firsts, matrix, seen = firsts[order], matrix[order], seen[order]
    labels_of = (firsts - grid.anchor) // grid.width
    cuts, high, any_seen = _bucket_max(labels_of, matrix, seen)
    return Heatmap(names, firsts[cuts], high, ~any_seen, decoded)

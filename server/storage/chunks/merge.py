"""Merging a batch into decoded chunks: today's ingest semantics as pure functions.

Ingest is idempotent on (run, step): a step not stored yet is added; a step
sent again with equal values is a duplicate; with any different value it is a
conflict, reported with both values, and the stored row is kept (never an
overwrite). "Equal" is per column: both null, or both present and
bit-for-bit equal, where every NaN equals every NaN; an integer sent for a
float column is compared as the float64 it means. A column the batch does not
send is null for its rows (so leaving out a column that was stored is a
conflict, as today). Steps may come in any order and span chunks; a late step
lands in its chunk like any other, with no other chunk touched.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from .codec import Chunk, Spec, empty_values, split_by_chunk, CHUNK

ColumnInput = np.ndarray | tuple[np.ndarray, np.ndarray | None]


@dataclass
class Conflict:
    step: int
    fields: dict[str, tuple[Any, Any]]   # name -> (stored, sent); None for null, floats as Python floats


@dataclass
class MergeResult:
    """One chunk's merge. Masks are over the rows given to `merge_chunk` (its `rows`)."""

    chunk: Chunk                  # the chunk with the new steps added (the input chunk when none)
    rows: np.ndarray              # indices into the batch of the rows that belong to this chunk
    added: np.ndarray             # bool per row: stored now
    duplicate: np.ndarray         # bool per row: equal resend
    conflicts: list[Conflict] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.added.any())


@dataclass
class BatchMerge:
    """A whole batch's merge: per-chunk results and batch-wide masks (in the batch's row order)."""

    chunks: dict[int, MergeResult]
    added: np.ndarray
    duplicate: np.ndarray
    conflicts: list[Conflict]

    def answer(self) -> dict[str, int]:
        return {"accepted": int(self.added.sum()), "duplicates": int(self.duplicate.sum()),
                "conflicts": len(self.conflicts)}


def normalize(spec: Spec, n: int, columns: Mapping[str, ColumnInput]) -> tuple[dict, dict]:
    """Batch columns as (values, valid) in the codec's dtypes.

    A column is an array or (values, missing). Floats: anything numpy reads as a
    number (ints become the float64 they mean), NaN a value, `missing` marks nulls.
    Bools: a bool array, or 0.0/1.0 floats with NaN or `missing` for null (the
    server's parsed-batch form). Ints: int64. Columns not in `columns` are all null.
    """
    unknown = set(columns) - set(spec)
    if unknown:
        raise ValueError(f"columns not in the spec: {sorted(unknown)}")
    values: dict[str, np.ndarray] = {}
    valid: dict[str, np.ndarray | None] = {}
    for name, kind in spec.items():
        item = columns.get(name)
        if item is None:
            values[name], valid[name] = empty_values(kind, n), np.zeros(n, dtype=bool)
            continue
        raw, missing = item if isinstance(item, tuple) else (item, None)
        raw = np.asarray(raw)
        if len(raw) != n:
            raise ValueError(f"column '{name}' has {len(raw)} values for {n} steps")
        ok = None if missing is None else ~np.asarray(missing, dtype=bool)
        if kind == "float":
            array = np.asarray(raw, dtype=np.float64)   # a copy is made below only where it is changed
        elif kind == "bool":
            if raw.dtype == bool:
                array = raw
            else:
                as_float = np.asarray(raw, dtype=np.float64)
                nan = np.isnan(as_float)
                if nan.any():
                    ok = ~nan if ok is None else ok & ~nan
                array = as_float == 1.0
        else:
            array = raw.astype(np.int64)
        if ok is not None:
            array = array.copy()
            array[~ok] = empty_values(kind, 1)[0]
            if ok.all():
                ok = None
        values[name], valid[name] = array, ok
    return values, valid


def _valid(mask: np.ndarray | None, n: int) -> np.ndarray:
    return np.ones(n, dtype=bool) if mask is None else mask


def _equal(kind: str, a: np.ndarray, a_ok: np.ndarray, b: np.ndarray, b_ok: np.ndarray) -> np.ndarray:
    if kind == "float":
        same = (a.view(np.uint64) == b.view(np.uint64)) | (np.isnan(a) & np.isnan(b))
    else:
        same = a == b
    return (a_ok == b_ok) & (same | ~a_ok)


def _python(kind: str, value, ok: bool):
    if not ok:
        return None
    return float(value) if kind == "float" else bool(value) if kind == "bool" else int(value)


def merge_chunk(chunk: Chunk, steps: np.ndarray, values: Mapping[str, np.ndarray],
                valid: Mapping[str, np.ndarray | None], spec: Spec) -> MergeResult:
    """Merge normalized rows (all in `chunk`'s span, steps unique) into `chunk`; pure."""
    steps = np.asarray(steps, dtype=np.int64)
    n = len(steps)
    if n and (steps.min() // CHUNK != chunk.chunk_id or steps.max() // CHUNK != chunk.chunk_id):
        raise ValueError(f"steps outside chunk {chunk.chunk_id}")
    rows = np.arange(n)
    if not len(chunk.steps):   # nothing stored (a new chunk, an append's rows): every row is new
        return _fresh(chunk.chunk_id, steps, values, valid, spec, rows)
    position = np.searchsorted(chunk.steps, steps)
    found = position < len(chunk.steps)
    found[found] = chunk.steps[position[found]] == steps[found]
    duplicate = np.zeros(n, dtype=bool)
    conflicts: list[Conflict] = []
    if found.any():
        old_rows = position[found]
        sent_rows = np.flatnonzero(found)
        row_equal = np.ones(len(sent_rows), dtype=bool)
        differing: dict[str, np.ndarray] = {}
        for name, kind in spec.items():
            stored = chunk.values.get(name)
            if stored is None:
                stored, stored_ok = empty_values(kind, len(old_rows)), np.zeros(len(old_rows), dtype=bool)
            else:
                stored, stored_ok = stored[old_rows], _valid(chunk.valid.get(name), len(chunk.steps))[old_rows]
            sent, sent_ok = values[name][sent_rows], _valid(valid[name], n)[sent_rows]
            equal = _equal(kind, stored, stored_ok, sent, sent_ok)
            if not equal.all():
                differing[name] = ~equal
                row_equal &= equal
        duplicate[sent_rows[row_equal]] = True
        for index in np.flatnonzero(~row_equal).tolist():
            old, new = int(old_rows[index]), int(sent_rows[index])
            fields = {}
            for name, mask in differing.items():
                if mask[index]:
                    kind = spec[name]
                    stored_ok = chunk.values.get(name) is not None and bool(
                        _valid(chunk.valid.get(name), len(chunk.steps))[old])
                    stored = _python(kind, chunk.values[name][old], stored_ok) if stored_ok else None
                    fields[name] = (stored, _python(kind, values[name][new], bool(_valid(valid[name], n)[new])))
            conflicts.append(Conflict(step=int(steps[new]), fields=fields))
    added = ~found
    if not added.any():
        return MergeResult(chunk, rows, added, duplicate, conflicts)
    every = bool(added.all())
    new_steps = steps if every else steps[added]
    all_steps = np.concatenate([chunk.steps, new_steps])
    # an append (every new step after the stored ones, ascending: what an agent sends) is
    # already in order: no sort, and no gather after the join
    appended = (not len(chunk.steps) or new_steps[0] > chunk.steps[-1]) and bool(np.all(new_steps[1:] > new_steps[:-1]))
    order = None if appended else np.argsort(all_steps, kind="stable")
    merged = Chunk(chunk.chunk_id, all_steps if order is None else all_steps[order])
    old_n = len(chunk.steps)
    for name, kind in spec.items():
        old_values = chunk.values.get(name)
        if old_values is None:
            old_values, old_ok = empty_values(kind, old_n), np.zeros(old_n, dtype=bool)
        else:
            old_ok = chunk.valid.get(name)
        sent_ok = valid[name]
        new_ok = None if sent_ok is None else sent_ok if every else sent_ok[added]
        joined_values = np.concatenate([old_values, values[name] if every else values[name][added]])
        merged.values[name] = joined_values if order is None else joined_values[order]
        if old_ok is None and new_ok is None:
            merged.valid[name] = None
        else:
            joined = np.concatenate([_valid(old_ok, old_n), _valid(new_ok, len(new_steps))])
            if order is not None:
                joined = joined[order]
            merged.valid[name] = None if joined.all() else joined
    return MergeResult(merged, rows, added, duplicate, conflicts)


def _fresh(chunk_id: int, steps: np.ndarray, values: Mapping[str, np.ndarray],
           valid: Mapping[str, np.ndarray | None], spec: Spec, rows: np.ndarray) -> MergeResult:
    """`merge_chunk` into a chunk holding nothing: the rows themselves, in step order."""
    n = len(steps)
    order = None if n < 2 or bool(np.all(steps[1:] > steps[:-1])) else np.argsort(steps, kind="stable")
    merged = Chunk(chunk_id, steps if order is None else steps[order])
    for name in spec:
        ok = valid[name]
        merged.values[name] = values[name] if order is None else values[name][order]
        merged.valid[name] = None if ok is None else ok if order is None else ok[order]
    return MergeResult(merged, rows, np.ones(n, dtype=bool), np.zeros(n, dtype=bool))


def merge_batch(load: Callable[[int], Chunk | None], steps: np.ndarray, columns: Mapping[str, ColumnInput],
                spec: Spec) -> BatchMerge:
    """Merge a batch (steps unique, any order, any chunks) into the chunks `load(chunk_id)` returns
    (None: a chunk not stored yet). Only chunks the batch touches are loaded."""
    steps = np.asarray(steps, dtype=np.int64)
    n = len(steps)
    if n and not np.all(steps[1:] > steps[:-1]) and len(np.unique(steps)) != n:   # sorted: unique
        raise ValueError("a batch repeats a step")
    if n and steps.min() < 0:
        raise ValueError("steps must be >= 0")
    values, valid = normalize(spec, n, columns)
    added = np.zeros(n, dtype=bool)
    duplicate = np.zeros(n, dtype=bool)
    conflicts: list[Conflict] = []
    results: dict[int, MergeResult] = {}
    for chunk_id, rows in split_by_chunk(steps):
        rows = np.sort(rows)
        chunk = load(chunk_id) or Chunk.empty(chunk_id, spec)
        # consecutive rows (a sorted batch) are a slice: views, no copy of every column
        pick = slice(int(rows[0]), int(rows[-1]) + 1) if int(rows[-1]) - int(rows[0]) + 1 == len(rows) else rows
        result = merge_chunk(chunk, steps[pick], {k: v[pick] for k, v in values.items()},
                             {k: (v[pick] if v is not None else None) for k, v in valid.items()}, spec)
        result.rows = rows
        added[rows] = result.added
        duplicate[rows] = result.duplicate
        conflicts.extend(result.conflicts)
        results[chunk_id] = result
    conflicts.sort(key=lambda c: c.step)
    return BatchMerge(results, added, duplicate, conflicts)

"""Chunk codec and merge: boundaries, NaN/Inf/null round trips, float32/float64 choice,
duplicates and conflicts. References are hand-written values and plain Python loops."""
from __future__ import annotations

import math
import struct

import numpy as np
import pytest

from gradwatch.server.storage.chunks import (BLOCK, CHUNK, Chunk, CodecError, column_storage, decode_chunk,
                                             decode_column, decode_steps, encode_chunk, encode_column,
                                             encode_steps, merge_batch, pack_arrays, unpack_arrays)

SPEC = {"pre_norm": "float", "loss": "float", "clipped": "bool", "spike": "bool", "count": "int"}


def bits(x: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", x))[0]


def test_float32_only_when_every_value_round_trips():
    exact = np.array([1.5, 0.25, -3.0, np.nan, np.inf, -np.inf, -0.0, 2.0 ** -20])
    blob = encode_column("float", exact)
    assert column_storage(blob) == "float32"
    assert len(blob) == 1 + 4 * len(exact)
    back, valid = decode_column("float", blob, len(exact))
    assert valid is None
    assert [bits(v) for v in back.tolist()] == [bits(v) for v in exact.tolist()]   # -0.0 and NaN kept
    inexact = exact.copy()
    inexact[2] = 0.1                                   # 0.1 is not a float32
    blob = encode_column("float", inexact)
    assert column_storage(blob) == "float64"
    back, _ = decode_column("float", blob, len(inexact))
    assert [bits(v) for v in back.tolist()] == [bits(v) for v in inexact.tolist()]


def test_null_kept_apart_from_nan_and_does_not_force_float64():
    values = np.array([1.0, np.nan, 7.0, 2.5])
    valid = np.array([True, True, False, True])          # slot 2 is null (its 7.0 is ignored)
    blob = encode_column("float", values, valid)
    assert column_storage(blob) == "float32"
    back, ok = decode_column("float", blob, 4)
    assert ok.tolist() == [True, True, False, True]
    assert back[0] == 1.0 and math.isnan(back[1]) and back[3] == 2.5
    all_null = encode_column("float", values, np.zeros(4, bool))
    assert column_storage(all_null) == "null" and len(all_null) == 1
    back, ok = decode_column("float", all_null, 4)
    assert not ok.any()


def test_bools_with_nulls_and_ints():
    values = np.array([True, False, True, True, False, False, True, False, True, True])
    valid = np.array([True, True, False, True, True, True, True, True, False, True])
    blob = encode_column("bool", values, valid)
    assert len(blob) == 1 + 2 + 2                       # code, validity bits, value bits
    back, ok = decode_column("bool", blob, 10)
    assert ok.tolist() == valid.tolist()
    assert [b for b, o in zip(back.tolist(), valid.tolist()) if o] == [v for v, o in zip(values.tolist(),
                                                                                       valid.tolist()) if o]
    small = encode_column("int", np.array([1, -5, 2 ** 31 - 1]))
    big = encode_column("int", np.array([1, 2 ** 40]))
    assert column_storage(small) == "int32" and column_storage(big) == "int64"
    assert decode_column("int", big, 2)[0].tolist() == [1, 2 ** 40]


def test_steps_offsets_or_bitmap_and_bad_blobs():
    sparse = np.array([5, 17, 4095]) + 3 * CHUNK
    blob = encode_steps(3, sparse)
    assert len(blob) == 1 + 6
    assert decode_steps(3, blob).tolist() == sparse.tolist()
    dense = np.arange(3 * CHUNK, 4 * CHUNK - 1)
    blob = encode_steps(3, dense)
    assert len(blob) == 1 + CHUNK // 8
    assert decode_steps(3, blob).tolist() == dense.tolist()
    with pytest.raises(ValueError):
        encode_steps(2, sparse)
    with pytest.raises(CodecError):
        decode_column("float", b"\x01abc", 2)
    with pytest.raises(CodecError):
        decode_steps(0, b"\x09")


def test_compressed_column_round_trips():
    values = np.repeat([1.0, 2.0], 2000)
    blob = encode_column("float", values, level=1)
    assert len(blob) < 200
    assert decode_column("float", blob, 4000)[0].tolist() == values.tolist()


def test_pack_arrays_round_trip():
    blob = pack_arrays({"a": np.arange(5, dtype=np.int64), "b": b"xyz", "c": np.ones((2, 3), np.float32)})
    out = unpack_arrays(blob)
    assert out["a"].tolist() == [0, 1, 2, 3, 4] and out["b"] == b"xyz" and out["c"].shape == (2, 3)


class Store:
    """Chunks as encoded blobs, as a table of (chunk_id -> blobs) would hold them."""

    def __init__(self):
        self.blobs: dict[int, dict[str, bytes]] = {}
        self.loads: list[int] = []

    def load(self, chunk_id: int):
        self.loads.append(chunk_id)
        blobs = self.blobs.get(chunk_id)
        return decode_chunk(chunk_id, blobs, SPEC) if blobs else None

    def ingest(self, steps, columns):
        self.loads.clear()
        result = merge_batch(self.load, np.array(steps), columns, SPEC)
        for chunk_id, part in result.chunks.items():
            if part.changed:
                self.blobs[chunk_id] = encode_chunk(part.chunk, SPEC)
        return result

    def rows(self) -> dict[int, dict]:
        """Every stored step as {name: python value or None}, by decoding every chunk."""
        out = {}
        for chunk_id in sorted(self.blobs):
            chunk = decode_chunk(chunk_id, self.blobs[chunk_id], SPEC)
            for i, step in enumerate(chunk.steps.tolist()):
                row = {}
                for name in SPEC:
                    ok = chunk.valid[name] is None or chunk.valid[name][i]
                    row[name] = chunk.values[name][i].item() if ok else None
                out[step] = row
        return out


def test_batch_spanning_chunks_and_late_step_into_old_chunk():
    store = Store()
    steps = list(range(CHUNK - 3, CHUNK + 3))                    # 3 steps in chunk 0, 3 in chunk 1
    pre = [0.5, float("nan"), float("inf"), 0.1, -float("inf"), 2.0]
    result = store.ingest(steps, {"pre_norm": np.array(pre), "clipped": np.array([1.0, 0, np.nan, 1, 0, 1])})
    assert result.answer() == {"accepted": 6, "duplicates": 0, "conflicts": 0}
    assert sorted(store.blobs) == [0, 1]
    rows = store.rows()
    assert [bits(rows[s]["pre_norm"]) for s in steps] == [bits(v) for v in pre]
    assert [rows[s]["clipped"] for s in steps] == [True, False, None, True, False, True]
    assert all(rows[s]["loss"] is None and rows[s]["count"] is None for s in steps)
    # a late step (a resumed run, a replayed spool) lands in chunk 0; only chunk 0 is read
    result = store.ingest([7], {"pre_norm": np.array([3.0]), "loss": (np.array([1.0]), np.array([True]))})
    assert result.answer()["accepted"] == 1 and store.loads == [0]
    rows = store.rows()
    assert sorted(rows) == [7] + steps
    assert rows[7]["pre_norm"] == 3.0 and rows[7]["loss"] is None


def test_duplicate_and_conflict_inside_a_chunk_never_overwrite():
    store = Store()
    store.ingest([10, 11, 12, 13], {"pre_norm": np.array([1.0, np.nan, 2.0, 4.0]),
                                    "loss": (np.array([0.0, 0.0, 5.0, 6.0]), np.array([True, True, False, False])),
                                    "count": np.array([1, 2, 3, 4])})
    # resend: 10 equal, 11 equal (NaN == NaN, null == null), 12 int 2 for float 2.0 (equal),
    # 13 different pre_norm; 14 new, out of order
    result = store.ingest([14, 13, 12, 11, 10], {
        "pre_norm": np.array([9.0, 4.5, 2, np.nan, 1.0]),
        "loss": (np.array([0.0, 6.0, 5.0, 0.0, 0.0]), np.array([False, False, False, True, True])),
        "count": np.array([5, 4, 3, 2, 1])})
    assert result.answer() == {"accepted": 1, "duplicates": 3, "conflicts": 1}
    assert result.added.tolist() == [True, False, False, False, False]
    assert result.duplicate.tolist() == [False, False, True, True, True]
    (conflict,) = result.conflicts
    assert conflict.step == 13 and conflict.fields == {"pre_norm": (4.0, 4.5)}
    assert store.rows()[13]["pre_norm"] == 4.0                   # stored value kept
    # a column left out that was stored, or NaN against a number: conflicts naming both values
    result = store.ingest([10, 11], {"pre_norm": np.array([1.0, 3.0])})
    assert result.answer() == {"accepted": 0, "duplicates": 0, "conflicts": 2}
    assert result.conflicts[0].fields == {"count": (1, None)}
    assert result.conflicts[1].fields["pre_norm"][1] == 3.0 and math.isnan(result.conflicts[1].fields["pre_norm"][0])
    assert sorted(store.rows()) == [10, 11, 12, 13, 14]


def test_round_trip_random_chunks_against_python_rows():
    rng = np.random.default_rng(3)
    store = Store()
    expected: dict[int, dict] = {}
    for batch in range(6):
        steps = rng.choice(3 * CHUNK, 700, replace=False)
        steps = steps[~np.isin(steps, list(expected))]
        n = len(steps)
        pre = rng.normal(size=n)
        pre[rng.random(n) < 0.05] = np.nan
        pre[rng.random(n) < 0.05] = np.inf
        if batch % 2:
            pre = pre.astype(np.float32).astype(np.float64)
        loss_missing = rng.random(n) < 0.3
        loss = rng.normal(size=n)
        clipped = rng.choice([0.0, 1.0, np.nan], n)
        store.ingest(steps, {"pre_norm": pre, "loss": (loss, loss_missing), "clipped": clipped})
        for i, step in enumerate(steps.tolist()):
            expected[step] = {"pre_norm": pre[i], "loss": None if loss_missing[i] else loss[i],
                              "clipped": None if math.isnan(clipped[i]) else clipped[i] == 1.0,
                              "spike": None, "count": None}
    rows = store.rows()
    assert sorted(rows) == sorted(expected)
    for step, row in expected.items():
        got = rows[step]
        assert bits(got["pre_norm"]) == bits(row["pre_norm"]) or (math.isnan(got["pre_norm"])
                                                                  and math.isnan(row["pre_norm"]))
        assert got["loss"] == row["loss"] and got["clipped"] == row["clipped"] and got["spike"] is None


def test_batch_repeating_a_step_is_refused():
    with pytest.raises(ValueError):
        merge_batch(lambda c: None, np.array([1, 1]), {"pre_norm": np.array([1.0, 1.0])}, SPEC)


def test_block_divides_chunk():
    assert CHUNK % BLOCK == 0 and Chunk.empty(0, SPEC).nbytes() == 0


def test_segments_decode_as_their_chunks_joined():
    """A chunk stored as segments (few steps: offsets; many: a bitmap; a column null in one
    segment, absent from another) reads as each segment decoded and concatenated, and segments
    that share a step are refused."""
    from gradwatch.server.storage.chunks import decode_segments

    spec = {"pre_norm": "float", "loss": "float", "spike": "bool"}
    rng = np.random.default_rng(11)
    bounds = [0, 5, 700, 760, 2100, 4096]          # 5 and 60 steps: offsets; the rest: bitmaps
    base = 3 * CHUNK
    segments, expected_steps, expected = [], [], {name: [] for name in spec}
    for a, b in zip(bounds[:-1], bounds[1:]):
        steps = base + np.sort(rng.choice(np.arange(a, b), max(1, (b - a) * 3 // 4), replace=False))
        pre = rng.lognormal(size=len(steps))
        pre[0] = np.nan
        loss_ok = rng.random(len(steps)) < 0.7 if a else np.zeros(len(steps), bool)   # all null in the first
        chunk = Chunk(3, steps, {"pre_norm": pre, "loss": np.where(loss_ok, rng.normal(size=len(steps)), np.nan),
                                 "spike": pre > 2.0}, {"pre_norm": None, "loss": loss_ok, "spike": None})
        blobs = encode_chunk(chunk, spec)
        if a == 2100:
            del blobs["loss"]                      # a segment without the column's row (all null)
            loss_ok[:] = False
        segments.append(blobs)
        one = decode_chunk(3, blobs, spec)
        expected_steps.append(steps)
        for name in spec:
            expected[name].append((one.values[name], one.valid[name]))
    joined = decode_segments(3, segments, spec)
    assert joined.steps.tolist() == np.concatenate(expected_steps).tolist()
    for name in spec:
        values = np.concatenate([v for v, _ in expected[name]])
        valid = np.concatenate([np.ones(len(v), bool) if ok is None else ok for v, ok in expected[name]])
        got_valid = np.ones(len(joined.steps), bool) if joined.valid[name] is None else joined.valid[name]
        assert got_valid.tolist() == valid.tolist(), name
        assert np.array_equal(joined.values[name][valid], values[valid], equal_nan=True), name
    with pytest.raises(CodecError):
        decode_segments(3, [segments[1], segments[1]], spec)

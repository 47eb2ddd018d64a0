"""Ingest parsing is bounded: a binary (msgpack) body costs at most 1.5x its size, whatever it
holds; a JSON body costs what orjson builds, at most the 36x it is charged, and is small (8 MiB).

Measured, not assumed: tracemalloc's peak while the real decoder (`server/wire/`) reads valid
binary batches and each hostile shape, and the peak resident memory (VmHWM) of a real
`gradwatch serve` while it refuses a hostile binary body, once and four at once (the ByteBudget
lets two bodies of the limit's size in at a time: the others wait before their bytes are read).
Memory figures do not depend on the clock.
"""
from __future__ import annotations

import http.client
import random
import sys
import threading
import tracemalloc
from pathlib import Path

import msgpack
import numpy as np
import orjson
import pytest

from gradwatch.agent.wire import typed_array as typed
from gradwatch.server.wire import BatchError, json_decode, msgpack_decode, parse_batch
from gradwatch.server.wire.models import MAX_EVENTS

from .procs import ServerProcess

MiB = 1 << 20
SIZE = 4 * MiB
FLOATS = ("pre_norm", "post_norm", "scale", "threshold", "loss", "z", "ema")
BOOLS = ("clipped", "spike", "nonfinite", "skipped", "level_shift")


def agent_columns(n: int) -> dict:
    """An agent's batch as plain numpy columns (what both encodings are built from)."""
    rng = np.random.default_rng(1)
    pre = np.exp(rng.normal(0, 0.3, n)).astype(np.float32)
    pre[::97] = np.nan
    columns = {"step": np.arange(10**6, 10**6 + n, dtype=np.int64), "time": 1.7e9 + np.arange(n) * 0.01,
               "lr": np.full(n, 3e-4)}
    columns.update({name: pre * (index + 1) for index, name in enumerate(FLOATS)})
    columns.update({name: (pre > 1.2 + index / 10) for index, name in enumerate(BOOLS)})
    return columns


def binary(columns: dict, **extra) -> bytes:
    return msgpack.packb({**{name: typed(values) for name, values in columns.items()}, **extra})


def as_json(columns: dict) -> bytes:
    def cell(value):
        return value if value == value else "NaN"
    return orjson.dumps({name: [cell(v) for v in values.tolist()] if values.dtype.kind == "f" else values.tolist()
                         for name, values in columns.items()})


def agent_body(size: int) -> bytes:
    return binary(agent_columns(size // 70))


def tensor_body(size: int) -> bytes:
    n = size // 1208
    norms = np.random.default_rng(2).random((n, 300)).astype(np.float32)
    norms[3, 7] = np.nan
    return binary({"step": np.arange(n, dtype=np.int64), "pre_norm": np.ones(n, np.float32)},
                  tensor_norms={"names": [f"layers.{i}.weight" for i in range(300)], "norms": typed(norms)})


def bools_body(size: int) -> bytes:
    """The valid body with the most values per byte: 1-byte flags beside the two required columns."""
    n = size // 13
    return binary({"step": np.arange(n, dtype=np.int64), "pre_norm": np.ones(n, np.float32),
                   **{name: np.zeros(n, bool) for name in BOOLS}})


VALID = {"agent batch": agent_body, "tensor norms": tensor_body, "1-byte flags": bools_body}


def unsorted_steps(size: int) -> bytes:
    n = size // 12
    steps = np.arange(n, dtype=np.int64)[::-1].copy()
    steps[-1] = steps[0]
    return binary({"step": steps, "pre_norm": np.ones(n, np.float32)})


SIZES = (MiB, SIZE)  # 1 MiB: where msgpack's default 1 MiB unpacker buffer was another body


def hostile(shape: str, size: int) -> tuple[bytes, int, str]:
    """A hostile body of about `size` bytes -> (it, its status, the start of its refusal)."""
    if shape == "a column of empty maps":
        return msgpack.packb({"step": [0], "pre_norm": [{}] * size}), 413, "column 'pre_norm' is too large to read"
    if shape == "a column nested deep":
        return b"\x82\xa4step\x91\x00\xa8pre_norm" + b"\x91" * size + b"\x00", 422, "invalid msgpack: nested too deep"
    if shape == "names of 2-byte strings":
        return (msgpack.packb({"step": [0], "pre_norm": [1.0], "tensor_norms": {
            "names": [str(i % 100).zfill(2) for i in range(size // 3)], "norms": [[0]]}}),
            413, "field 'tensor_norms.names' is too large to read")
    if shape == "an unknown key of empty maps":
        return msgpack.packb({"step": [0], "pre_norm": [1.0], "x": [{}] * size}), 422, "unknown field 'x'"
    if shape == "unsorted steps that repeat":
        return unsorted_steps(size), 422, "column 'step' repeats step"
    assert shape == "steps as float64"
    return (binary({"step": np.arange(size // 16, dtype=np.float64), "pre_norm": np.ones(size // 16)}), 422,
            "column 'step' must hold integers (int64 or uint64), got a typed array of float64")


HOSTILE = ("a column of empty maps", "a column nested deep", "names of 2-byte strings",
           "an unknown key of empty maps", "unsorted steps that repeat", "steps as float64")
MESSAGES = {
    "meta of empty maps": (msgpack.packb({"type": "batch", "seq": 7, "run": "r", "meta": {"a": [{}] * SIZE}}),
                           422, "field 'meta' is"),
    "events of empty maps": (msgpack.packb({"type": "batch", "seq": 7, "run": "r", "events": [{}] * SIZE}),
                             413, "field 'events' is too large to read"),
    "a batch of empty maps": (msgpack.packb({"type": "batch", "seq": 7, "run": "r",
                                             "batch": {"step": [0], "pre_norm": [{}] * SIZE}}),
                              413, "column 'pre_norm' is too large to read"),
}


def measured(call, *args):
    """(result or the BatchError raised, peak bytes allocated during the call)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        result = call(*args)
    except BatchError as error:
        result = error
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, peak


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("shape", sorted(VALID))
def test_a_valid_binary_batch_parses_within_1_5x_its_size(shape, size):
    body = VALID[shape](size)
    batch, peak = measured(msgpack_decode.load_batch, body)
    assert not isinstance(batch, BatchError), batch
    assert peak <= 1.5 * len(body), f"{shape}: {peak / len(body):.2f}x"
    assert len(batch) > 200


def test_a_binary_batch_holds_the_values_of_the_same_batch_in_json():
    """The same columns in both encodings: the same steps, flags and values (float32 columns
    compared as the float32 they are), the same missing-ness (none)."""
    columns = agent_columns(3000)
    got = msgpack_decode.load_batch(binary(columns))
    want = parse_batch(orjson.loads(as_json(columns)))
    np.testing.assert_array_equal(got.steps, want.steps)
    assert set(got.columns) == set(want.columns)
    for name, column in want.columns.items():
        np.testing.assert_array_equal(np.asarray(got.columns[name].values, np.float64), column.values, err_msg=name)
        assert got.columns[name].missing is None and column.missing is None


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("shape", HOSTILE)
def test_a_hostile_binary_body_is_refused_within_1_5x_its_size(shape, size):
    body, status, message = hostile(shape, size)
    error, peak = measured(msgpack_decode.load_batch, body)
    assert isinstance(error, BatchError) and error.status == status, error
    assert str(error).startswith(message), str(error)
    assert peak <= 1.5 * len(body), f"{shape}: {peak / len(body):.2f}x"


@pytest.mark.parametrize("shape", sorted(MESSAGES))
def test_a_hostile_binary_message_is_refused_within_1_5x_its_size_with_its_seq(shape):
    body, status, message = MESSAGES[shape]
    error, peak = measured(msgpack_decode.load_message, body)
    assert isinstance(error, BatchError) and error.status == status and str(error).startswith(message), error
    assert error.seq == 7
    assert peak <= 1.5 * len(body), f"{shape}: {peak / len(body):.2f}x"


def test_the_plain_allowance_refuses_only_what_would_not_fit():
    """10,000 tensor names, a 60 KiB meta and 200 events in one small binary message are read."""
    names = [f"block.{i}.attention.weight" for i in range(10_000)]
    events = [{"kind": "drop", "step": i, "message": f"queue full: {i}", "detail": {"count": i}} for i in range(200)]
    body = msgpack.packb({"type": "batch", "seq": 3, "run": "r", "meta": {"notes": "x" * 60_000},
                          "events": events, "batch": {"step": typed(np.arange(2, dtype=np.int64)),
                                                      "pre_norm": typed(np.ones(2, np.float32)),
                                                      "tensor_norms": {"names": names,
                                                                       "norms": typed(np.ones((2, 10_000), np.float32))}}})
    seq, message = msgpack_decode.load_message(body)
    assert seq == 3 and message.batch.tensor_names == names and message.batch.tensor_norms.shape == (2, 10_000)
    assert len(message.events) == 200 < MAX_EVENTS and message.meta == {"notes": "x" * 60_000}


def test_a_json_body_costs_at_most_what_it_is_charged():
    """orjson builds an object per value: the worst shape (a list of `{}`) costs ~36x its size,
    the PARSE_FACTOR a JSON body is charged against the parse budget."""
    body = b'{"step":[0],"pre_norm":[' + b",".join([b"{}"] * (MiB // 3)) + b"]}"
    error, peak = measured(json_decode.load_batch, body)
    assert isinstance(error, BatchError)
    assert 10 * len(body) < peak <= json_decode.PARSE_FACTOR * len(body), f"{peak / len(body):.1f}x"


def test_mutated_binary_bodies_are_accepted_or_refused_with_a_4xx_never_anything_else():
    """2,000 valid binary batches with bytes inserted, deleted or replaced (seeded): each is
    accepted (a batch of the right length) or refused with a BatchError (4xx)."""
    rng = random.Random(11)
    accepted = 0
    for _ in range(2_000):
        n = rng.randint(0, 20)
        columns = {"step": np.array(sorted(rng.sample(range(100), n)), np.int64),
                   "pre_norm": np.array([rng.choice([0, 1.5, np.nan, np.inf]) for _ in range(n)], np.float32)}
        extra = {}
        if rng.random() < 0.5:
            columns["clipped"] = np.array([rng.random() < 0.5 for _ in range(n)])
        if rng.random() < 0.3:
            extra["tensor_norms"] = {"names": ["a", "b"], "norms": typed(np.ones((n, 2), np.float32))}
        if rng.random() < 0.3:
            extra["loss"] = [rng.choice([None, 1, -2.5, "NaN", "-Infinity"]) for _ in range(n)]
        body = bytearray(binary(columns, **extra))
        for _ in range(rng.choice([0, 1, 1, 2])):
            at, op = rng.randrange(len(body) + 1), rng.random()
            byte = bytes([rng.randrange(256)])
            body[at:at + (0 if op < 0.4 else 1)] = b"" if 0.4 <= op < 0.8 else byte
        try:
            batch = msgpack_decode.load_batch(bytes(body))
        except BatchError as error:
            assert 400 <= error.status < 500
            continue
        assert all(len(column.values) == len(batch) for column in batch.columns.values())
        accepted += 1
    assert 300 < accepted < 1_900  # both kinds were exercised


# ----- through a real server -----

def vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def post_all(port: int, bodies: list[bytes], media_type: str = msgpack_decode.MEDIA_TYPE) -> list[int]:
    statuses: list[int] = []

    def one(body: bytes) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        connection.request("POST", "/api/runs/probe/steps", body=body, headers={"Content-Type": media_type})
        answer = connection.getresponse()
        answer.read()
        statuses.append(answer.status)
        connection.close()

    threads = [threading.Thread(target=one, args=(body,)) for body in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc")
def test_a_hostile_binary_body_raises_the_servers_memory_by_a_few_bodies(tmp_path):
    """16 MiB of empty maps in a column: the server's peak RSS rises by about one body and a
    half (the bytes read into one buffer, the skeleton's copy while it is read), and four at
    once by about two bodies' worth more: two are read at a time, the others wait."""
    size = 16 * MiB
    body = msgpack.packb({"step": [0], "pre_norm": [{}] * (size - 1024)})
    with ServerProcess(f"sqlite:///{tmp_path / 'probe.db'}", extra_args=["--max-body", str(size)]) as server:
        warm = binary({"step": np.arange(2, dtype=np.int64), "pre_norm": np.ones(2, np.float32)})
        assert post_all(server.port, [warm]) == [200]  # warm: imports, pools
        before = vm_hwm(server.process.pid)
        assert post_all(server.port, [body]) == [413]
        one = vm_hwm(server.process.pid) - before
        assert one <= 2.2 * len(body), f"one body: {one / len(body):.2f}x"
        assert post_all(server.port, [body] * 4) == [413] * 4
        four = vm_hwm(server.process.pid) - before  # the peak rise over the warm server's
        assert four <= 4.5 * len(body), f"four at once: {four / len(body):.2f}x"


def test_a_json_body_over_8_mib_gets_413_and_a_binary_one_of_that_size_is_stored(tmp_path):
    n = 12 * MiB // 70
    columns = agent_columns(n)
    with ServerProcess(f"sqlite:///{tmp_path / 'limit.db'}") as server:
        big_json = as_json(columns)
        assert len(big_json) > json_decode.MAX_JSON_BODY
        assert post_all(server.port, [big_json], json_decode.MEDIA_TYPE) == [413]
        big_binary = binary(columns)
        assert len(big_binary) > json_decode.MAX_JSON_BODY
        assert post_all(server.port, [big_binary]) == [200]

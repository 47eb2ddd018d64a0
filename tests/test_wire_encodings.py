"""One schema, two encodings: every batch and message below is sent as JSON and as msgpack
(columns as typed arrays wherever the values allow one, else plain msgpack arrays), over HTTP
(by Content-Type) and over the WebSocket (text vs binary frames), to a real server; the
answers (status codes and words) are the same, and what is stored is the same."""
from __future__ import annotations

import asyncio
import json
import math

import httpx
import msgpack
import numpy as np
import pytest
import websockets

from gradwatch.agent.wire import typed_array
from tests.test_server_support import start_server

def nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
JSON, MSGPACK = "application/json", "application/msgpack"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wire-encodings")
    process = start_server(f"sqlite:///{folder / 'wire.db'}", folder)
    yield process
    process.stop()


def _floats(values: list) -> np.ndarray | None:
    """float64 when every item is a number or a non-finite spelling (a typed array can hold it)."""
    if all(type(v) in (int, float) or (isinstance(v, str) and v in NONFINITE) for v in values):
        return np.array([NONFINITE[v] if isinstance(v, str) else float(v) for v in values], np.float64)
    return None


def msgpack_column(name: str, values):
    """The column as the binary wire carries it: a typed array when the values allow one."""
    if not isinstance(values, list) or not values:
        return values
    if name == "step" and all(type(v) is int and -2**63 <= v < 2**63 for v in values):
        return typed_array(np.array(values, np.int64))
    if all(type(v) is bool for v in values):
        return typed_array(np.array(values, bool))
    floats = _floats(values)
    return typed_array(floats) if floats is not None and name != "step" else values


def msgpack_batch(batch):
    if not isinstance(batch, dict):
        return batch
    out = {}
    for name, values in batch.items():
        if name == "tensor_norms" and isinstance(values, dict) and isinstance(values.get("norms"), list):
            rows, names = values["norms"], values.get("names")
            cells = [_floats(row) if isinstance(row, list) else None for row in rows]
            whole = (isinstance(names, list) and len(rows) == len(batch.get("step", []))
                     and all(c is not None and len(c) == len(names) for c in cells))
            norms = typed_array(np.array(cells, np.float32).reshape(len(rows), len(names))) if whole else rows
            out[name] = {**values, "norms": norms}
        else:
            out[name] = msgpack_column(name, values)
    return out


def encode(obj: dict, media_type: str, message: bool = False) -> bytes | str:
    if media_type == JSON:
        return json.dumps(obj) if message else json.dumps(obj).encode()
    if message:
        return msgpack.packb({**obj, "batch": msgpack_batch(obj["batch"])} if "batch" in obj else obj)
    return msgpack.packb(msgpack_batch(obj))


GOOD = {"step": [0, 1, 2], "pre_norm": [1.5, "NaN", "Infinity"], "post_norm": [1.0, 1.0, 1.0],
        "clipped": [True, False, True], "loss": [2.5, 2.25, 2.0], "time": [1.7e9, 1.7e9 + 1, 1.7e9 + 2],
        "tensor_norms": {"names": ["w", "b"], "norms": [[0.5, 0.25], ["NaN", 1.0], [2.0, "Infinity"]]}}
# (what, batch, status, words the detail holds): each sent in both encodings
BATCHES = [
    ("a good batch", GOOD, 200, None),
    ("a negative pre_norm", {"step": [0, 1], "pre_norm": [1.0, -0.5]}, 422, "negative norm -0.5 at index 1"),
    ("-Infinity post_norm", {"step": [0], "pre_norm": [1.0], "post_norm": ["-Infinity"]}, 422, "negative norm"),
    ("a repeated step", {"step": [3, 4, 3], "pre_norm": [1.0, 1.0, 1.0]}, 422, "repeats step 3"),
    ("a negative step", {"step": [-1], "pre_norm": [1.0]}, 422, "from 0 to 2**53 - 1, got -1"),
    ("a step past 2**53", {"step": [2**53], "pre_norm": [1.0]}, 422, "got 9007199254740992"),
    ("a float step", {"step": [1.5], "pre_norm": [1.0]}, 422, "must hold integers, got 1.5"),
    ("no pre_norm", {"step": [0]}, 422, "missing required column 'pre_norm'"),
    ("an unknown column", {"step": [0], "pre_norm": [1.0], "grad": [1.0]}, 422, "unknown field 'grad'"),
    ("a short column", {"step": [0, 1], "pre_norm": [1.0]}, 422, "has 1 values, 'step' has 2"),
    ("a null pre_norm", {"step": [0, 1], "pre_norm": [1.0, None]}, 422, "holds null at index 1"),
    ("a string number", {"step": [0], "pre_norm": ["1.5"]}, 422, "holds the string '1.5' at index 0"),
    ("a boolean norm", {"step": [0, 1], "pre_norm": [1.0, True]}, 422, "got True at index 1"),
    ("a 2 as a flag", {"step": [0, 1], "pre_norm": [1.0, 1.0], "clipped": [True, 2]}, 422, "booleans, got 2"),
    ("a negative tensor norm", {"step": [0], "pre_norm": [1.0], "tensor_norms": {
        "names": ["w", "b"], "norms": [[0.5, -2.0]]}}, 422, "negative norm -2.0 at index 0, 1"),
    ("repeated tensor names", {"step": [0], "pre_norm": [1.0], "tensor_norms": {
        "names": ["w", "w"], "norms": [[0.5, 2.0]]}}, 422, "repeats a name"),
    *[(f"a tensor norm cell {cell!r}", {"step": [0], "pre_norm": [1.0], "tensor_norms": {
        "names": ["w"], "norms": [[cell]]}}, 422, "tensor_norms.norms' row 0")
      for cell in (None, "1.5", " 2 ", "inf", "1e3")],
    ("a batch that is a list", [1, 2], 422, "a batch must be a JSON object of columns, got list"),
]
# (what, message, words): each sent as a text frame and as a binary frame
MESSAGES = [
    ("not a batch", {"type": "nope", "seq": 3, "run": "r"}, "field 'type' must be 'batch'"),
    ("run '..'", {"type": "batch", "seq": 4, "run": "..", "batch": GOOD}, "run name"),
    ("a long run name", {"type": "batch", "seq": 5, "run": "r" * 201}, "run name must be 1 to 200"),
    ("an unknown field", {"type": "batch", "seq": 6, "run": "r", "extra": 1}, "unknown field 'extra'"),
    ("meta not an object", {"type": "batch", "seq": 7, "run": "r", "meta": [1]}, "field 'meta' must be an object"),
    ("meta 33 deep", {"type": "batch", "seq": 8, "run": "r", "meta": nested(33)}, "deeper than 32"),
    ("an event value that is a string", {"type": "batch", "seq": 9, "run": "r",
                                         "events": [{"kind": "alert", "value": "NaN"}]}, "events[0].value"),
    ("a spike event without a step", {"type": "batch", "seq": 10, "run": "r", "events": [{"kind": "spike"}]},
     "events[0].step"),
    ("a bad batch inside", {"type": "batch", "seq": 11, "run": "r", "batch": {"step": [0, 0], "pre_norm": [1, 1]}},
     "repeats step 0"),
]


@pytest.mark.parametrize("what, batch, status, words", BATCHES, ids=[case[0] for case in BATCHES])
def test_http_answers_the_same_in_both_encodings(server, what, batch, status, words):
    answers = {}
    for media_type in (JSON, MSGPACK):
        run = f"http-{'json' if media_type == JSON else 'msgpack'}-{abs(hash(what)) % 10**8}"
        response = httpx.post(f"{server.url}/api/runs/{run}/steps", content=encode(batch, media_type),
                              headers={"Content-Type": media_type}, timeout=30)
        answers[media_type] = (response.status_code, response.json())
    assert answers[JSON] == answers[MSGPACK], what
    got_status, body = answers[JSON]
    assert got_status == status, (what, body)
    if words is not None:
        assert words in body["detail"], (what, body)


def test_what_is_stored_is_the_same_in_both_encodings(server):
    for media_type, run in ((JSON, "same-json"), (MSGPACK, "same-msgpack")):
        response = httpx.post(f"{server.url}/api/runs/{run}/steps", content=encode(GOOD, media_type),
                              headers={"Content-Type": media_type}, timeout=30)
        assert response.json() == {"accepted": 3, "duplicates": 0, "conflicts": 0}
    fields = "pre_norm,post_norm,clipped,loss,time"
    series = [httpx.get(f"{server.url}/api/runs/{run}/series?fields={fields}", timeout=30).json()
              for run in ("same-json", "same-msgpack")]
    assert series[0] == series[1] and series[0]["pre_norm"] == [1.5, "NaN", "Infinity"]
    tensors = [httpx.get(f"{server.url}/api/runs/{run}/tensors", timeout=30).json()
               for run in ("same-json", "same-msgpack")]
    assert tensors[0] == tensors[1]


def test_an_unknown_content_type_is_415_naming_both(server):
    response = httpx.post(f"{server.url}/api/runs/r/steps", content=b"x", headers={"Content-Type": "text/csv"})
    assert response.status_code == 415
    assert JSON in response.json()["detail"] and MSGPACK in response.json()["detail"]


def test_websocket_answers_text_and_binary_frames_the_same(server):
    cases = [(what, {"type": "batch", "seq": 100 + index, "run": "ws-wire", "batch": batch}, words)
             for index, (what, batch, status, words) in enumerate(BATCHES) if status != 200] + MESSAGES

    async def go():
        replies = {JSON: [], MSGPACK: []}
        async with websockets.connect(f"{server.ws_url}/ws/ingest") as ws:
            for media_type in (JSON, MSGPACK):
                for _what, message, _words in cases:
                    await ws.send(encode(message, media_type, message=True))
                    replies[media_type].append(json.loads(await ws.recv()))
                for index, run in enumerate(("ws-good-a", "ws-good-b")):  # a good one: stored, then duplicates
                    good = {"type": "batch", "seq": 900 + index, "run": f"{run}-{media_type[-4:]}", "batch": GOOD}
                    await ws.send(encode(good, media_type, message=True))
                    replies[media_type].append(json.loads(await ws.recv()))
        return replies

    replies = asyncio.run(go())
    assert replies[JSON] == replies[MSGPACK]
    for (what, message, words), reply in zip(cases, replies[JSON]):
        assert reply["type"] == "error" and reply["status"] == 422 and reply["seq"] == message["seq"], (what, reply)
        assert words in reply["detail"], (what, reply)
    assert [reply["accepted"] for reply in replies[JSON][-2:]] == [3, 3]


def test_typed_array_refusals_name_the_column_and_the_dtype(server):
    """What only the binary encoding can get wrong: a dtype the column cannot hold in place,
    a length that is not the batch's, an extension type that is not a typed array."""
    steps = typed_array(np.arange(2, dtype=np.int64))
    cases = [
        ({"step": steps, "pre_norm": typed_array(np.ones(2, np.int64))}, "column 'pre_norm' must hold numbers"),
        ({"step": steps, "pre_norm": typed_array(np.ones(2, np.int32))}, "column 'pre_norm' is a typed array of "
                                                                          "dtype '<i4'; dtypes are"),
        ({"step": typed_array(np.arange(2, dtype=np.float64)), "pre_norm": [1.0, 1.0]}, "int64 or uint64"),
        ({"step": steps, "pre_norm": [1.0, 1.0], "clipped": typed_array(np.ones(2, np.float64))}, "booleans"),
        ({"step": steps, "pre_norm": typed_array(np.ones(3))}, "has 3 values, 'step' has 2"),
        ({"step": steps, "pre_norm": msgpack.ExtType(5, b"x")}, "extension type 5"),
        ({"step": steps, "pre_norm": msgpack.ExtType(1, b"<f8\0\0\0\0\0" + b"x" * 3)}, "not a whole number"),
        ({"step": steps, "pre_norm": [1.0, 1.0], "tensor_norms": {
            "names": ["w"], "norms": typed_array(np.ones(3, np.float32))}}, "one row per step (2) of 1 values"),
        ({"step": steps, "pre_norm": [1.0, 1.0], "tensor_norms": {
            "names": ["w"], "norms": typed_array(np.ones(2, np.float64))}}, "float32"),
    ]
    for batch, words in cases:
        response = httpx.post(f"{server.url}/api/runs/typed/steps", content=msgpack.packb(batch),
                              headers={"Content-Type": MSGPACK}, timeout=30)
        assert response.status_code == 422 and words in response.json()["detail"], (words, response.json())


def test_the_live_feed_pushes_the_same_points_for_both_encodings(server):
    """A binary batch's columns are typed views (float32, bool), a JSON one's float64 lists:
    the dashboard's live points are the same for both."""
    async def go():
        pushed = {}
        for media_type, run in ((JSON, "live-json"), (MSGPACK, "live-msgpack")):
            async with websockets.connect(f"{server.ws_url}/ws/live/{run}") as live:
                async with websockets.connect(f"{server.ws_url}/ws/ingest") as ingest:
                    await asyncio.sleep(0.2)  # let the live socket subscribe
                    await ingest.send(encode({"type": "batch", "seq": 1, "run": run, "batch": GOOD}, media_type,
                                             message=True))
                    assert json.loads(await ingest.recv())["accepted"] == 3
                    message = json.loads(await asyncio.wait_for(live.recv(), 10))
                    while message.get("type") != "points":
                        message = json.loads(await asyncio.wait_for(live.recv(), 10))
                    pushed[media_type] = message["data"]
        return pushed

    pushed = asyncio.run(go())
    assert pushed[JSON] == pushed[MSGPACK]
    assert pushed[JSON]["pre_norm"] == [1.5, "NaN", "Infinity"] and pushed[JSON]["clipped"] == [True, False, True]


def test_a_json_text_frame_over_8_mib_is_refused_413_and_the_same_batch_in_binary_is_stored(server):
    n = 400_000
    steps = list(range(n))
    norms = [1.0 + (i % 1000) / 1000 for i in range(n)]
    batch = {"step": steps, "pre_norm": norms, "loss": norms}
    text = json.dumps({"type": "batch", "seq": 5, "run": "ws-big", "batch": batch})
    assert len(text) > 8 << 20

    async def go():
        async with websockets.connect(f"{server.ws_url}/ws/ingest", max_size=None) as ws:
            await ws.send(text)
            refused = json.loads(await ws.recv())
            await ws.send(encode({"type": "batch", "seq": 6, "run": "ws-big", "batch": batch}, MSGPACK, message=True))
            stored = json.loads(await ws.recv())
        return refused, stored

    refused, stored = asyncio.run(go())
    assert refused["type"] == "error" and refused["status"] == 413 and refused["seq"] is None
    assert "binary (msgpack) messages" in refused["detail"]
    assert stored == {"type": "ack", "seq": 6, "accepted": n, "duplicates": 0, "conflicts": 0}

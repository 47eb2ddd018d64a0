"""Bad input at the edge, through a real server: every bad `/ws/ingest` message gets an
error reply of its own and the socket goes on; norms, event values, meta/detail limits;
integers in float columns stored as the floats they mean."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import websockets

from tests.test_server_support import start_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("edge-input")
    process = start_server(f"sqlite:///{folder / 'edge.db'}", folder)
    yield process
    process.stop()


def nested(depth: int):
    value: dict = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def message(run: str, seq, **fields) -> str:
    return json.dumps({"type": "batch", "seq": seq, "run": run, **fields})


GOOD = {"step": [0, 1], "pre_norm": [1.5, "NaN"], "post_norm": [1.0, "Infinity"]}
# (what, raw text sent, words the error's detail must hold)
BAD = [
    ("not JSON", "not json", "invalid JSON"),
    ("a binary frame, not msgpack", b"\xff\xfe\x00", "invalid msgpack"),
    ("JSON nested 2000 deep", "[" * 2000 + "]" * 2000, "invalid JSON"),
    ("a number with no float", '{"type": "batch", "seq": 3, "run": "r", "events": '
                                '[{"kind": "alert", "value": 1e400}]}', "invalid JSON"),
    ("meta nested 300 deep", message("r", 4, meta=nested(300)), "meta"),
    ("meta 33 deep", message("r", 5, meta=nested(33)), "deeper than 32"),
    ("meta of 100 KiB", message("r", 6, meta={"blob": "x" * 100_000}), "bytes"),
    ("detail nested 300 deep", message("r", 7, events=[{"kind": "alert", "detail": nested(300)}]),
     "events[0].detail"),
    ("detail of 20 KiB", message("r", 8, events=[{"kind": "alert", "detail": {"x": "y" * 20_000}}]),
     "events[0].detail"),
    ("event value a string", message("r", 9, events=[{"kind": "alert", "value": "NaN"}]),
     "events[0].value"),
    ("event value a boolean", message("r", 10, events=[{"kind": "alert", "value": True}]),
     "events[0].value"),
    ("negative pre_norm", message("r", 11, batch={"step": [0, 1], "pre_norm": [1.0, -0.5]}),
     "negative norm -0.5 at index 1"),
    ("-Infinity pre_norm", message("r", 12, batch={"step": [0], "pre_norm": ["-Infinity"]}), "negative"),
    ("negative post_norm", message("r", 13, batch={"step": [0], "pre_norm": [1.0], "post_norm": [-1e-9]}),
     "post_norm"),
    ("negative tensor norm", message("r", 14, batch={"step": [0], "pre_norm": [1.0], "tensor_norms": {
        "names": ["w", "b"], "norms": [[0.5, -2.0]]}}), "tensor_norms"),
    ("seq nested 300 deep, bad type", json.dumps({"type": "nope", "seq": nested(300)}), "type"),
    ("run '..'", message("..", 16, batch=GOOD), "run name"),
    ("unknown field", message("r", 17, extra=1), "unknown field"),
]


def test_ws_ingest_answers_every_bad_message_and_keeps_the_socket(server):
    async def go():
        replies = []
        async with websockets.connect(f"{server.ws_url}/ws/ingest") as ws:
            for _what, text, _words in BAD:
                await ws.send(text)
                replies.append(json.loads(await ws.recv()))
            await ws.send(message("edge-good", 99, batch=GOOD,
                                  events=[{"kind": "alert", "value": 2**63, "detail": nested(32)}]))
            replies.append(json.loads(await ws.recv()))
        return replies

    replies = asyncio.run(go())
    for (what, _text, words), reply in zip(BAD, replies):
        assert reply["type"] == "error" and reply["status"] == 422, (what, reply)
        assert words in reply["detail"], (what, reply)
    assert replies[3]["seq"] is None and replies[15]["seq"] is None
    assert replies[4]["seq"] == 4
    assert replies[-1] == {"type": "ack", "seq": 99, "accepted": 2, "duplicates": 0, "conflicts": 0}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        # Every refused message stored nothing: no run "r" (other tests of this module add their own runs).
        names = {run["name"] for run in client.get("/api/runs").json()}
        assert "edge-good" in names and "r" not in names, names
        series = client.get("/api/runs/edge-good/series", params={"fields": "pre_norm,post_norm"}).json()
        assert series == {"step": [0, 1], "pre_norm": [1.5, "NaN"], "post_norm": [1.0, "Infinity"]}
        alerts = client.get("/api/runs/edge-good/events", params={"kind": "alert"}).json()
        assert alerts[0]["value"] == 9.223372036854776e18  # 2**63, the float it means


@pytest.mark.parametrize("body, words", [
    ({"step": [0], "pre_norm": [-1.0]}, "negative norm -1.0 at index 0"),
    ({"step": [0, 1], "pre_norm": [1.0, "-Infinity"]}, "negative norm -inf at index 1"),
    ({"step": [0], "pre_norm": [1.0], "post_norm": [-3]}, "post_norm"),
    ({"step": [0], "pre_norm": [1.0], "tensor_norms": {"names": ["w"], "norms": [[-1.0]]}}, "tensor_norms"),
])
def test_post_refuses_negative_norms(server, body, words):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        answer = client.post("/api/runs/edge-neg/steps", json=body)
        assert answer.status_code == 422 and words in answer.json()["detail"]
        assert client.get("/api/runs/edge-neg/series").status_code == 404


def test_norms_keep_nan_infinity_zero_and_huge(server):
    body = {"step": [0, 1, 2, 3], "pre_norm": ["NaN", "Infinity", 0.0, 1.7e308]}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.post("/api/runs/edge-nan/steps", json=body).json()["accepted"] == 4
        assert client.get("/api/runs/edge-nan/series", params={"fields": "pre_norm"}).json()["pre_norm"] == \
            ["NaN", "Infinity", 0.0, 1.7e308]


@pytest.mark.parametrize("value", [2**60, 2**60 + 1, 2**53 + 1, 2**63, 12345])
def test_integers_in_float_columns_are_the_floats_they_mean(server, value):
    run = f"edge-int-{value}"
    body = {"step": [0, 1], "pre_norm": [1.0, 2.0], "time": [value, 0.5]}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.post(f"/api/runs/{run}/steps", json=body).json()["accepted"] == 2
        again = client.post(f"/api/runs/{run}/steps", json=body).json()
        assert again == {"accepted": 0, "duplicates": 2, "conflicts": 0}
        body["time"] = [value]
        body["step"], body["pre_norm"] = [2], [1.0]
        assert client.post(f"/api/runs/{run}/steps", json=body).json()["accepted"] == 1
        assert client.post(f"/api/runs/{run}/steps", json=body).json()["duplicates"] == 1
        times = client.get(f"/api/runs/{run}/series", params={"fields": "time"}).json()["time"]
        assert times == [float(value), 0.5, float(value)]


def _decimal_mean_std(values: list[float]) -> tuple[float, float]:
    """Reference: exact-enough mean and population std in Decimal (no float overflow)."""
    from decimal import Decimal, localcontext

    with localcontext() as context:
        context.prec = 60
        items = [Decimal(v) for v in values]
        mean = sum(items) / len(items)
        variance = sum((x - mean) ** 2 for x in items) / len(items)
        return float(mean), float(variance.sqrt())


@pytest.mark.parametrize("norms", [
    [1.7e308, 1.7e308, 1.0, 2.0, 1e-300, 0.0, 5e-324],
    [1.7e308] * 5,
    [1.7976931348623157e308] * 3 + [0.0],
    [1.7976931348623157e308],
    [1.7e308, "Infinity", "NaN", 3.0],
])
def test_stats_and_histogram_are_safe_on_extreme_norms(server, norms):
    run = f"edge-huge-{abs(hash(str(norms)))}"
    finite = sorted(v for v in norms if isinstance(v, float) and v == v and v != float("inf"))
    with httpx.Client(base_url=server.url, timeout=30) as client:
        body = {"step": list(range(len(norms))), "pre_norm": norms}
        assert client.post(f"/api/runs/{run}/steps", json=body).status_code == 200
        stats = client.get(f"/api/runs/{run}/stats")
        assert stats.status_code == 200, stats.text
        stats = stats.json()
        mean, std = _decimal_mean_std(finite)
        assert stats["mean"] == pytest.approx(mean, rel=1e-12)
        assert stats["std"] == pytest.approx(std, rel=1e-12, abs=1e-12 * finite[-1])
        assert stats["min"] == finite[0] and stats["max"] == finite[-1]
        assert None not in stats["percentiles"].values()
        assert all(finite[0] <= p <= finite[-1] for p in stats["percentiles"].values())
        for bins in (1, 60, 1000):
            answer = client.get(f"/api/runs/{run}/histogram", params={"bins": bins})
            assert answer.status_code == 200, answer.text
            hist = answer.json()
            edges, counts = hist["edges"], hist["counts"]
            assert len(edges) == bins + 1 and all(isinstance(e, float) for e in edges)
            assert all(a < b for a, b in zip(edges, edges[1:])), "edges strictly increase, all finite"
            # Reference: a plain loop putting each finite norm in its bin (the last bin is closed).
            expected = [0] * bins
            for value in finite:
                index = next(i for i in range(bins) if edges[i] <= value < edges[i + 1]
                             or (i == bins - 1 and value == edges[-1]))
                expected[index] += 1
            assert counts == expected and hist["count"] == len(finite)
        assert client.get(f"/api/runs/{run}/recommendation").status_code == 200


@pytest.mark.parametrize("steps", [2, 20_000])
def test_an_escaped_nan_is_answered_the_same_at_every_body_size(server, steps):
    """`"Na\\u004E"` is the string "NaN" (JSON escapes spell the same string): accepted and
    stored as NaN in a short body and in a column over 64 KiB alike (issue 19)."""
    values = ", ".join(['"Na\\u004E"'] + ["1.5"] * (steps - 1))
    body = ('{"step": [%s], "pre_norm": [%s], "tensor_norms": {"names": ["w"], "norms": [%s]}}' % (
        ", ".join(map(str, range(steps))), values, ", ".join(['["Na\\u004E"]'] + ["[0.5]"] * (steps - 1))))
    assert steps < 10 or len(body) > 64 * 1024
    run = f"edge-escaped-nan-{steps}"
    with httpx.Client(base_url=server.url, timeout=30) as client:
        answer = client.post(f"/api/runs/{run}/steps", content=body.encode(),
                             headers={"Content-Type": "application/json"})
        assert answer.status_code == 200 and answer.json()["accepted"] == steps, answer.text
        series = client.get(f"/api/runs/{run}/series", params={"fields": "pre_norm", "points": steps}).json()
        assert series["pre_norm"][0] == "NaN" and series["pre_norm"][1] == 1.5

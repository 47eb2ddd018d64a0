"""The HTTP edge of the server: tokens, body limits, bad input, static files, CLI errors."""
from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.procs import free_port
from tests.test_server_support import make_batch, post, start_server

WRITE, READ = "write-secret-1", "read-secret-2"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("guarded")
    server = start_server(f"sqlite:///{folder / 'g.db'}", folder,
                          ["--token", WRITE, "--read-token", READ, "--max-body", "200000"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def open_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("open")
    server = start_server(f"sqlite:///{folder / 'o.db'}", folder)
    yield server
    server.stop()


def small_batch(first: int = 0, n: int = 5) -> dict:
    return make_batch(np.arange(first, first + n), np.random.default_rng(first))


def test_write_token_guards_ingest_and_read_token_guards_reads(guarded):
    with httpx.Client(base_url=guarded.url, timeout=30) as client:
        assert post(client, "tok", small_batch()).status_code == 401
        assert post(client, "tok", small_batch(), headers={"Authorization": "Bearer nope"}).status_code == 401
        assert post(client, "tok", small_batch(), headers={"Authorization": f"Bearer {READ}"}).status_code == 403
        ok = post(client, "tok", small_batch(), headers={"Authorization": f"Bearer {WRITE}"})
        assert ok.status_code == 200 and ok.json()["accepted"] == 5

        for path in ("/api/runs", "/api/runs/tok/series", "/api/runs/tok/stats", "/api/runs/tok/export.csv"):
            assert client.get(path).status_code == 401, path
            assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
            assert client.get(path, headers={"Authorization": f"Bearer {WRITE}"}).status_code == 403, path
            assert client.get(path, headers={"Authorization": f"Bearer {READ}"}).status_code == 200, path
        # A token in the query string only where a browser cannot send a header (issue 11).
        assert client.get("/api/runs", params={"token": READ}).status_code == 401
        assert client.get("/api/runs/tok/export.csv", params={"token": READ}).status_code == 200
        # The dashboard shell and health stay public: they hold no data.
        assert client.get("/healthz").status_code == 200
        assert client.get("/").status_code == 200
        assert client.get("/static/plotly.min.js").status_code == 200


def test_bodies_over_max_body_are_413_without_being_read(guarded):
    headers = {"Authorization": f"Bearer {WRITE}", "Content-Type": "application/json"}
    # Declared too large: refused from the headers alone, the body never sent.
    connection = http.client.HTTPConnection("127.0.0.1", guarded.port, timeout=30)
    connection.putrequest("POST", "/api/runs/big/steps")
    for name, value in {**headers, "Content-Length": str(10**9)}.items():
        connection.putheader(name, value)
    connection.endheaders()
    answer = connection.getresponse()
    assert answer.status == 413
    assert "limit" in json.loads(answer.read())["detail"]
    connection.close()
    # Streamed without a length (chunked): counted as it arrives.
    def chunks():
        for _ in range(100):
            yield b" " * 10_000
    with httpx.Client(base_url=guarded.url, timeout=30) as client:
        answer = client.post("/api/runs/big/steps", content=chunks(), headers=headers)
        assert answer.status_code == 413
        assert client.get("/api/runs", headers={"Authorization": f"Bearer {READ}"}).json() == [] or \
            "big" not in [run["name"] for run in
                          client.get("/api/runs", headers={"Authorization": f"Bearer {READ}"}).json()]


def test_non_json_body_is_415(open_server):
    with httpx.Client(base_url=open_server.url, timeout=30) as client:
        answer = client.post("/api/runs/x/steps", content=b"step=1", headers={"Content-Type": "text/plain"})
        assert answer.status_code == 415
        answer = client.post("/api/runs/x/steps", content=b"{}")
        assert answer.status_code == 415


@pytest.mark.parametrize("change, field", [
    (lambda b: b.update(loss=b["loss"][:-1]), "loss"),
    (lambda b: b.pop("step"), "step"),
    (lambda b: b.pop("pre_norm"), "pre_norm"),
    (lambda b: b.update(pre_norm=["1.0"] * 5), "pre_norm"),
    (lambda b: b.update(clipped=["yes"] * 5), "clipped"),
    (lambda b: b.update(step=[0, 1, 2, 3, -4]), "step"),
    (lambda b: b.update(step=[0, 1, 2, 3, 3.5]), "step"),
    (lambda b: b.update(step=[0, 1, 2, 2, 4]), "step"),
    (lambda b: b.update(colour=[1] * 5), "colour"),
    (lambda b: b.update(loss={"a": 1}), "loss"),
    (lambda b: b.update(tensor_norms={"names": ["a"], "norms": [[1.0]]}), "tensor_norms"),
    # JSON booleans are not numbers, even mixed with numbers (numpy would read them as 0/1).
    (lambda b: b.update(step=[0, True, 2, 3, 4]), "step"),
    (lambda b: b["pre_norm"].__setitem__(0, True), "pre_norm"),
    (lambda b: b["loss"].__setitem__(3, False), "loss"),
    (lambda b: b.update(scale=[1.0, 1.0, True, 1.0, 1.0]), "scale"),
    (lambda b: b.update(lr=[1, 2, 3, 4, True]), "lr"),
    (lambda b: b.update(tensor_norms={"names": ["a", "b"], "norms": [[0.5, 2.0]] * 4 + [[0.5, True]]}),
     "tensor_norms"),
    # Steps stay exact as float64 (what numpy and JSON readers turn them into): at most 2**53 - 1.
    (lambda b: b.update(step=[0, 1, 2, 3, 2**53 + 1]), "step"),
])
def test_bad_batches_are_422_naming_the_field_and_store_nothing(open_server, change, field):
    batch = small_batch(1000)
    change(batch)
    with httpx.Client(base_url=open_server.url, timeout=30) as client:
        answer = post(client, "bad-input", batch)
        assert answer.status_code == 422, answer.text
        assert field in answer.json()["detail"]
        assert client.get("/api/runs/bad-input/series").status_code == 404


def test_invalid_json_and_run_names_are_422(open_server):
    with httpx.Client(base_url=open_server.url, timeout=30) as client:
        assert post(client, "x", b"{not json").status_code == 422
        assert post(client, "x", b"[1, 2]").status_code == 422
        assert post(client, "a" * 201, small_batch()).status_code == 422
        assert post(client, "tab%09here", small_batch()).status_code == 422
        assert post(client, "a%2Fb", small_batch()).status_code in (404, 422)
        # Names are data: quotes and markup are stored and returned as they are.
        odd = "<img src=x onerror=alert(1)> '; DROP TABLE runs; --"
        assert post(client, odd, small_batch()).status_code == 200
        assert odd in [run["name"] for run in client.get("/api/runs").json()]
        assert client.get("/api/runs/x/series", params={"fields": "nope"}).status_code == 422
        assert client.get("/api/runs/x/recommendation", params={"target_clip_rate": 2}).status_code == 422


def test_no_wildcard_cors(open_server):
    with httpx.Client(base_url=open_server.url, timeout=30) as client:
        answer = client.get("/api/runs", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in answer.headers
        preflight = client.options("/api/runs/x/steps", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in preflight.headers


def test_dashboard_files_are_served_with_a_strict_csp(open_server):
    from gradwatch.dashboard import STATIC_DIR

    with httpx.Client(base_url=open_server.url, timeout=30) as client:
        index = client.get("/")
        assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
        assert index.content == (STATIC_DIR / "index.html").read_bytes()
        csp = index.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
        assert "frame-ancestors 'none'" in csp
        import plotly as plotly_package

        plotly_js = (Path(plotly_package.__file__).parent / "package_data" / "plotly.min.js").read_bytes()
        plotly = client.get("/static/plotly.min.js")  # httpx asks for gzip and decodes it
        assert plotly.status_code == 200 and plotly.content == plotly_js
        assert plotly.headers["content-encoding"] == "gzip"
        assert int(plotly.headers["content-length"]) < len(plotly_js) / 2
        assert "javascript" in plotly.headers["content-type"]
        plain = client.get("/static/plotly.min.js", headers={"Accept-Encoding": "identity"})
        assert plain.content == plotly_js and "content-encoding" not in plain.headers
        bundle = client.get("/static/plotly-cartesian.min.js")  # the shipped partial bundle, gzipped
        assert bundle.content == (STATIC_DIR / "plotly-cartesian.min.js").read_bytes()
        assert bundle.headers["content-encoding"] == "gzip"
        assert int(bundle.headers["content-length"]) < len(bundle.content) / 2
        for name in sorted(p.name for p in STATIC_DIR.iterdir() if p.suffix in (".js", ".css")):
            answer = client.get(f"/static/{name}")
            assert answer.status_code == 200 and answer.content == (STATIC_DIR / name).read_bytes()
        for bad in ("..%2F..%2Fserver%2Fapp.py", "%2E%2E", ".hidden.js", "__init__.py", "nope.js"):
            assert client.get(f"/static/{bad}").status_code == 404, bad
        assert client.get("/docs").status_code == 200
        assert "/api/runs/{run}/recommendation" in client.get("/openapi.json").json()["paths"]


def _serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gradwatch.server.commands.cli", "serve", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_port_in_use_and_bad_database_exit_2_with_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _serve("--db", f"sqlite:///{tmp_path / 'a.db'}", "--port", str(port))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and str(port) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    for url in ("nosuchdb://x", f"sqlite:///{tmp_path}/missing/dir/a.db",
                f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/x"):
        result = _serve("--db", url, "--port", str(free_port()))
        assert result.returncode == 2, url
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_recommend_command_prints_the_recommendation(open_server):
    rng = np.random.default_rng(9)
    with httpx.Client(base_url=open_server.url, timeout=30) as client:
        post(client, "cli-run", make_batch(np.arange(500), rng))
        expected = client.get("/api/runs/cli-run/recommendation").json()
    result = subprocess.run([sys.executable, "-m", "gradwatch.server.commands.cli", "recommend", "cli-run",
                             "--url", open_server.url], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"{expected['threshold']:.6g}" in result.stdout and "p95" in result.stdout
    assert expected["rationale"] in result.stdout and "threshold / median" in result.stdout
    assert f"{expected['ratio_to_median']:.6g}" in result.stdout
    missing = subprocess.run([sys.executable, "-m", "gradwatch.server.commands.cli", "recommend", "nope",
                              "--url", open_server.url], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "404" in missing.stderr


def test_out_of_range_query_numbers_and_unknown_event_kinds_are_422(open_server):
    with httpx.Client(base_url=open_server.url, timeout=30) as client:
        assert post(client, "bounds", small_batch(0, 10)).status_code == 200
        huge = "99999999999999999999"
        for path in ("series", "tensors"):
            for name in ("start", "end"):
                answer = client.get(f"/api/runs/bounds/{path}", params={name: huge})
                assert answer.status_code == 422, (path, name, answer.text)
                answer = client.get(f"/api/runs/bounds/{path}", params={name: -1})
                assert answer.status_code == 422, (path, name, answer.text)
            assert client.get(f"/api/runs/bounds/{path}", params={"start": 2, "end": 2**53 - 1}).status_code == 200
        bogus = client.get("/api/runs/bounds/events", params={"kind": "bogus"})
        assert bogus.status_code == 422
        assert all(kind in bogus.text for kind in ("clip", "spike", "nonfinite", "conflict", "drop"))
        for kind in ("clip", "spike", "nonfinite", "conflict", "drop"):
            assert client.get("/api/runs/bounds/events", params={"kind": kind}).status_code == 200


def test_the_largest_step_round_trips_exactly(open_server):
    top = 2**53 - 1
    batch = {"step": [top - 2, top], "pre_norm": [1.0, 2.0]}
    with httpx.Client(base_url=open_server.url, timeout=30) as client:
        assert post(client, "far", batch).json() == {"accepted": 2, "duplicates": 0, "conflicts": 0}
        assert client.get("/api/runs/far/series", params={"fields": "pre_norm"}).json()["step"] == [top - 2, top]
        run = {r["name"]: r for r in client.get("/api/runs").json()}["far"]
        assert (run["first_step"], run["last_step"]) == (top - 2, top)
        assert post(client, "far", {"step": [top + 1], "pre_norm": [1.0]}).status_code == 422


def test_whatif_is_over_the_recommendations_window_unless_asked_and_refuses_thresholds_at_or_below_zero(open_server):
    rng = np.random.default_rng(22)
    norms = np.exp(rng.normal(0.0, 0.05, 1600))
    norms[1000:] *= 5.0  # a level shift inside a window of 1,000
    with httpx.Client(base_url=open_server.url, timeout=30) as client:
        assert post(client, "whatif-over", {"step": list(range(1600)), "pre_norm": norms.tolist()}).status_code == 200
        rec = client.get("/api/runs/whatif-over/recommendation", params={"window": 1000}).json()
        span = rec["rate_window"]
        assert span["after_level_shift"] and span["start"] == rec["window"]["clean_start"] >= 1000
        t = rec["threshold"]
        window = client.get("/api/runs/whatif-over/whatif", params={"threshold": t, "window": 1000}).json()
        part = norms[span["start"]:]
        assert window == {"threshold": t, "count": len(part), "clipped": int((part > t).sum()),
                          "clip_rate": rec["clip_rate_raw"], "over": "window",
                          "window": {"start": span["start"], "end": 1599, "steps": len(part)}}
        assert rec["clip_rate_raw"] == (part > t).mean()
        whole = client.get("/api/runs/whatif-over/whatif", params={"threshold": t, "over": "run"}).json()
        assert whole["over"] == "run" and whole["window"] == {"start": 0, "end": 1599, "steps": 1600}
        assert whole["clip_rate"] == (norms > t).mean()
        last = client.get("/api/runs/whatif-over/whatif", params={"threshold": t, "over": "last", "window": 10}).json()
        assert last["window"] == {"start": 1590, "end": 1599, "steps": 10}
        for threshold in (0, -1, "nan"):
            refused = client.get("/api/runs/whatif-over/whatif", params={"threshold": threshold})
            assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["query", "threshold"]
        small = client.get("/api/runs/whatif-over/whatif", params={"threshold": t, "window": 50})
        assert small.status_code == 422 and "at least 100" in small.json()["detail"]

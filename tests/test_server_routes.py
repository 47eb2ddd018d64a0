"""The routes in-process, with FastAPI's TestClient: auth, validation, delete, and every
JSON answer checked against the model its route declares in OpenAPI.

The end-to-end tests through a real uvicorn (WebSockets, crashes, the browser,
the CLI) stay in test_server_api.py, test_server_ws.py and friends.
"""
from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from pydantic import TypeAdapter

from gradwatch.server.app.factory import create_app
from gradwatch.server.app.settings import Settings
from tests.procs import ServerProcess

WRITE, READ = "w-token", "r-token"


def batch(first: int, count: int, tensors: bool = True) -> dict:
    steps = list(range(first, first + count))
    body = {"step": steps, "pre_norm": [1.0 + (s % 7) for s in steps], "threshold": [4.0] * count,
            "clipped": [(1.0 + (s % 7)) > 4.0 for s in steps], "spike": [s % 13 == 5 for s in steps],
            "loss": [2.0 - s / 1000 for s in steps], "nonfinite": [False] * count,
            "skipped": [s % 13 == 5 for s in steps], "robust_z": [0.5] * count,
            "level_shift": [s == first for s in steps]}
    body["pre_norm"][0] = "NaN"
    body["nonfinite"][0] = True
    if tensors:
        body["tensor_norms"] = {"names": ["a", "b"], "norms": [[float(s), 1.0] for s in steps]}
    return body


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "routes.db"


@pytest.fixture
def client(db_path):
    app = create_app(Settings(db_url=f"sqlite:///{db_path}", token=WRITE, read_token=READ))
    with TestClient(app, base_url="http://localhost", headers={"Authorization": f"Bearer {READ}"}) as test_client:
        yield test_client


def post(client, run: str, body: dict, token: str = WRITE):
    return client.post(f"/api/runs/{run}/steps", json=body, headers={"Authorization": f"Bearer {token}"})


def test_every_json_answer_validates_against_its_declared_model(client):
    assert post(client, "models", batch(0, 300)).status_code == 200
    openapi = client.get("/openapi.json").json()
    checked = 0
    from gradwatch.server.app.routes import ROUTERS

    for route in (route for router in ROUTERS for route in router.routes):
        if not isinstance(route, APIRoute) or "GET" not in route.methods or route.response_model is None:
            continue
        declared = openapi["paths"][route.path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        name = getattr(route.response_model, "__name__", None)
        if name and "$ref" in declared:  # OpenAPI names the same model the route declares
            assert declared["$ref"].endswith("/" + name), route.path
        path = route.path.replace("{run}", "models")
        params = {"threshold": 3.0} if path.endswith("/whatif") else {}
        answer = client.get(path, params=params)
        assert answer.status_code == 200, (path, answer.text)
        adapter = TypeAdapter(route.response_model)
        value = adapter.validate_json(answer.content)
        # nothing in the answer that the model does not declare
        dumped = adapter.dump_python(value, mode="json")
        body = answer.json()
        items = zip(body, dumped) if isinstance(body, list) else [(body, dumped)]
        for got, model in items:
            assert set(got) <= set(model), (path, set(got) - set(model))
        checked += 1
    assert checked >= 9  # runs, events, stats, recommendation, whatif, histogram, tensors, healthz, ...


def test_tokens_guard_reads_writes_and_deletes(client):
    assert post(client, "guarded", batch(0, 10)).status_code == 200
    assert post(client, "guarded", batch(10, 10), token=READ).status_code == 403
    assert client.get("/api/runs", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.delete("/api/runs/guarded").status_code == 403          # the read token cannot delete
    assert client.delete("/api/runs/guarded", headers={"Authorization": ""}).status_code == 401


def test_bad_input_is_a_clear_4xx(client):
    assert post(client, "bad", {"step": [0], "pre_norm": [1.0], "skipped": ["yes"]}).status_code == 422
    answer = post(client, "bad", {"step": [0], "pre_norm": [1.0], "bogus": [1]})
    assert answer.status_code == 422 and "bogus" in answer.json()["detail"]
    answer = client.post("/api/runs/bad/steps", content=b"{}", headers={"Authorization": f"Bearer {WRITE}",
                                                                        "Content-Type": "text/plain"})
    assert answer.status_code == 415
    assert client.get("/api/runs/bad/series", params={"fields": "nope"}).status_code == 422
    assert client.get("/api/runs/bad/events", params={"kind": "level_shift"}).status_code == 404  # no run yet
    assert client.get("/api/runs/no-such/stats").status_code == 404


def count(db_path, table: str) -> int:
    with sqlite3.connect(db_path) as connection:
        return connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def test_delete_removes_steps_tensors_events_and_cached_arrays(client, db_path):
    assert post(client, "keep", batch(0, 20)).status_code == 200
    assert post(client, "gone", batch(0, 40)).status_code == 200
    assert client.get("/api/runs/gone/stats").json()["count"] == 40   # now cached
    assert [e["kind"] for e in client.get("/api/runs/gone/events", params={"kind": "nonfinite"}).json()] == ["nonfinite"]
    answer = client.delete("/api/runs/gone", headers={"Authorization": f"Bearer {WRITE}"})
    assert answer.status_code == 200
    assert answer.json() == {"deleted": "gone", "steps": 40, "tensor_norms": 40, "events": 1 + 3}  # nonfinite at 0, spikes at 5, 18, 31
    for path in ("series", "stats", "events", "tensors", "export.csv"):
        assert client.get(f"/api/runs/gone/{path}").status_code == 404, path
    assert [run["name"] for run in client.get("/api/runs").json()] == ["keep"]
    with sqlite3.connect(db_path) as connection:  # only the kept run's chunks remain
        assert connection.execute("SELECT SUM(n) FROM chunks").fetchone()[0] == 20
        assert connection.execute("SELECT SUM(n) FROM tensor_chunks").fetchone()[0] == 20
        assert connection.execute("SELECT COUNT(DISTINCT run_id) FROM chunk_columns").fetchone()[0] == 1
    assert count(db_path, "events") == 3 and count(db_path, "runs") == 1
    assert client.delete("/api/runs/gone", headers={"Authorization": f"Bearer {WRITE}"}).status_code == 404
    # a new run of the same name starts empty: nothing of the old one comes back from a cache
    assert post(client, "gone", {"step": [7], "pre_norm": [9.5]}).status_code == 200
    assert client.get("/api/runs/gone/stats").json()["count"] == 1
    assert client.get("/api/runs/gone/series", params={"fields": "pre_norm"}).json() == {"step": [7], "pre_norm": [9.5]}


def test_the_delete_command_deletes_through_a_real_server(tmp_path):
    with ServerProcess(f"sqlite:///{tmp_path / 'cli.db'}", extra_args=["--token", WRITE]) as server:
        import httpx

        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert http.post("/api/runs/doomed/steps", json=batch(0, 5),
                             headers={"Authorization": f"Bearer {WRITE}"}).status_code == 200
        command = [sys.executable, "-m", "gradwatch.server.commands.cli", "delete", "doomed", "--url", server.url,
                   "--yes"]  # no confirmation prompt (`gradwatch delete` asks without it)
        refused = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1 and "401" in refused.stderr
        done = subprocess.run(command + ["--token", WRITE], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "deleted run 'doomed': 5 steps" in done.stdout
        again = subprocess.run(command + ["--token", WRITE], capture_output=True, text=True, timeout=60)
        assert again.returncode == 1 and "404" in again.stderr


def test_serve_help_documents_every_flag_and_its_variable():
    out = subprocess.run([sys.executable, "-m", "gradwatch.server.commands.cli", "serve", "--help"],
                         capture_output=True, text=True, check=True).stdout
    from gradwatch.server.app.settings import SERVE_FLAGS

    flat = " ".join(out.split())
    for field, flag in SERVE_FLAGS.items():
        assert flag in out and Settings.env_name(field) in flat, flag


def test_variables_and_flags_layer_on_one_settings_class(monkeypatch):
    from gradwatch.server.commands.cli import build_parser, settings_from_args

    monkeypatch.setenv("GRADWATCH_DB", "sqlite:///from-env.db")
    monkeypatch.setenv("GRADWATCH_TOKEN", "env-token")
    monkeypatch.setenv("GRADWATCH_PORT", "9001")
    settings = settings_from_args(build_parser().parse_args(["serve", "--port", "9100"]))
    assert (settings.db_url, settings.token, settings.port, settings.read_token) == \
        ("sqlite:///from-env.db", "env-token", 9100, None)
    settings = settings_from_args(build_parser().parse_args(["serve", "--db", "sqlite:///flag.db", "--token", ""]))
    assert (settings.db_url, settings.token, settings.port) == ("sqlite:///flag.db", None, 9001)
    assert Settings.model_validate_json(settings.to_env()) == settings

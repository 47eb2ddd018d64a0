"""Helpers and fixtures shared by the server tests (no tests here).

Every server is a real `gradwatch serve` process (tests/procs.py) on a real
SQLite file in a temporary folder, or on a fresh database in the throwaway
PostgreSQL cluster of the `postgres_url` fixture.
"""
from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.procs import ServerProcess

FLOAT_FIELDS = ("pre_norm", "post_norm", "scale", "threshold", "loss", "lr", "z", "ema", "time")
BOOL_FIELDS = ("clipped", "spike", "nonfinite")


def fresh_postgres_db(postgres_url: str) -> str:
    """A new, empty database in the test cluster; returns its SQLAlchemy URL."""
    import psycopg

    name = "gw_" + uuid.uuid4().hex[:12]
    base = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(base, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return postgres_url.rsplit("/", 1)[0] + "/" + name


def db_url_for(kind: str, tmp_path: Path, request) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'gradwatch.db'}"
    return fresh_postgres_db(request.getfixturevalue("postgres_url"))


def start_server(db_url: str, tmp_path: Path, extra_args: list[str] | None = None) -> ServerProcess:
    return ServerProcess(db_url, extra_args=extra_args, log_path=tmp_path / "server.log").start()


def wire_float(value: float):
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def from_wire(value):
    if isinstance(value, str):
        return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}[value]
    return value


def same_float(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    a, b = from_wire(a), from_wire(b)
    return (math.isnan(a) and math.isnan(b)) or a == b


def make_batch(steps: np.ndarray, rng: np.random.Generator, *, nonfinite_every: int = 0,
               spike_steps=(), threshold: float = 1.5) -> dict:
    """A full columnar batch as the agent sends it, with optional NaN/Inf norms and spikes."""
    n = len(steps)
    pre = np.exp(rng.normal(0.0, 0.25, n))
    spike = np.isin(steps, list(spike_steps))
    pre[spike] *= 30.0
    if nonfinite_every:
        pre[steps % nonfinite_every == 1] = np.nan
        pre[steps % nonfinite_every == 2] = np.inf
    with np.errstate(invalid="ignore"):
        scale = np.minimum(threshold / (pre + 1e-6), 1.0)
        post_norm = pre * scale
    return {
        "step": [int(s) for s in steps],
        "pre_norm": [wire_float(v) for v in pre.tolist()],
        "post_norm": [wire_float(v) for v in post_norm.tolist()],
        "scale": [wire_float(v) for v in scale.tolist()],
        "threshold": [threshold] * n,
        "clipped": [bool(v) for v in (pre > threshold)],
        "loss": [float(v) for v in rng.normal(2.0, 0.1, n)],
        "lr": [3e-4] * n,
        "z": [float(v) for v in rng.normal(0, 1, n)],
        "ema": [1.0] * n,
        "spike": [bool(v) for v in spike],
        "nonfinite": [bool(v) for v in ~np.isfinite(pre)],
        "time": [1.79e9 + float(s) for s in steps],
    }


def post(client: httpx.Client, run: str, batch, **kwargs) -> httpx.Response:
    body = batch if isinstance(batch, (bytes, str)) else json.dumps(batch)
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    return client.post(f"/api/runs/{run}/steps", content=body, headers=headers, **kwargs)


@pytest.fixture
def sqlite_server(tmp_path):
    server = start_server(f"sqlite:///{tmp_path / 'gradwatch.db'}", tmp_path)
    yield server
    server.stop()


@pytest.fixture
def client_of():
    clients = []

    def make(server: ServerProcess, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        client = httpx.Client(base_url=server.url, headers=headers, timeout=60)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()

"""`gradwatch demo --exit` end to end: real server, real MLX training, real agent."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.parse
import urllib.request

import numpy as np

from tests.procs import ServerProcess, free_port


def dashboard_rate(rate: float) -> str:
    """A clip rate as the dashboard writes it (dashboard/util.js formatRate)."""
    percent = rate * 100
    if percent == 0:
        return "0%"
    return "<0.01%" if percent < 0.01 else (f"{percent:.2f}%" if percent < 10 else f"{percent:.1f}%")


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.loads(answer.read())


def test_demo_stores_a_run_with_clips_spikes_and_a_recommendation(tmp_path):
    db_url = f"sqlite:///{tmp_path / 'demo.db'}"
    # Tokens exported for a team server (as the README suggests) must not lock the demo out.
    env = {**os.environ, "GRADWATCH_TOKEN": "team-write", "GRADWATCH_READ_TOKEN": "team-read"}
    demo = subprocess.run(
        [sys.executable, "-m", "gradwatch.server.commands.cli", "demo", "--steps", "300", "--exit",
         "--port", str(free_port()), "--db", db_url],
        capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env,
    )
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert "gradwatch dashboard: http://127.0.0.1:" in demo.stdout
    assert "Recommended clip threshold" in demo.stdout and "clean steps of the window of the last" in demo.stdout

    # A fresh server on the same file shows what the demo stored.
    with ServerProcess(db_url) as server:
        runs = _get(server.url + "/api/runs")
        assert len(runs) == 1 and runs[0]["steps"] == 300
        run = urllib.parse.quote(runs[0]["name"], safe="")
        series = _get(f"{server.url}/api/runs/{run}/series?points=1000&fields=pre_norm")
        assert series["step"] == list(range(300))
        clips = _get(f"{server.url}/api/runs/{run}/events?kind=clip")
        spikes = _get(f"{server.url}/api/runs/{run}/events?kind=spike")
        assert len(clips) >= 1 and len(spikes) >= 1
        # Each deliberately corrupted batch (inputs x40, listed in the run's config) is a spike.
        corrupted = _get(f"{server.url}/api/runs/{run}")["meta"]["config"]["corrupted_steps"]
        assert len(corrupted) == 4
        assert set(corrupted) <= {event["step"] for event in spikes}
        # Every clip event is a step whose pre-clip norm exceeded the demo's threshold of 1.0.
        norms = dict(zip(series["step"], series["pre_norm"]))
        assert all(float(norms[event["step"]]) > 1.0 for event in clips)
        recommendation = _get(f"{server.url}/api/runs/{run}/recommendation")
        values = np.array([float(value) for value in series["pre_norm"]])
        finite = values[np.isfinite(values)]
        assert recommendation["threshold"] > 0 and recommendation["rationale"]
        # The recommendation leaves the spikes out: it clips every corrupted batch.
        assert recommendation["spikes_left_out"] >= len(corrupted)
        assert recommendation["threshold"] < min(values[step] for step in corrupted)
        for candidate in recommendation["candidates"]:  # raw rate: over every finite norm of the window
            assert candidate["clip_rate_raw"] == np.mean(finite > candidate["threshold"])
        # The summary's figures, each with the steps it is over: the whole run's clips, and the
        # recommendation's raw clip rate over its window (here the whole 300-step run), recomputed.
        clipped = np.array([bool(flag) for flag in _get(f"{server.url}/api/runs/{run}/series?points=1000"
                                                          f"&fields=clipped")["clipped"]])
        assert (f"whole run: 300 steps stored, clipped at 1.0 on {clipped.sum():,} of them "
                f"({dashboard_rate(clipped.mean())})") in demo.stdout
        window = recommendation["window"]
        assert (window["start"], window["end"]) == (0, 299) and not recommendation["level_shift"]
        rate = np.mean(finite > recommendation["threshold"])
        assert (f"Over that window, steps 0–299 ({len(finite)} finite steps), it would have clipped "
                f"{dashboard_rate(rate)}, where 1.0 clipped {dashboard_rate(np.mean(finite > 1.0))}.") in demo.stdout


def test_demo_on_a_busy_port_says_so_in_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        demo = subprocess.run(
            [sys.executable, "-m", "gradwatch.server.commands.cli", "demo", "--steps", "10", "--exit",
             "--port", str(port), "--db", f"sqlite:///{tmp_path / 'demo.db'}"],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )
    assert demo.returncode == 1
    assert demo.stderr.strip() == f"gradwatch demo: port {port} is already in use; choose another with --port"
    assert not (tmp_path / "demo.db").exists()


def test_demo_without_an_mlx_backend_says_what_to_install(tmp_path):
    # What plain `mlx` on Linux does: the package is there, its backend library is not.
    fake = tmp_path / "fake" / "mlx"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "core.py").write_text(
        "raise ImportError('libmlx.so: cannot open shared object file: No such file or directory')\n")
    env = {**os.environ, "PYTHONPATH": str(fake.parent)}
    demo = subprocess.run(
        [sys.executable, "-m", "gradwatch.server.commands.cli", "demo", "--steps", "10", "--exit",
         "--port", str(free_port()), "--db", f"sqlite:///{tmp_path / 'demo.db'}"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env,
    )
    assert demo.returncode == 1
    lines = demo.stderr.strip().splitlines()
    assert len(lines) == 1, demo.stderr
    assert "libmlx.so: cannot open shared object file" in lines[0]
    assert "pip install 'mlx[cpu]'" in lines[0]

"""`gradwatch demo`: serve, train a small MLX model with the agent attached, summarise.

The server runs as `gradwatch serve` in a child process and the training as
`python -m gradwatch.agent.demo` in another (the server never imports the
agent, see DESIGN.md). The dashboard address is printed as soon as the server
answers; the summary comes from the server's own REST API, so it shows what
was stored, not what the trainer believes it sent.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field

from .client import ApiClient, ApiError, run_path

STORE_TIMEOUT_S = 60.0


class DemoError(RuntimeError):
    """A problem the user can act on; printed as one line, no traceback."""


@dataclass
class RunSummary:
    run: str
    steps: int
    clip_rate: float
    clips: int
    spikes: int
    threshold: float | None
    rationale: str
    recommendation: dict = field(default_factory=dict)


def demo_environment() -> dict[str, str]:
    """The environment without the team server's tokens: the demo's own server runs open on
    127.0.0.1, and a token exported for another server must not lock the demo out of it."""
    return {name: value for name, value in os.environ.items()
            if name not in ("GRADWATCH_TOKEN", "GRADWATCH_READ_TOKEN")} | {"PYTHONUNBUFFERED": "1"}


def ensure_mlx_loads() -> None:
    """Check in a child process (the server never imports MLX) that the trainer can load MLX."""
    check = subprocess.run([sys.executable, "-c", "import gradwatch.clip"], capture_output=True, text=True)
    if check.returncode != 0:
        lines = check.stderr.strip().splitlines()
        raise DemoError(lines[-1].removeprefix("ImportError: ") if lines else "MLX cannot load")


def ensure_port_free(port: int) -> None:
    """Refuse a busy port up front: otherwise another server there would answer our health check."""
    with socket.socket() as probe:
        # SO_REUSEADDR, as uvicorn binds: a port whose last connection is in TIME_WAIT is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise DemoError(f"port {port} is already in use; choose another with --port") from None


def start_server(db_url: str, port: int) -> subprocess.Popen:
    """Start `gradwatch serve` and wait for /healthz; a clear DemoError if it cannot start."""
    ensure_port_free(port)
    command = [sys.executable, "-m", "gradwatch.server.cli", "serve", "--db", db_url, "--port", str(port)]
    # A file, not a pipe: nobody reads a pipe while the demo serves, and a full one blocks the server.
    errors = tempfile.TemporaryFile(mode="w+")
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors, text=True, env=demo_environment())
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        if server.poll() is not None:
            errors.seek(0)
            message = errors.read().strip().splitlines()
            raise DemoError(message[-1] if message else f"the server exited with code {server.returncode}")
        try:
            ApiClient(f"http://127.0.0.1:{port}", timeout=1.0).get("/healthz")
            if server.poll() is None:
                return server
        except ApiError:
            time.sleep(0.1)
    server.kill()
    raise DemoError(f"the server did not answer on port {port} within 30 s")


def wait_until_stored(api: ApiClient, run: str, steps: int, timeout: float = STORE_TIMEOUT_S) -> int:
    """Poll the run list until the run holds `steps` steps; returns what is stored."""
    stored = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = {entry["name"]: entry for entry in api.get("/api/runs")}
        stored = runs.get(run, {}).get("steps", 0)
        if stored >= steps:
            return stored
        time.sleep(0.2)
    return stored


def summarise(api: ApiClient, run: str) -> RunSummary:
    entry = api.get(run_path(run))
    recommendation = api.get(run_path(run, "/recommendation"))
    return RunSummary(run=run, steps=entry["steps"], clip_rate=entry["clip_rate"], clips=entry["clips"],
                      spikes=entry["spikes"], threshold=recommendation.get("threshold"),
                      rationale=recommendation.get("rationale", ""), recommendation=recommendation)


def _share(rate) -> str:
    return "n/a" if rate is None else f"{rate:.1%}"


def format_summary(summary: RunSummary) -> str:
    """Two sentences: what the run did, then the recommendation (robust rule on the clean
    window) against the demo's own threshold of 1.0, or why there is none."""
    rec = summary.recommendation
    head = (f"Run '{summary.run}': {summary.steps:,} steps stored, clipped at 1.0 on {summary.clips:,} of them "
            f"({summary.clip_rate:.1%}); {summary.spikes} gradient spike(s) flagged by the agent.")
    if summary.threshold is None:
        return f"{head} Recommended clip threshold: none yet — {summary.rationale}"
    ratio = rec.get("ratio_to_median")
    window = rec.get("window") or {}
    return (f"{head} Recommended clip threshold: {summary.threshold:.3g}"
            + (f" ({ratio:.3g}× the median norm)" if ratio is not None else "")
            + f", from {window.get('clean_steps', 0):,} clean steps of the last {window.get('steps', 0):,} "
            f"with {rec.get('spikes_left_out', 0)} spike(s) left out; it would have clipped "
            f"{_share(rec.get('clip_rate_raw'))} of those steps, where 1.0 clipped "
            f"{_share(rec.get('clip_rate_at_1_raw'))}.")


def run_demo(args: argparse.Namespace) -> int:
    base_url = f"http://127.0.0.1:{args.port}"
    run = time.strftime("demo-%Y%m%d-%H%M%S")
    server = None
    try:
        ensure_mlx_loads()
        server = start_server(args.db, args.port)
        print(f"gradwatch dashboard: {base_url}/?run={urllib.parse.quote(run)}", flush=True)
        print(f"training a small MLP for {args.steps} steps with gradwatch attached "
              f"(clip at 1.0, a few corrupted batches to make spikes)", flush=True)
        trainer = subprocess.run([sys.executable, "-m", "gradwatch.agent.demo", "--url", base_url,
                                  "--steps", str(args.steps), "--run", run],
                                 env=demo_environment())
        if trainer.returncode != 0:
            raise DemoError(f"the training process failed (exit code {trainer.returncode}); its error is above")
        api = ApiClient(base_url)
        stored = wait_until_stored(api, run, args.steps)
        if stored < args.steps:
            raise DemoError(f"only {stored} of {args.steps} steps reached the server")
        print(format_summary(summarise(api, run)), flush=True)
        if args.exit:
            return 0
        print(f"serving {base_url} — press Ctrl-C to stop", flush=True)
        server.wait()
        return 0
    except DemoError as error:
        print(f"gradwatch demo: {error}", file=sys.stderr)
        return 1
    except ApiError as error:
        print(f"gradwatch demo: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        if server is not None and server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()

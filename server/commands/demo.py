"""`gradwatch demo`: serve, train a small MLX model with the agent attached, summarise.

The server runs as `gradwatch serve` in a child process and the training as
`python -m gradwatch.agent.demo` in another (the server never imports the
agent, docs/architecture.md). Its first line comes at once, before either child
starts: on a first run it says that MLX compiles its CPU kernels (a minute or so,
once). The dashboard address is printed as soon as the server answers; the
summary comes from the server's own REST API, so it shows what was stored, not
what the trainer believes it sent. SIGTERM and SIGHUP stop both children (and on
Linux a child also stops when the demo is killed outright).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field

from .client import ApiClient, ApiError, run_path

STORE_TIMEOUT_S = 60.0
# Measured with `TMPDIR=$(mktemp -d) gradwatch demo --exit` (README, "Two commands").
COLD_START_TEXT = "about 10 s more on a 2-core machine, longer on a slow one"


class DemoError(RuntimeError):
    """A problem the user can act on; printed as one line, no traceback."""


class Stopped(BaseException):
    """SIGTERM or SIGHUP reached the demo: stop the children and exit. A BaseException, as
    KeyboardInterrupt is, so no `except Exception` on the way up turns it into an error."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_received: list[int] = []  # the signals that reached the demo, kept for `_check_stopped`


def _raise_stopped(signum: int, _frame) -> None:
    _received.append(signum)
    raise Stopped(signum)


def _check_stopped() -> None:
    """Raise a signal's `Stopped` again: one that lands while `subprocess.Popen` runs its at-fork
    hooks is swallowed there (Python ignores exceptions in those hooks), so the demo would train
    on. Called after each child is started and while the demo waits."""
    if _received:
        raise Stopped(_received[0])


def _wait(process: subprocess.Popen) -> int:
    """`process.wait()` that notices a swallowed signal within 0.2 s."""
    while True:
        try:
            return process.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            _check_stopped()


def mlx_kernel_cache() -> str | None:
    """The folder MLX's CPU backend compiles its kernels into (`$TMPDIR/mlx/<version>/cpu`),
    found without importing MLX (the server process never does); None without MLX."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        mlx_version = version("mlx")
    except PackageNotFoundError:
        return None
    return os.path.join(tempfile.gettempdir(), "mlx", mlx_version, "cpu")


def first_run_note(steps: int) -> str:
    """The demo's first line, printed before anything slow starts: what it is about to do, and on a
    first run (MLX's kernel cache empty, Linux's CPU backend) that compiling takes a while."""
    cache = mlx_kernel_cache()
    cold = sys.platform != "darwin" and cache is not None and not (os.path.isdir(cache) and os.listdir(cache))
    text = f"gradwatch demo: starting a server and a {steps:,}-step training run"
    if cold:
        text += (f". First run: MLX compiles its CPU kernels with the C++ compiler into {cache} before the "
                 f"first steps ({COLD_START_TEXT}; once)")
    return text


def _die_with_parent(parent: int):
    """For the child, before exec: on Linux, SIGTERM when the demo dies, even by SIGKILL. A demo
    that died between the fork and this call is noticed by the parent pid having changed."""
    def arm() -> None:
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except Exception:
            return
        if os.getppid() != parent:
            os._exit(1)
    return arm


def child_options() -> dict:
    return {"preexec_fn": _die_with_parent(os.getpid())} if sys.platform.startswith("linux") else {}


def stop_child(process: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


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
    check = subprocess.run([sys.executable, "-c", "import mlx.core"], capture_output=True, text=True)
    if check.returncode != 0:
        lines = check.stderr.strip().splitlines()
        why = lines[-1].removeprefix("ImportError: ").removeprefix("ModuleNotFoundError: ") if lines else "?"
        raise DemoError(f"MLX cannot load ({why}). On Linux MLX runs on its CPU backend: "
                        "pip install 'mlx[cpu]' (gradwatch's own install does this)")


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
    command = [sys.executable, "-m", "gradwatch.server.commands.cli", "serve", "--db", db_url, "--port", str(port)]
    # A file, not a pipe: nobody reads a pipe while the demo serves, and a full one blocks the server.
    errors = tempfile.TemporaryFile(mode="w+")
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors, text=True, env=demo_environment(),
                              **child_options())
    try:
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            _check_stopped()
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
        raise DemoError(f"the server did not answer on port {port} within 30 s")
    except BaseException:  # a signal or an error before the caller holds the process: stop it here
        stop_child(server)
        raise


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
    from .recommend import format_rate

    return format_rate(rate)


def format_summary(summary: RunSummary) -> str:
    """What the run did (whole run), then the recommendation and the one clip rate it would have
    had over the recommendation's window (every finite step of it, as `gradwatch recommend` and
    the dashboard's headline give it), beside the demo's own threshold of 1.0 over the same steps."""
    from .recommend import describe_span, rate_window

    rec = summary.recommendation
    head = (f"Run '{summary.run}', whole run: {summary.steps:,} steps stored, clipped at 1.0 on "
            f"{summary.clips:,} of them ({_share(summary.clip_rate)}); {summary.spikes} gradient spike(s) "
            f"flagged by the agent.")
    if summary.threshold is None:
        return f"{head}\nRecommended clip threshold: none yet — {summary.rationale}"
    ratio = rec.get("ratio_to_median")
    window = rec.get("window") or {}
    return (f"{head}\nRecommended clip threshold: {summary.threshold:.3g}"
            + (f" ({ratio:.3g}× the median norm)" if ratio is not None else "")
            + f", from {window.get('clean_steps', 0):,} clean steps of the window of the last "
            f"{window.get('steps', 0):,} ({rec.get('spikes_left_out', 0)} spike(s) left out).\n"
            f"Over that window, {describe_span(rate_window(rec))}, it would have clipped "
            f"{_share(rec.get('clip_rate_raw'))}, where 1.0 clipped {_share(rec.get('clip_rate_at_1_raw'))}.")


def run_demo(args: argparse.Namespace) -> int:
    base_url = f"http://127.0.0.1:{args.port}"
    run = time.strftime("demo-%Y%m%d-%H%M%S")
    print(first_run_note(args.steps), flush=True)
    server = trainer = None
    _received.clear()
    # Not a signal someone chose to ignore (`nohup gradwatch demo` keeps running on SIGHUP).
    previous = {signum: signal.signal(signum, _raise_stopped) for signum in (signal.SIGTERM, signal.SIGHUP)
                if signal.getsignal(signum) is not signal.SIG_IGN}
    try:
        ensure_mlx_loads()
        server = start_server(args.db, args.port)
        _check_stopped()
        print(f"gradwatch dashboard: {base_url}/?run={urllib.parse.quote(run)}", flush=True)
        print(f"run name: {run}", flush=True)
        print(f"training a small MLP for {args.steps:,} steps with gradwatch attached "
              f"(clip at 1.0, a few corrupted batches to make spikes)", flush=True)
        trainer = subprocess.Popen([sys.executable, "-m", "gradwatch.agent.demo", "--url", base_url,
                                    "--steps", str(args.steps), "--run", run],
                                   env=demo_environment(), **child_options())
        if _wait(trainer) != 0:
            raise DemoError(f"the training process failed (exit code {trainer.returncode}); its error is above")
        api = ApiClient(base_url)
        stored = wait_until_stored(api, run, args.steps)
        if stored < args.steps:
            raise DemoError(f"only {stored} of {args.steps} steps reached the server")
        print(format_summary(summarise(api, run)), flush=True)
        if args.exit:
            return 0
        print(f"serving {base_url} — press Ctrl-C to stop", flush=True)
        _wait(server)
        return 0
    except DemoError as error:
        print(f"gradwatch demo: {error}", file=sys.stderr)
        return 1
    except ApiError as error:
        print(f"gradwatch demo: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except Stopped as stop:
        print(f"gradwatch demo: {stop} received, stopping the server", file=sys.stderr, flush=True)
        return 128 + stop.signum
    finally:
        # A second signal while stopping must not leave a child behind: ignore them from here on.
        for signum in previous:
            signal.signal(signum, signal.SIG_IGN)
        stop_child(trainer)
        stop_child(server)
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)

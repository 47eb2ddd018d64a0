"""Delivery when delivery is possible, through real `gradwatch serve` processes: `flush()`
connects at once instead of at the backoff's next slot, its result says what the server
acknowledged and what is only spooled, `close()` names the steps left and the exact
`gradwatch push` command, a new watch sends what an earlier process left, a server that
accepts and never answers is given up, SIGTERM flushes before the process ends, and a
stream through server SIGKILLs and restarts is stored exactly once.

Assertions never depend on how the sender cuts batches: they compare the stored series with
the reference of test_agent_e2e (each step's exact float32 norm, computed here)."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import mlx.core as mx
import pytest
from websockets.sync.server import serve

from gradwatch.agent import FlushResult, GradWatch
from gradwatch.agent import signals
from gradwatch.clip import GlobalNorm
from tests.procs import ServerProcess, free_port
from tests.test_agent_e2e import check_series, get, grads_of, stored

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def server(tmp_path):
    process = ServerProcess(f"sqlite:///{tmp_path / 'gradwatch.db'}", log_path=tmp_path / "server.log")
    process.start()
    yield process
    process.stop()


def train(watch: GradWatch, steps: range) -> None:
    for step in steps:
        mx.eval(watch.step(grads_of(step), loss=step / 4))


def test_flush_connects_at_once_not_at_the_backoffs_next_slot(tmp_path):
    server = ServerProcess(f"sqlite:///{tmp_path / 'db.sqlite'}", log_path=tmp_path / "server.log")
    with pytest.warns(RuntimeWarning, match="cannot reach the server"):
        watch = GradWatch("eager", url=server.url, clipper=GlobalNorm(1.0), spool_dir=tmp_path / "spool",
                          detectors=[], backoff_cap=3600)
        train(watch, range(500))
        away = watch.flush(timeout=0.5)  # nothing listens yet
    assert isinstance(away, FlushResult) and not away and away.unreachable
    assert away.pending == 0 and away.spooled == 500 and away.acked == 0  # durable, not delivered
    # A long backoff: left alone, the next attempt would come in an hour.
    watch._sender.backoff.next_attempt = time.monotonic() + 3600
    with server:
        result = watch.flush(timeout=60)
        assert result, result
        assert (result.acked, result.spooled, result.pending, result.unreachable) == (500, 0, 0, False)
        stats = watch.stats
        assert (stats.acked, stats.spooled, stats.pending, stats.recorded) == (500, 0, 0, 500)
        watch.close()
        check_series(stored(server, "eager"), 500)


def test_close_names_the_steps_left_and_the_exact_push_command_that_sends_them(tmp_path, capfd):
    port = free_port()  # nothing listens there until the end
    url = f"http://127.0.0.1:{port}"
    spool_dir = tmp_path / "spool dir"  # a space: the printed command must quote it
    with pytest.warns(RuntimeWarning) as caught:
        watch = GradWatch("left", url=url, clipper=GlobalNorm(1.0), spool_dir=spool_dir, detectors=[])
        train(watch, range(300))
        final = watch.close(timeout=1)
    unreachable = [str(w.message) for w in caught if "cannot reach the server" in str(w.message)]
    assert len(unreachable) == 1  # one warning, at the first failed connection
    assert url in unreachable[0] and str(spool_dir) in unreachable[0] and "gradwatch push" in unreachable[0]
    assert not final and final.spooled == 300 and final.pending == 0
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("gradwatch: ")]
    assert len(lines) == 1 and "300 step(s) of run 'left' left in the spool" in lines[0]
    command = lines[0].split("send them with: ", 1)[1]
    assert command == f"gradwatch push {shlex.quote(str(spool_dir))} --url {url}"
    with ServerProcess(f"sqlite:///{tmp_path / 'db.sqlite'}", port=port) as server:
        argv = shlex.split(command)
        result = subprocess.run([sys.executable, "-m", "gradwatch.server.commands.cli", *argv[1:]],
                                capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        check_series(stored(server, "left"), 300)


EARLIER_PROCESS = textwrap.dedent("""
    import sys
    import mlx.core as mx
    from gradwatch.agent import GradWatch
    from tests.test_agent_e2e import grads_of
    watch = GradWatch("resumed", url=None, spool_dir=sys.argv[1])
    for step in range(120):
        mx.eval(watch.step(grads_of(step), loss=step / 4))
    watch.close()
""")


def test_a_new_watch_on_the_same_spool_folder_sends_what_an_earlier_process_left(server, tmp_path):
    spool_dir = tmp_path / "spool"
    earlier = subprocess.run([sys.executable, "-c", EARLIER_PROCESS, str(spool_dir)],
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert earlier.returncode == 0, earlier.stderr[-3000:]
    assert f"120 step(s) of run 'resumed' left in the spool {spool_dir}" in earlier.stderr
    watch = GradWatch("resumed", url=server.url, spool_dir=spool_dir, start_step=120)
    train(watch, range(120, 200))
    result = watch.flush(timeout=60)
    assert result and result.acked == 200 and result.spooled == 0 and result.pending == 0
    watch.close()
    check_series(stored(server, "resumed"), 200)
    assert not list(spool_dir.glob("*.gws"))


@pytest.mark.slow
def test_a_server_that_accepts_and_never_answers_is_given_up_after_the_send_timeout(tmp_path):
    """A WebSocket server that completes the handshake and then never reads an answer back:
    without a send timeout the batches would sit in memory in flight forever."""
    stop = threading.Event()

    def never_answer(connection):
        stop.wait(60)

    with serve(never_answer, "127.0.0.1", 0) as mute:
        threading.Thread(target=mute.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{mute.socket.getsockname()[1]}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            watch = GradWatch("mute", url=url, spool_dir=tmp_path / "spool", detectors=[],
                              send_timeout=0.5, batch_steps=50, batch_interval=0.05)
            train(watch, range(400))
            result = watch.flush(timeout=5)
            # Nothing acknowledged, and nothing held in memory either: all of it is on disk.
            assert not result and result.timed_out and result.acked == 0
            assert result.pending == 0 and result.spooled == 400
            final = watch.close(timeout=1)
        stop.set()
        mute.shutdown()
    assert final.spooled == 400 and final.pending == 0


SIGTERM_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import mlx.core as mx
    from gradwatch.agent import GradWatch
    from tests.test_agent_e2e import grads_of
    url, spool, mode, last = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if mode == "chained":
        def users_handler(signum, frame):
            print("the user's handler ran", flush=True)
            sys.exit(3)
        signal.signal(signal.SIGTERM, users_handler)
    watch = GradWatch("term-" + mode, url=url, spool_dir=spool, detectors=[],
                      handle_signals=(mode != "off"), batch_interval=60)
    step = 0
    while True:
        mx.eval(watch.step(grads_of(step), loss=step / 4))
        if step == last:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would; step `last` is still held
        step += 1
""")


@pytest.mark.parametrize("mode, exit_code", [("default", -signal.SIGTERM), ("chained", 3)])
def test_sigterm_delivers_every_step_then_ends_the_process_as_the_signal_would(server, tmp_path,
                                                                              mode, exit_code):
    last = 777
    result = subprocess.run([sys.executable, "-c", SIGTERM_SCRIPT, server.url, str(tmp_path / "spool"),
                             mode, str(last)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == exit_code, result.stderr[-3000:]
    assert ("the user's handler ran" in result.stdout) == (mode == "chained")
    check_series(stored(server, f"term-{mode}"), last + 1)  # the held last step too


def test_without_signal_handling_sigterm_loses_what_is_held(server, tmp_path):
    """The reference for the test above: with `handle_signals=False` the process dies at once
    and the step it held (at least) never reaches the server."""
    last = 777
    result = subprocess.run([sys.executable, "-c", SIGTERM_SCRIPT, server.url, str(tmp_path / "spool"),
                             "off", str(last)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == -signal.SIGTERM
    runs = {run["name"]: run for run in get(server.url + "/api/runs")}
    assert runs.get("term-off", {}).get("steps", 0) < last + 1


def test_signal_handlers_are_installed_only_from_the_main_thread_and_only_when_asked(tmp_path):
    previous = {signum: signal.getsignal(signum) for signum in signals.SIGNALS}
    try:
        for signum in signals.SIGNALS:
            signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)
        GradWatch("no-signals", url=None, spool_dir=tmp_path / "a", handle_signals=False).close()
        assert not any(signals.installed(signum) for signum in signals.SIGNALS)
        made = []
        thread = threading.Thread(target=lambda: made.append(
            GradWatch("in-a-thread", url=None, spool_dir=tmp_path / "b")))
        thread.start()
        thread.join()
        made[0].close()
        assert not any(signals.installed(signum) for signum in signals.SIGNALS)
        GradWatch("main", url=None, spool_dir=tmp_path / "c").close()
        assert all(signals.installed(signum) for signum in signals.SIGNALS)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@pytest.mark.slow
def test_a_stream_through_server_kills_and_quick_restarts_is_stored_exactly_once(server, tmp_path):
    """The CI-sized version of benchmarks/restart_bench.py: SIGKILL, restart 0.5 s later, twice,
    and `flush()` right after the stream, while the server may still be starting."""
    steps, kills = 6_000, (2_000, 4_000)
    watch = GradWatch("restarts", url=server.url, clipper=GlobalNorm(1.0), spool_dir=tmp_path / "spool",
                      detectors=[], backoff_cap=30.0)
    restarters = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "cannot reach the server" warning
        for step in range(steps):
            mx.eval(watch.step(grads_of(step), loss=step / 4))
            if step in kills:
                for restarter in restarters:
                    restarter.join()  # the previous restart is done before the next kill
                server.kill()
                restarters.append(threading.Timer(0.5, server.start))
                restarters[-1].start()
        result = watch.flush(timeout=120)
        final = watch.close()
    for restarter in restarters:
        restarter.join()
    assert result and result.spooled == 0 and result.pending == 0, result
    assert final and final.spooled == 0
    check_series(stored(server, "restarts"), steps)  # every step, once, with its own values
    assert watch.stats.recorded == steps and not watch.stats.dropped

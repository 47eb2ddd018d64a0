"""close() when nothing listens (refused) against a server that accepts and hangs; warnings once.

Checked by result (the flush's `timed_out`, what is in the spool), with pytest-timeout as the
hang check: no wall-clock asserts."""
from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import pytest

from gradwatch.agent import GradWatch
from tests.procs import free_port
from tests.test_agent_unit import spooled_steps

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(40)
def test_close_gives_up_at_once_when_the_connection_is_refused(tmp_path):
    """Nothing listens at the port: close() does not wait out its (long) timeout; every step
    is in the spool and the result says the server was unreachable, not that time ran out."""
    watch = GradWatch("refused", url=f"http://127.0.0.1:{free_port()}", spool_dir=tmp_path,
                      close_timeout=120, handle_signals=False)
    for step in range(200):
        mx.eval(watch.step({"w": mx.array([float(step) + 1.0])}))
    closed = watch.close()
    assert closed.unreachable and not closed.timed_out and not closed.delivered
    assert closed.spooled == 200 and closed.dropped == 0
    assert sorted(spooled_steps(tmp_path)) == list(range(200))


@pytest.mark.timeout(60)
def test_close_waits_its_timeout_for_a_server_that_accepts_and_hangs(tmp_path):
    """A socket that listens and never answers the handshake is not "refused": close() keeps
    trying until its timeout (it may be a slow server), then leaves the steps in the spool."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        watch = GradWatch("hangs", url=f"http://127.0.0.1:{port}", spool_dir=tmp_path, handle_signals=False)
        for step in range(50):
            mx.eval(watch.step({"w": mx.array([float(step) + 1.0])}))
        closed = watch.close(timeout=2.0)
    assert closed.timed_out and not closed.delivered
    assert sorted(spooled_steps(tmp_path)) == list(range(50))


WARN_SCRIPT = textwrap.dedent("""
    import sys
    import mlx.core as mx
    from gradwatch.agent import GradWatch
    watch = GradWatch("warn-once", url=sys.argv[2], spool_dir=sys.argv[1], handle_signals=False)
    for step in range(30):
        mx.eval(watch.step({"w": mx.array([float(step) + 1.0])}))
    watch.flush(timeout=1.0)
    watch.close()
""")


@pytest.mark.timeout(120)
def test_each_agent_warning_is_printed_once(tmp_path):
    """The unreachable-server warning reaches stderr once (not a log line and then the same
    text again as a RuntimeWarning), with default logging and warnings settings."""
    done = subprocess.run([sys.executable, "-c", WARN_SCRIPT, str(tmp_path / "spool"),
                           f"http://127.0.0.1:{free_port()}"],
                          capture_output=True, text=True, timeout=100, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("cannot reach the server") == 1, done.stderr
    assert done.stderr.count("left in the spool") == 1, done.stderr

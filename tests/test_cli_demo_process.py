"""`gradwatch demo` as a process: its first line comes before anything slow, and SIGTERM,
SIGHUP (and on Linux even SIGKILL) leave no server behind on the port.

Real demo processes (server child + MLX trainer child). No wall-clock asserts: the order of
what the demo prints, the port and the children's pids are what is checked."""
from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.procs import child_pids, free_port, pid_alive

CLI = [sys.executable, "-m", "gradwatch.server.commands.cli"]


class Demo:
    """A `gradwatch demo` child whose stdout lines are read by a thread into a queue."""

    def __init__(self, tmp_path, *args: str, env: dict | None = None):
        self.port = free_port()
        self.process = subprocess.Popen(
            CLI + ["demo", "--port", str(self.port), "--db", f"sqlite:///{tmp_path / 'demo.db'}", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
            cwd=tmp_path, env={**os.environ, **(env or {})})
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.errors: list[str] = []  # stderr, read as it comes (a full pipe would block the demo)
        threading.Thread(target=self._read, daemon=True).start()
        self.error_reader = threading.Thread(target=self._read_errors, daemon=True)
        self.error_reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _read_errors(self) -> None:
        for line in self.process.stderr:
            self.errors.append(line)

    def wait(self, timeout: float) -> int:
        """The demo's exit code; on a timeout, what it and its children were doing, in the failure."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            tree = subprocess.run(["ps", "-o", "pid,ppid,stat,wchan:24,etime,args", "--ppid",
                                   str(self.process.pid), "-p", str(self.process.pid)],
                                  capture_output=True, text=True).stdout
            raise AssertionError(f"the demo did not exit within {timeout} s:\n{tree}\n"
                                 f"stderr: {''.join(self.errors)[-3000:]}") from None

    def next_line(self, timeout: float = 120.0) -> str:
        line = self.lines.get(timeout=timeout)
        assert line is not None, f"the demo ended early: {self.process.wait()} {''.join(self.errors)}"
        self.seen.append(line)
        return line

    def wait_for(self, prefix: str, timeout: float = 120.0) -> str:
        while True:
            line = self.next_line(timeout)
            if line.startswith(prefix):
                return line

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_gone(pids: set[int], timeout: float = 30.0) -> set[int]:
    """The pids still alive after waiting up to `timeout` (an outer bound, not a measurement)."""
    deadline = time.monotonic() + timeout
    while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return {pid for pid in pids if pid_alive(pid)}


@pytest.mark.timeout(240)
def test_a_first_run_says_at_once_that_mlx_compiles_its_kernels(tmp_path):
    cold = tmp_path / "empty-tmp"
    cold.mkdir()
    demo = Demo(tmp_path, "--steps", "100000", env={"TMPDIR": str(cold)})
    try:
        first = demo.next_line(timeout=60)  # the first line; the bound is 2 s, not asserted here
        assert first.startswith("gradwatch demo: starting a server and a 100,000-step training run")
        assert "MLX compiles its CPU kernels" in first and str(cold / "mlx") in first and "about" in first
        # ... printed before the server started (its address comes later) and the trainer printed.
        dashboard = demo.wait_for("gradwatch dashboard: ")
        assert demo.seen.index(dashboard) > 0
        demo.wait_for("training a small MLP")
        # The trainer fills the cache the first line named.
        deadline = time.monotonic() + 180
        while not ((cold / "mlx").exists() and any((cold / "mlx").rglob("*.cpp"))):
            assert time.monotonic() < deadline and demo.process.poll() is None, "no kernels were compiled"
            time.sleep(0.2)
    finally:
        demo.close()
    # Once the cache holds kernels, the first line no longer warns of the compile.
    warm = subprocess.run([sys.executable, "-c", "from gradwatch.server.commands.demo import first_run_note; "
                           "print(first_run_note(10))"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "TMPDIR": str(cold)})
    assert warm.returncode == 0, warm.stderr
    assert warm.stdout.startswith("gradwatch demo: starting") and "compiles" not in warm.stdout


def test_the_first_line_comes_before_the_server_starts(tmp_path):
    """With the port taken, the demo stops before the server and the training: the first line
    is printed all the same, and no kernel was compiled into the empty TMPDIR."""
    cold = tmp_path / "empty-tmp"
    cold.mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(CLI + ["demo", "--port", str(port), "--steps", "10", "--exit",
                                     "--db", f"sqlite:///{tmp_path / 'demo.db'}"],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path,
                              env={**os.environ, "TMPDIR": str(cold)})
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and "MLX compiles its CPU kernels" in lines[0]
    assert done.stderr.strip() == f"gradwatch demo: port {port} is already in use; choose another with --port"
    assert not list(cold.rglob("*.cpp"))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL],
                         ids=["SIGTERM", "SIGHUP", "SIGKILL"])
@pytest.mark.slow
def test_a_signal_to_the_demo_stops_its_server_and_trainer(tmp_path, signum):
    if signum == signal.SIGKILL and not sys.platform.startswith("linux"):
        pytest.skip("children follow a killed parent through Linux's PR_SET_PDEATHSIG only")
    demo = Demo(tmp_path, "--steps", "1000000")
    try:
        demo.wait_for("training a small MLP")
        # The trainer is started right after this line: wait until both children exist.
        deadline = time.monotonic() + 60
        while len(children := child_pids(demo.process.pid)) < 2:
            assert time.monotonic() < deadline, f"children: {children}"
            time.sleep(0.05)
        assert not port_is_free(demo.port)
        demo.process.send_signal(signum)
        code = demo.wait(timeout=120)
        assert code == (-signal.SIGKILL if signum == signal.SIGKILL else 128 + signum)
        if signum != signal.SIGKILL:
            demo.error_reader.join(timeout=30)  # stderr ends once the demo and its children have
            assert f"{signal.Signals(signum).name} received, stopping the server" in "".join(demo.errors)
        assert wait_gone(children) == set()
        assert port_is_free(demo.port)
    finally:
        demo.close()

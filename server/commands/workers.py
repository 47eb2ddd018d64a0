"""`gradwatch serve --workers N`: N uvicorn processes, each listening on its own socket.

Why not uvicorn's `workers=N`: its workers share one listening socket and whichever
process wakes first takes the connection, so long-lived keep-alive connections (an
agent, a benchmark writer) pile onto one worker; measured, 3 of 4 went to one and two
workers gave 0.99x of one. Here every worker binds its own socket to the same host:port
with SO_REUSEPORT, and Linux spreads new connections over the sockets by a hash of each
connection's addresses and ports. Only Linux balances that way (macOS and the BSDs
accept the option but do not spread connections), so elsewhere, or where the option is
refused, the server falls back to uvicorn's workers and says why.

The supervisor (the `gradwatch serve` process, after the schema is created or upgraded
once in `serve.check_database`):

- binds the N sockets (a plain bind first, so a port already in use, even by another
  SO_REUSEPORT server, is an error rather than a silently shared port), then starts N
  `python -m gradwatch.server.commands.workers` children, each given one socket and the read end
  of a pipe whose write end only the supervisor holds; it keeps no copy of the sockets,
  so a dead worker's socket closes with it and the kernel sends every new connection to
  the workers still alive;
- forwards each SIGINT/SIGTERM to every worker (uvicorn drains on the first and drops
  open connections on a second SIGINT), and exits 0 when all have exited;
- restarts a worker that exits on its own (a crash, an OOM kill, a failed start), as
  gunicorn does: after a backoff (0.5 s, doubling to 5 s while crashes keep coming), on a
  fresh SO_REUSEPORT socket bound to the same host:port, each step logged. Meanwhile the
  port answers through the others; a connection the kernel had queued on the dead
  worker's socket is reset and the client retries (the agent does; what it sent and was
  not acknowledged is sent again, and ingest is idempotent). After N crashes within a
  minute (N = --workers) something is wrong that a restart will not fix: the supervisor
  stops the others and exits 1, for the process manager (systemd `Restart=`, compose
  `restart:`) to see.
Workers run in their own session, so a terminal's Ctrl-C reaches only the supervisor
(which forwards it once), and each watches its pipe: the supervisor gone, even by
SIGKILL, the pipe reads end-of-file and the worker shuts down, so none outlives it.
Every answer of a worker carries `X-Gradwatch-Worker: <pid>`, which shows whether
connections spread (and lets the tests check it).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from gradwatch.server.commands.serve import _fail, announce, bind_socket, uvicorn_options
from gradwatch.server.app.settings import SETTINGS_ENV, Settings

WORKER_HEADER = b"x-gradwatch-worker"
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class WorkerHeader:
    """ASGI wrapper: `X-Gradwatch-Worker: <pid>` on every HTTP answer of this process."""

    def __init__(self, app, pid: int | None = None):
        self.app = app
        self.value = str(pid or os.getpid()).encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (WORKER_HEADER, self.value)]}
            await send(message)

        return await self.app(scope, receive, send_with_header)


def app_from_env():
    """Factory for uvicorn's own worker processes (the fallback without SO_REUSEPORT)."""
    from gradwatch.server.app.factory import create_app

    return WorkerHeader(create_app(Settings.from_env()))


def reuseport_problem() -> str | None:
    """None where each worker can have its own balanced socket; else one line saying why not."""
    if not sys.platform.startswith("linux"):
        return f"SO_REUSEPORT does not spread connections over processes on {sys.platform}"
    if not hasattr(socket, "SO_REUSEPORT"):
        return "this Python has no socket.SO_REUSEPORT"
    return None


class ReuseportRefused(Exception):
    """The kernel refused SO_REUSEPORT (an old or emulated kernel)."""


def bind_reuseport_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` sockets bound to host:port with SO_REUSEPORT, not yet listening.

    OSError when the port is taken (checked with a plain bind first: SO_REUSEPORT alone
    would happily share the port with another server of the same user)."""
    bind_socket(host, port).close()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            except OSError as error:
                raise ReuseportRefused(f"the kernel refused SO_REUSEPORT: {error.strerror or error}") from error
            sock.bind((host, port))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


CRASH_WINDOW_S = 60.0     # N crashes (N = --workers) within this many seconds: give up
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 5.0


def bind_reuseport_socket(host: str, port: int) -> socket.socket:
    """One more SO_REUSEPORT socket on host:port, next to the live workers' (a replacement's)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass
class Supervisor:
    """The worker processes of one `gradwatch serve --workers N` and what happened to them."""

    settings: Settings
    running: dict[int, int] = field(default_factory=dict)   # pid -> worker index
    signalled: set[int] = field(default_factory=set)        # pids sent a signal at least once
    crashes: list[float] = field(default_factory=list)      # monotonic times of unrequested exits
    restarts: int = 0
    last_signal: int = signal.SIGTERM
    stopping: bool = False
    failed: bool = False
    _write_end: int = -1  # the pipe's write end: closed (or the supervisor gone) -> workers stop
    _read_end: int = -1   # kept for replacements

    def start(self, sockets: list[socket.socket]) -> None:
        """One child per socket; the supervisor keeps none of the sockets, and the pipe."""
        self._read_end, self._write_end = os.pipe()
        try:
            for index, sock in enumerate(sockets):
                if self.stopping:
                    break
                self._spawn(index, sock)
        finally:
            for sock in sockets:
                sock.close()
        self._signal_missed()

    def _spawn(self, index: int, sock: socket.socket) -> int:
        env = {**os.environ, SETTINGS_ENV: self.settings.to_env()}
        command = [sys.executable, "-m", "gradwatch.server.commands.workers",
                   str(index), str(sock.fileno()), str(self._read_end)]
        process = subprocess.Popen(command, env=env, pass_fds=(sock.fileno(), self._read_end),
                                   start_new_session=True)
        self.running[process.pid] = index
        return process.pid

    def _signal_missed(self) -> None:
        if self.stopping:  # a signal came while workers were starting: the ones it missed
            for pid in set(self.running) - self.signalled:
                self._send(pid, self.last_signal)

    def forward(self, signum: int, _frame=None) -> None:
        """Signal handler: pass SIGINT/SIGTERM on to every worker (each time it comes)."""
        self.stopping = True
        self.last_signal = signum
        for pid in list(self.running):
            self._send(pid, signum)

    def _send(self, pid: int, signum: int) -> None:
        self.signalled.add(pid)
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    def _say(self, text: str) -> None:
        print(f"gradwatch serve: {text}", file=sys.stderr, flush=True)

    def _backoff(self, seconds: float) -> None:
        """Sleep, but return at once when a stop is asked for."""
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def _crashed(self, index: int, pid: int, status: int) -> None:
        """A worker exited unasked: restart it after a backoff, or give up after N a minute."""
        code = os.waitstatus_to_exitcode(status)
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        now = time.monotonic()
        self.crashes = [t for t in self.crashes if now - t < CRASH_WINDOW_S] + [now]
        limit = self.settings.workers
        if len(self.crashes) >= limit:
            self._say(f"worker {index} (pid {pid}) {how}; {len(self.crashes)} crashes within "
                      f"{CRASH_WINDOW_S:g} s (the limit is {limit}, one per worker): stopping the others")
            self.failed = True
            self.forward(signal.SIGTERM)
            return
        delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (len(self.crashes) - 1))
        self._say(f"worker {index} (pid {pid}) {how}; restarting it in {delay:g} s")
        while not self.stopping:
            self._backoff(delay)
            if self.stopping:
                return
            try:
                sock = bind_reuseport_socket(self.settings.host, self.settings.port)
            except OSError as error:
                delay = min(BACKOFF_MAX_S, delay * 2)
                self._say(f"worker {index}: cannot bind {self.settings.host}:{self.settings.port} again "
                          f"({error.strerror or error}); retrying in {delay:g} s")
                continue
            try:
                new_pid = self._spawn(index, sock)
            finally:
                sock.close()
            self.restarts += 1
            self._say(f"worker {index} restarted as pid {new_pid}")
            self._signal_missed()
            return

    def wait(self) -> int:
        """Until every worker has exited: 0 after a requested stop, 1 after too many crashes."""
        while self.running:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            index = self.running.pop(pid, None)
            if index is None:
                continue
            if not self.stopping:
                self._crashed(index, pid, status)
        for end in ("_write_end", "_read_end"):
            if getattr(self, end) >= 0:
                os.close(getattr(self, end))
                setattr(self, end, -1)
        return 1 if self.failed else 0


def serve_workers(settings: Settings) -> int:
    """Run `settings.workers` processes on host:port; the schema is already created or upgraded."""
    problem = reuseport_problem()
    if problem is None:
        try:
            sockets = bind_reuseport_sockets(settings.host, settings.port, settings.workers)
        except ReuseportRefused as error:
            problem = str(error)
        except OSError as error:
            return _fail(f"cannot listen on {settings.host}:{settings.port}: {error.strerror or error}")
    if problem is not None:
        return serve_shared_socket(settings, problem)
    announce(settings)
    supervisor = Supervisor(settings)
    previous = {signum: signal.signal(signum, supervisor.forward) for signum in FORWARDED_SIGNALS}
    try:
        try:
            supervisor.start(sockets)
        except BaseException:
            supervisor.forward(signal.SIGTERM)
            supervisor.wait()
            raise
        return supervisor.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def serve_shared_socket(settings: Settings, why: str) -> int:
    """Fallback: uvicorn's workers on one shared socket (connections may not spread evenly)."""
    import uvicorn

    try:
        bind_socket(settings.host, settings.port).close()  # a clear message for a taken port
    except OSError as error:
        return _fail(f"cannot listen on {settings.host}:{settings.port}: {error.strerror or error}")
    announce(settings)
    print(f"gradwatch serve: {why}; using uvicorn's workers, which share one socket "
          f"(keep-alive connections may not spread evenly)", file=sys.stderr, flush=True)
    os.environ[SETTINGS_ENV] = settings.to_env()
    uvicorn.run("gradwatch.server.commands.workers:app_from_env", factory=True, host=settings.host,
                port=settings.port, workers=settings.workers, **uvicorn_options(settings))
    return 0


def _watch_supervisor(pipe_fd: int, server) -> None:
    """Block on the pipe; end-of-file means the supervisor is gone: shut this worker down."""
    try:
        while os.read(pipe_fd, 1):
            pass
    except OSError:
        pass
    server.should_exit = True


def worker_main(argv: list[str]) -> int:
    """One worker: `python -m gradwatch.server.commands.workers INDEX SOCKET_FD PIPE_FD`."""
    import uvicorn

    from gradwatch.server.app.factory import create_app
    from gradwatch.server.app.malloc import limit_retained_memory

    limit_retained_memory()   # before any thread starts: the arenas are per thread
    _index, sock_fd, pipe_fd = (int(arg) for arg in argv)
    sock = socket.socket(fileno=sock_fd)
    settings = Settings.from_env()
    server = uvicorn.Server(uvicorn.Config(WorkerHeader(create_app(settings)), **uvicorn_options(settings)))
    threading.Thread(target=_watch_supervisor, args=(pipe_fd, server), daemon=True,
                     name="gradwatch-supervisor-watch").start()
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))

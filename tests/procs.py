"""Real server processes for tests: start `gradwatch serve`, wait, kill -9, restart."""
from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_pair() -> int:
    """A port P with P and P + 1 both free now (MLX's ring backend listens on both)."""
    while True:
        port = free_port()
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


def launch_two_ranks(script: Path, *args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """`mlx.launch -n 2 --backend ring script args`, retried while the ring cannot bind its ports.

    Under pytest-xdist another test can take a port between `free_port_pair()` and the ring's
    bind; that shows as "Address already in use" from the launcher or as "Couldn't bind socket
    (error: 98)" from a rank (whose failure the launcher may not pass on in its exit status).
    """
    launcher = Path(sys.executable).with_name("mlx.launch")
    base = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "mlx.launch"]
    for _ in range(5):
        command = base + ["-n", "2", "--backend", "ring", "--python", sys.executable,
                          "--starting-port", str(free_port_pair()), str(script), *args]
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        output = result.stdout + result.stderr
        if "ddress already in use" not in output and "Couldn't bind socket" not in output:
            return result
    return result


def listening_inodes(port: int) -> set[str]:
    """Inodes of the sockets listening on 127.0.0.1/any `port` (Linux's /proc/net tables)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def holds_port(pid: int, port: int) -> bool:
    """Whether `pid` or one of its children holds a socket listening on `port` (True where
    /proc cannot tell, off Linux)."""
    if not Path("/proc/net/tcp").exists():
        return True
    inodes = listening_inodes(port)
    family = [pid] + [int(entry.name) for entry in Path("/proc").iterdir()
                      if entry.name.isdigit() and _parent_of(entry) == pid]
    for member in family:
        try:
            descriptors = os.listdir(f"/proc/{member}/fd")
        except OSError:
            continue
        for fd in descriptors:
            try:
                target = os.readlink(f"/proc/{member}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                return True
    return False


def _parent_of(proc_entry: Path) -> int | None:
    try:
        return int((proc_entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


class ServerProcess:
    """`gradwatch serve` in a child process on 127.0.0.1 and a free port.

    `start()` waits until `/healthz` answers; `kill()` sends SIGKILL (no
    clean shutdown, as a crash would); `restart()` starts it again on the
    same port and database.
    """

    def __init__(self, db_url: str, port: int | None = None, extra_args: list[str] | None = None,
                 log_path: Path | None = None, cli_module: str = "gradwatch.server.commands.cli"):
        self.db_url = db_url
        self.cli_module = cli_module  # an older release's CLI lives elsewhere (gradwatch.server.cli)
        self.port = port or free_port()
        self.port_chosen_here = port is None  # may be chosen again if another process takes it first
        self.extra_args = list(extra_args or [])
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerProcess":
        """Start the server and wait until *it* answers `/healthz`.

        Under pytest-xdist another test's server can bind the free port between `free_port()`
        and this server's bind: then a `/healthz` answer is not ours. The answer counts only
        when this process (or one of its workers) holds the listening socket; a first start on
        a port chosen here that loses it that way is tried again on a new free port."""
        first_start = self.process is None
        for _attempt in range(3):
            if self._start_once(timeout):
                return self
            if not (first_start and self.port_chosen_here):
                break
            self.port = free_port()
        raise RuntimeError(f"server exited with {self.process.returncode}: port {self.port} taken? "
                           f"{self.cli_module} serve --db {self.db_url}")

    def _start_once(self, timeout: float) -> bool:
        """True once this process answers; False when it exited while another process held the port."""
        command = [sys.executable, "-m", self.cli_module, "serve", "--db", self.db_url,
                   "--port", str(self.port), *self.extra_args]
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if listening_inodes(self.port):  # someone else listens there: the port was taken
                    return False
                raise RuntimeError(f"server exited with {self.process.returncode}: {command}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as answer:
                    if answer.status == 200 and holds_port(self.process.pid, self.port):
                        return True
            except OSError:
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"server did not answer /healthz within {timeout} s")

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self, timeout: float = 30.0) -> "ServerProcess":
        self.kill()
        return self.start(timeout)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


WORKER_HEADER = "X-Gradwatch-Worker"


def child_pids(pid: int) -> set[int]:
    """Live children of `pid` (Linux /proc): a `serve --workers N` supervisor's workers."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            children.add(int(stat.parent.name))
    return children


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def answering_worker(port: int, connection: http.client.HTTPConnection | None = None) -> int:
    """The pid in `X-Gradwatch-Worker` of a `/healthz` answer (on `connection`, else a new one)."""
    own = connection is None
    connection = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", "/healthz")
        answer = connection.getresponse()
        answer.read()
        if answer.status != 200 or answer.getheader(WORKER_HEADER) is None:
            raise RuntimeError(f"/healthz answered {answer.status} without {WORKER_HEADER}")
        return int(answer.getheader(WORKER_HEADER))
    finally:
        if own:
            connection.close()


def wait_for_workers(server: ServerProcess, count: int, timeout: float = 60.0) -> set[int]:
    """Open new connections until `count` different workers have answered (each worker listens
    only once its app has started; until then the kernel gives its share to the others)."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(seen) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only workers {sorted(seen)} answered within {timeout} s, wanted {count}")
        seen.add(answering_worker(server.port))
    return seen


def postgres_bin() -> Path | None:
    """The newest PostgreSQL server binaries under /usr/lib/postgresql (Debian's layout)."""
    for version_dir in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (version_dir / "postgres").exists():
            return version_dir
    return None


class PostgresCluster:
    """A throwaway PostgreSQL cluster in a temporary folder on 127.0.0.1 (benchmarks; the tests'
    `postgres_url` fixture does the same). `url` is its `postgres` database; `new_database()`
    creates an empty one and returns its SQLAlchemy URL."""

    def __init__(self):
        import shutil
        import tempfile

        self.bin_dir = postgres_bin()
        if self.bin_dir is None:
            raise RuntimeError("PostgreSQL server binaries not found (apt-get install -y postgresql)")
        # Not under pytest's 0700 temp folders: initdb may run as `postgres`.
        self.data_dir = Path(tempfile.mkdtemp(prefix="gradwatch-pg-"))
        self.run_as: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            shutil.chown(self.data_dir, "postgres")
            os.chmod(self.data_dir, 0o700)
            self.run_as = ["runuser", "-u", "postgres", "--"]
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self._databases = 0

    def start(self) -> "PostgresCluster":
        subprocess.run(self.run_as + [str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-A", "trust",
                                      "-U", "postgres", "--no-sync"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(self.run_as + [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-w", "-l",
                                      str(self.data_dir / "server.log"), "-o",
                                      f"-h 127.0.0.1 -p {self.port} -k {self.data_dir} -c fsync=off "
                                      f"-c max_connections=200", "start"],
                       check=True, stdout=subprocess.DEVNULL)
        return self

    def new_database(self) -> str:
        import psycopg

        self._databases += 1
        name = f"gw_{os.getpid()}_{self._databases}"
        with psycopg.connect(self.url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}")
        return self.url.rsplit("/", 1)[0] + "/" + name

    def stop(self) -> None:
        import shutil

        subprocess.run(self.run_as + [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate",
                                      "stop"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "PostgresCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

"""Ingest throughput: columnar 2,000-step batches over keep-alive HTTP connections.

Starts `gradwatch serve` itself, has K writers (threads, each its own run and its own
keep-alive connection) post generated steps (every column the agent sends, a few clips
and spikes), and prints steps stored per second from the first request to the last
answer (each answer is sent after its transaction commits). Every stored count is
checked through the API afterwards.

    python benchmarks/ingest_bench.py [--steps N] [--batch B] [--repeat R]
        [--db URL] [--pg] [--writers K] [--workers N]
        [--encodings json,msgpack] [--tensors T] [--against COMMIT]

- default: one writer into a fresh SQLite file per run, compared with MLflow 3.17's
  `log_batch` into SQLite on this machine (5,170 points/s);
- `--db URL`: the database to measure (`sqlite:///file.db`, `postgresql+psycopg://...`);
  used as it is, each run's rows under fresh run names, deleted afterwards;
- `--pg`: also a throwaway PostgreSQL cluster (fsync off, as in the tests; a fresh
  database per run): SQLite (or `--db`) and PostgreSQL figures and their ratio in one run;
- `--writers K`: K concurrent writers; `--steps` is the total, split over them;
- `--workers N` (N > 1): `serve --workers N` measured against `--workers 1` in the same run;
  each run prints how many writers the kernel placed on each worker, and `--balance`
  reconnects writers until they are spread evenly.

- `--encodings`: the wire encodings to post (default both: JSON, and msgpack with typed
  columns as the agent sends them); each is a configuration of its own, and the msgpack
  ones are also compared with JSON on the same tree and database; the in-process decode
  time per batch of each encoding is printed too;
- `--tensors T`: T per-tensor norms per step (float32, as the agent records them);
- `--against COMMIT`: that commit's server (`git archive` into /tmp, imported ahead of the
  working tree through PYTHONPATH) measured with JSON, alternately with the working tree's;
  it is the baseline. An encoding the commit does not know is measured only here.

With one worker each configuration also reports the server process's CPU time per batch
(/proc user + system: steadier than wall-clock rates on a loaded machine).

Configurations are measured in turn within each repeat (so drift hits all alike), in
reverse order every other repeat; the first is the baseline every ratio is against. The
machine is shared and noisy: `--repeat 5` reports the median of five runs of each.
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.procs import PostgresCluster, ServerProcess, answering_worker, wait_for_workers  # noqa: E402

MLFLOW_POINTS_PER_S = 5170.0
WARMUP_BATCHES = 2


MEDIA_TYPES = {"json": "application/json", "msgpack": "application/msgpack"}


def typed(values: np.ndarray) -> msgpack.ExtType:
    """A typed column of the binary wire (agent/wire.py's `typed_array`, without importing it)."""
    array = np.ascontiguousarray(values)
    return msgpack.ExtType(1, array.dtype.str.encode().ljust(8, b"\0") + array.tobytes())


def make_batches(steps: int, batch: int, seed: int = 0, encoding: str = "json", tensors: int = 0) -> list[bytes]:
    """The bodies to post: the same values in either encoding (msgpack: each column a typed
    array, float64 like the JSON numbers; tensor norms float32 in both)."""
    rng = np.random.default_rng(seed)
    pre = np.exp(rng.normal(0.0, 0.3, steps))
    pre[rng.choice(steps, max(steps // 1000, 1), replace=False)] *= 20.0
    threshold = np.full(steps, 1.5)
    clipped = pre > threshold
    scale = np.minimum(threshold / (pre + 1e-6), 1.0)
    loss = 3.0 * np.exp(-np.arange(steps) / steps) + rng.normal(0, 0.01, steps)
    z = rng.normal(0, 1, steps)
    norms = rng.random((min(batch, steps), tensors)).astype(np.float32) if tensors else None
    names = [f"layers.{i}.weight" for i in range(tensors)]
    bodies = []
    start_time = 1.7e9
    for begin in range(0, steps, batch):
        part = slice(begin, min(begin + batch, steps))
        if encoding == "msgpack":
            count = part.stop - part.start
            body: dict = {
                "step": typed(np.arange(part.start, part.stop, dtype=np.int64)),
                "pre_norm": typed(pre[part]), "post_norm": typed(pre[part] * scale[part]),
                "scale": typed(scale[part]), "threshold": typed(threshold[part]), "clipped": typed(clipped[part]),
                "loss": typed(loss[part]), "lr": typed(np.full(count, 3e-4)), "z": typed(z[part]),
                "ema": typed(pre[part]), "spike": typed(pre[part] > 10), "nonfinite": typed(np.zeros(count, bool)),
                "time": typed(start_time + np.arange(part.start, part.stop) * 0.01)}
            if tensors:
                body["tensor_norms"] = {"names": names, "norms": typed(norms[:count])}
            bodies.append(msgpack.packb(body))
            continue
        extra = {"tensor_norms": {"names": names, "norms": norms[:part.stop - part.start]}} if tensors else {}
        bodies.append(orjson.dumps({
            "step": list(range(part.start, part.stop)),
            "pre_norm": pre[part].tolist(), "post_norm": (pre[part] * scale[part]).tolist(),
            "scale": scale[part].tolist(), "threshold": threshold[part].tolist(),
            "clipped": clipped[part].tolist(), "loss": loss[part].tolist(),
            "lr": [3e-4] * (part.stop - part.start), "z": z[part].tolist(),
            "ema": pre[part].tolist(), "spike": (pre[part] > 10).tolist(),
            "nonfinite": [False] * (part.stop - part.start),
            "time": (start_time + np.arange(part.start, part.stop) * 0.01).tolist(), **extra,
        }, option=orjson.OPT_SERIALIZE_NUMPY))
    return bodies


def post_all(port: int, run: str, bodies: list[bytes],
             connection: http.client.HTTPConnection | None = None, media_type: str = "application/json") -> float:
    """Seconds to post `bodies` to `run`, one after another on one keep-alive connection."""
    own = connection is None
    connection = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    headers = {"Content-Type": media_type}
    started = time.perf_counter()
    for body in bodies:
        connection.request("POST", f"/api/runs/{run}/steps", body=body, headers=headers)
        answer = connection.getresponse()
        payload = answer.read()
        if answer.status != 200:
            raise RuntimeError(f"ingest answered {answer.status}: {payload[:200]!r}")
    elapsed = time.perf_counter() - started
    if own:
        connection.close()
    return elapsed


@dataclass
class Database:
    """Where one configuration stores: `fresh()` gives the URL for one measured run."""

    name: str
    fresh: object  # () -> context manager yielding a URL (a fresh database, or the given one)
    given: bool = False  # the user's database: the measured runs are deleted afterwards


@dataclass
class Tree:
    """Which server code runs: the working tree (`site` None) or a commit unpacked in /tmp."""

    name: str
    site: Path | None = None
    cli_module: str = "gradwatch.server.commands.cli"  # before the server's rooms: gradwatch.server.cli


@dataclass
class Config:
    database: Database
    workers: int
    encoding: str = "json"
    tree: Tree = field(default_factory=lambda: Tree("working tree"))
    times: list[float] = field(default_factory=list)
    spreads: list[list[int]] = field(default_factory=list)  # writers per worker, each run
    cpu: list[float] = field(default_factory=list)  # server CPU seconds per batch, each run (1 worker)

    @property
    def label(self) -> str:
        where = "" if self.tree.site is None else f"{self.tree.name} "
        return (f"{where}{self.encoding}, {self.database.name}, "
                f"{self.workers} worker{'s' if self.workers > 1 else ''}")


@contextlib.contextmanager
def commit_tree(commit: str):
    """`commit`'s folders unpacked in /tmp, importable as `gradwatch.*` ahead of the working tree."""
    with tempfile.TemporaryDirectory(prefix="gradwatch-against-") as folder:
        source, site = Path(folder) / "src", Path(folder) / "site" / "gradwatch"
        source.mkdir()
        site.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
        for part in ("clip", "agent", "server", "dashboard"):
            if (source / part).is_dir():
                (site / part).symlink_to(source / part)
        name = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", commit], check=True,
                              capture_output=True, text=True).stdout.strip()
        rooms = (source / "server" / "commands" / "cli.py").is_file()
        yield Tree(name, site.parent, "gradwatch.server.commands.cli" if rooms else "gradwatch.server.cli")


@contextlib.contextmanager
def tree_env(tree: Tree):
    """PYTHONPATH for a server started meanwhile (ServerProcess passes os.environ on)."""
    if tree.site is None:
        yield
        return
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(tree.site) + (os.pathsep + before if before else "")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


@contextlib.contextmanager
def fresh_sqlite():
    with tempfile.TemporaryDirectory() as folder:
        yield f"sqlite:///{Path(folder) / 'bench.db'}"


def api_json(port: int, method: str, path: str):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        connection.request(method, path)
        answer = connection.getresponse()
        payload = answer.read()
        if answer.status >= 300:
            raise RuntimeError(f"{method} {path} answered {answer.status}: {payload[:200]!r}")
        return orjson.loads(payload) if payload else None
    finally:
        connection.close()


def stored_steps(port: int, run: str) -> int:
    """The run's stored step count (`GET /api/runs/{run}`, or the run list of an older server)."""
    try:
        return api_json(port, "GET", f"/api/runs/{run}")["steps"]
    except RuntimeError:
        runs = api_json(port, "GET", "/api/runs")
        runs = runs.get("runs", []) if isinstance(runs, dict) else runs
        return next(item["steps"] for item in runs if item["name"] == run)


def connect_writers(port: int, pids: list[int], writers: int,
                    balance: bool) -> tuple[list[http.client.HTTPConnection], list[int]]:
    """One keep-alive connection per writer, and how many landed on each worker. The kernel
    picks a worker by a hash of each connection's ports, so 4 writers on 2 workers are 2:2
    only 3 times in 8; `balance` reconnects until no worker has more than its share."""
    connections: list[http.client.HTTPConnection] = []
    spread = [0] * max(len(pids), 1)
    share = -(-writers // max(len(pids), 1))
    while len(connections) < writers:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        slot = pids.index(answering_worker(port, connection)) if pids else 0
        if balance and spread[slot] >= share:
            connection.close()
            continue
        spread[slot] += 1
        connections.append(connection)
    return connections, spread


def run_once(config: Config, bodies: list[bytes], writers: int, steps_each: int, balance: bool = False) -> float:
    """Seconds for `writers` concurrent writers to store `bodies` each, into their own runs,
    through a fresh server with `config.workers` workers; checks every count through the API."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    runs = [f"{prefix}-w{index}" for index in range(writers)]
    media_type = MEDIA_TYPES[config.encoding]
    with config.database.fresh() as url, tempfile.TemporaryDirectory() as logs:
        extra = ["--workers", str(config.workers)] if config.workers > 1 else []
        with tree_env(config.tree):
            server = ServerProcess(url, extra_args=extra, log_path=Path(logs) / "server.log",
                                   cli_module=config.tree.cli_module).start()
        with contextlib.closing(_Stop(server)):
            pids = sorted(wait_for_workers(server, config.workers)) if config.workers > 1 else []
            connections, spread = connect_writers(server.port, pids, writers, balance)
            ready = threading.Barrier(writers + 1)
            finished: list[float] = []
            errors: list[BaseException] = []

            def write(connection: http.client.HTTPConnection, run: str) -> None:
                try:
                    post_all(server.port, f"warmup-{run}", bodies[:WARMUP_BATCHES], connection, media_type)
                    ready.wait()
                    post_all(server.port, run, bodies, connection, media_type)
                    finished.append(time.perf_counter())
                except BaseException as error:  # noqa: BLE001 - re-raised below
                    errors.append(error)
                    ready.abort()

            threads = [threading.Thread(target=write, args=pair) for pair in zip(connections, runs)]
            for thread in threads:
                thread.start()
            try:
                ready.wait()
            except threading.BrokenBarrierError:
                pass
            cpu_before = process_cpu(server.process.pid)
            started = time.perf_counter()
            for thread in threads:
                thread.join()
            cpu = process_cpu(server.process.pid) - cpu_before
            for connection in connections:
                connection.close()
            if errors:
                raise errors[0]
            elapsed = max(finished) - started
            for run in runs:
                stored = stored_steps(server.port, run)
                if stored != steps_each:
                    raise RuntimeError(f"run {run}: stored {stored} steps, sent {steps_each}")
                if config.database.given:
                    api_json(server.port, "DELETE", f"/api/runs/{run}")
                    api_json(server.port, "DELETE", f"/api/runs/warmup-{run}")
    config.times.append(elapsed)
    if config.workers == 1:
        config.cpu.append(cpu / (len(bodies) * writers))
    if pids:
        config.spreads.append(spread)
    return elapsed


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used (Linux /proc): what a batch costs the
    server, steadier than wall-clock time on a loaded machine."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Stop:
    def __init__(self, server: ServerProcess):
        self.server = server

    def close(self) -> None:
        self.server.stop()


def decode_ms(bodies: dict[str, list[bytes]], rounds: int = 5) -> dict[str, float]:
    """In-process median milliseconds to decode and validate one body (`server/wire`), the
    encodings alternated round by round."""
    from gradwatch.server import wire
    times: dict[str, list[float]] = {encoding: [] for encoding in bodies}
    for _ in range(rounds):
        for encoding, items in bodies.items():
            for body in items[:20]:
                started = time.perf_counter()
                wire.load_batch(body, MEDIA_TYPES[encoding])
                times[encoding].append(time.perf_counter() - started)
    return {encoding: median(values) * 1000 for encoding, values in times.items()}


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]  # the median run (the upper one of an even count)


def main(steps: int = 400_000, batch: int = 2000, repeat: int = 1, db: str | None = None,
         pg: bool = False, writers: int = 1, workers: int = 1, balance: bool = False,
         encodings: tuple[str, ...] = ("json", "msgpack"), tensors: int = 0, against: str | None = None) -> dict:
    writers = max(writers, 1)
    steps_each = steps // writers
    bodies = {encoding: make_batches(steps_each, batch, encoding=encoding, tensors=tensors) for encoding in encodings}
    total = steps_each * writers
    first = (Database(_db_name(db), lambda: contextlib.nullcontext(db), given=True) if db
             else Database("sqlite", fresh_sqlite))
    with contextlib.ExitStack() as stack:
        databases = [first]
        if pg:
            cluster = stack.enter_context(PostgresCluster())
            databases.append(Database("postgresql", lambda: contextlib.nullcontext(cluster.new_database())))
        trees = [Tree("working tree")]
        if against:
            trees.insert(0, stack.enter_context(commit_tree(against)))
        configs = [Config(database, count, encoding, tree) for tree in trees for encoding in encodings
                   if tree.site is None or encoding == "json"
                   for database in databases for count in sorted({1, max(workers, 1)})]
        for attempt in range(repeat):
            for config in (configs if attempt % 2 == 0 else configs[::-1]):
                elapsed = run_once(config, bodies[config.encoding], writers, steps_each, balance)
                spread = f", writers per worker {config.spreads[-1]}" if config.workers > 1 else ""
                print(f"  run {attempt + 1}/{repeat} {config.label}: {total / elapsed:,.0f} steps/s{spread}",
                      flush=True)
    figures = report(configs, total, batch, bodies[encodings[0]], writers, repeat, balance)
    figures.update(compare_encodings(configs, total))
    decoded = decode_ms(bodies)
    figures.update({f"{encoding}_decode_ms": round(ms, 3) for encoding, ms in decoded.items()})
    print("  decode + validate one body in process (server/wire, median): "
          + ", ".join(f"{encoding} {ms:.3f} ms" for encoding, ms in decoded.items())
          + (f" ({decoded['json'] / decoded['msgpack']:.1f}x faster binary)" if len(decoded) == 2 else ""))
    return figures


def compare_encodings(configs: list[Config], total: int) -> dict:
    """msgpack against JSON on the same tree, database and workers."""
    figures = {}
    for config in configs:
        if config.encoding == "json":
            continue
        twin = next((c for c in configs if c.encoding == "json" and c.tree is config.tree
                     and c.database is config.database and c.workers == config.workers), None)
        if twin is not None:
            ratio = median(twin.times) / median(config.times)
            figures[f"{config.encoding}_vs_json"] = round(ratio, 3)
            print(f"  {config.label} vs {twin.label}: {ratio:.2f}x")
    return figures


def _db_name(url: str) -> str:
    return url.split(":", 1)[0].split("+", 1)[0]


def report(configs: list[Config], total: int, batch: int, bodies: list[bytes], writers: int, repeat: int,
           balance: bool = False) -> dict:
    base = configs[0]
    base_rate = total / median(base.times)
    figures = {"steps": total, "batch": batch, "writers": writers, "runs": repeat,
               "body_bytes_per_step": round(sum(map(len, bodies)) / (total // writers), 1)}
    what = (f"{total:,} steps in batches of {batch:,}, {writers} writer{'s' if writers > 1 else ''} "
            f"(each its own run and connection{', balanced over the workers' if balance else ''})"
            + (f", median of {repeat} runs" if repeat > 1 else ""))
    print(f"ingest: {what}")
    for config in configs:
        elapsed = median(config.times)
        rate = total / elapsed
        key = config.label.replace(", ", "_").replace(" ", "_")
        figures[f"{key}_steps_per_s"] = round(rate)
        line = f"  {config.label:<26} {rate:>10,.0f} steps/s  {elapsed:7.2f} s"
        if config is base:
            line += "  baseline"
            if len(configs) == 1 and config.database.name == "sqlite" and writers == 1:
                figures.update(seconds=round(elapsed, 3), steps_per_s=round(rate),
                               vs_mlflow_log_batch=round(rate / MLFLOW_POINTS_PER_S, 1),
                               batch_ms=round(elapsed / len(bodies) * 1000, 2))
                line += (f" ({rate / MLFLOW_POINTS_PER_S:.1f}x MLflow 3.17 log_batch's "
                         f"{MLFLOW_POINTS_PER_S:,.0f} points/s), {figures['batch_ms']} ms per batch")
        else:
            figures[f"{key}_vs_baseline"] = round(rate / base_rate, 3)
            line += f"  {rate / base_rate:.2f}x baseline"
            one = next(c for c in configs if c.database is config.database and c.workers == 1)
            if one is not config and one is not base:
                ratio = rate / (total / median(one.times))
                figures[f"{key}_vs_1_worker"] = round(ratio, 3)
                line += f", {ratio:.2f}x {one.label}"
        if config.spreads:
            line += f"  (writers per worker: {', '.join(map(str, config.spreads))})"
        if config.cpu:
            cpu_ms = median(config.cpu) * 1000
            figures[f"{key}_server_cpu_ms_per_batch"] = round(cpu_ms, 2)
            line += f"  server CPU {cpu_ms:.2f} ms/batch"
            if config is not base and base.cpu:
                line += f" ({median(base.cpu) / median(config.cpu):.2f}x the baseline's speed per CPU second)"
        print(line)
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400_000, help="steps in all, split over the writers")
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=1,
                        help="run N times (a fresh server and database each) and report the median run")
    parser.add_argument("--db", help="database URL to measure (default: a fresh SQLite file per run)")
    parser.add_argument("--pg", action="store_true",
                        help="also a throwaway PostgreSQL cluster; prints both and their ratio")
    parser.add_argument("--writers", type=int, default=1,
                        help="concurrent writers, each its own run and connection")
    parser.add_argument("--workers", type=int, default=1,
                        help="serve --workers N, measured against one worker in the same run")
    parser.add_argument("--balance", action="store_true",
                        help="reconnect writers until they spread evenly over the workers (the server's "
                             "capacity, apart from how the kernel's hash happened to place them)")
    parser.add_argument("--encodings", default="json,msgpack",
                        help="comma-separated: json, msgpack (the first is the baseline without --against)")
    parser.add_argument("--tensors", type=int, default=0, help="per-tensor norms per step")
    parser.add_argument("--against", metavar="COMMIT",
                        help="also that commit's server (JSON), alternated with the working tree's; the baseline")
    options = parser.parse_args()
    chosen = tuple(name.strip() for name in options.encodings.split(",") if name.strip())
    unknown = [name for name in chosen if name not in MEDIA_TYPES]
    if unknown or not chosen:
        parser.error(f"--encodings: choose from {', '.join(MEDIA_TYPES)}")
    main(options.steps, options.batch, max(options.repeat, 1), options.db, options.pg,
         options.writers, options.workers, options.balance, chosen, options.tensors, options.against)

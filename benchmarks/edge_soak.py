"""Soak and fault cases of the server's edge, each against a fresh real server.

    python benchmarks/edge_soak.py [--short] [--case NAME ...]

Every case starts `gradwatch serve` (temporary SQLite, free port), samples the
server's RSS (all its processes) every 20 ms, runs the fault, checks the answers,
and meanwhile has a normal client POST a small batch and read `/healthz`. The
table: the case, whether it was answered right (and what), the server's RSS at
the start and its peak, whether the normal client was served meanwhile.

Cases (issue 19; goals in brackets, full size):
- stalled-bodies: 50 uploads declaring 32 MiB (half chunked) send one byte
  [a normal POST and an agent batch answered; each stalled one 408 after the idle bound]
- stalled-ws-frames: a --token server; 8 clients without a token try to send
  32 MiB frames to /ws/ingest [refused at the handshake (401), <= +20 MB], and one
  with the token stalls mid-frame [closed by the ping timeout]
- stalled-live-reader: a /ws/live reader that never reads, 20 POSTs of 100,000
  steps [<= +30 MB; the reader gets a resync or is closed]
- tensor-names: 16,000 names `layers.{i}.w` over 32 steps, `?group=block`
  [an answer, <= +100 MB]; 100,000 names [a 4xx or an answer, never a 500]
- growing-meta: 300 messages of new 60 KiB meta keys [413/422 naming the cap once
  past it; acks and GET /api/runs stay fast]
- webhooks: a receiver that sends a byte every 2 s and one that answers 500,
  beside a healthy one [the healthy one gets its alerts]
- worker-kill: --workers 2, kill -9 of one mid-ingest [the port keeps answering,
  a replacement within 10 s, every step stored once]

`--short` runs each case at a smaller size (CI: tests/test_server_edge_soak.py).
Run on a machine shared with other work: RSS is the server's own, times are
indicative only.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import msgpack
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:   # `tests.procs` from the clone
    sys.path.insert(0, str(ROOT))

from tests.procs import ServerProcess, answering_worker, child_pids, wait_for_workers  # noqa: E402

MIB = 1 << 20
TOKEN = "soak-write"


# ----- measuring -----

def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class RssWatch:
    """The summed RSS of a server and its children, sampled every 20 ms: start and peak."""

    def __init__(self, pid: int):
        self.pid = pid
        self.start = self.peak = self._now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _now(self) -> int:
        return rss_bytes(self.pid) + sum(rss_bytes(child) for child in child_pids(self.pid))

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._now())

    def stop(self) -> tuple[float, float]:
        self._stop.set()
        self._thread.join(5)
        return self.start / MIB, self.peak / MIB


class NormalClient:
    """Meanwhile: a small POST and a /healthz every 0.5 s (15 s timeout); served means every
    one answered 200; the column also gives the slowest pair."""

    def __init__(self, url: str, headers: dict | None = None):
        self.url = url
        self.headers = headers or {}
        self.tries = self.served = 0
        self.slowest = 0.0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        step = 0
        with httpx.Client(base_url=self.url, timeout=15, headers=self.headers) as client:
            while not self._stop.is_set():
                self.tries += 1
                began = time.perf_counter()
                try:
                    posted = client.post("/api/runs/soak-normal/steps",
                                         json={"step": [step], "pre_norm": [1.0 + step % 3]})
                    health = client.get("/healthz")
                    if posted.status_code == 200 and health.status_code == 200:
                        self.served += 1
                        self.slowest = max(self.slowest, time.perf_counter() - began)
                    else:
                        self.failures.append(f"{posted.status_code}/{health.status_code}")
                except httpx.HTTPError as error:
                    self.failures.append(type(error).__name__)
                step += 1
                self._stop.wait(0.5)

    def stop(self) -> str:
        self._stop.set()
        self._thread.join(30)
        if self.tries and self.served == self.tries:
            return f"yes ({self.served}/{self.tries}, <={self.slowest:.1f} s)"
        return f"NO ({self.served}/{self.tries}: {', '.join(self.failures[:3])})"


@dataclass
class Row:
    case: str
    right: bool
    detail: str
    rss_start: float = 0.0
    rss_peak: float = 0.0
    normal: str = ""
    extra: list[str] = field(default_factory=list)


def start(folder: Path, name: str, args: list[str]) -> ServerProcess:
    return ServerProcess(f"sqlite:///{folder / (name + '.db')}", extra_args=args,
                         log_path=folder / f"{name}.log").start(timeout=60)


def read_to_end(sock: socket.socket) -> bytes:
    answer = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except OSError:
            return answer
        if not chunk:
            return answer
        answer += chunk


def raw_handshake(port: int, path: str, headers: str = "") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                  f"{headers}\r\n").encode())
    return sock


def read_head(sock: socket.socket) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            break
        head += chunk
    return head


def frame_header(length: int) -> bytes:
    """A masked binary frame's header declaring `length` payload bytes (mask key zero)."""
    return bytes([0x82, 0x80 | 127]) + length.to_bytes(8, "big") + b"\0\0\0\0"


def typed(values: np.ndarray, tag: str) -> msgpack.ExtType:
    """A typed array of the binary wire (docs/wire.md): extension 1, an 8-byte dtype tag, the bytes."""
    return msgpack.ExtType(1, tag.encode().ljust(8, b"\0") + np.ascontiguousarray(values, dtype=tag).tobytes())


def msgpack_batch(steps: np.ndarray, values: np.ndarray) -> bytes:
    return msgpack.packb({"step": typed(steps, "<i8"), "pre_norm": typed(values, "<f8")})


# ----- the cases -----

def case_stalled_bodies(folder: Path, short: bool) -> Row:
    count = 10 if short else 50
    idle = 2.0 if short else 5.0
    server = start(folder, "bodies", ["--body-idle-timeout", str(idle), "--body-deadline", "60"])
    watch = RssWatch(server.process.pid)
    try:
        sockets = []
        for i in range(count):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=120)
            length = "Transfer-Encoding: chunked" if i % 2 else f"Content-Length: {32 * MIB}"
            sock.sendall(f"POST /api/runs/stalled-{i}/steps HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         f"Content-Type: application/msgpack\r\n{length}\r\n\r\n".encode()
                         + (b"1\r\n\x81\r\n" if i % 2 else b"\x81"))
            sockets.append(sock)
        normal = NormalClient(server.url)
        with httpx.Client(base_url=server.url, timeout=5) as client:
            posted = client.post("/api/runs/soak/steps", json={"step": [0, 1], "pre_norm": [1.0, 2.0]})
        agent = asyncio.run(ws_ack(server.ws_url, "soak-agent"))
        answers = [read_to_end(sock) for sock in sockets]
        for sock in sockets:
            sock.close()
        timed_out = sum(a.startswith(b"HTTP/1.1 408") and b"connection: close" in a.lower() for a in answers)
        served = normal.stop()
        right = posted.status_code == 200 and agent == "ack" and timed_out == count
        detail = f"POST {posted.status_code}, agent {agent}, {timed_out}/{count} stalled got 408 + close"
    finally:
        rss = watch.stop()
        server.stop()
    return Row(f"stalled-bodies ({count} x 32 MiB declared)", right, detail, *rss, served)


async def ws_ack(ws_url: str, run: str, token: str | None = None) -> str:
    import websockets

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with websockets.connect(f"{ws_url}/ws/ingest", additional_headers=headers) as ws:
            await ws.send(json.dumps({"type": "batch", "seq": 1, "run": run,
                                      "batch": {"step": [0], "pre_norm": [1.0]}}))
            reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
            return reply.get("type", "?")
    except Exception as error:  # noqa: BLE001 - reported in the table
        return type(error).__name__


def case_stalled_ws_frames(folder: Path, short: bool) -> Row:
    clients = 2 if short else 8
    declared = (4 if short else 32) * MIB
    sent = (3 if short else 30) * MIB
    server = start(folder, "frames", ["--token", TOKEN, "--ws-ping-interval", "1", "--ws-ping-timeout", "2"])
    watch = RssWatch(server.process.pid)
    normal = NormalClient(server.url, {"Authorization": f"Bearer {TOKEN}"})
    try:
        statuses = []
        for _ in range(clients):
            sock = raw_handshake(server.port, "/ws/ingest")
            head = read_head(sock)
            statuses.append(int(head.split(b" ", 2)[1]) if head else 0)
            try:   # try to send the frame anyway: the server has answered and closes
                sock.sendall(frame_header(declared) + b"\0" * sent)
            except OSError:
                pass
            sock.close()
        refused = sum(status == 401 for status in statuses)
        # a client with the token stalls mid-frame: the unanswered ping closes it
        sock = raw_handshake(server.port, "/ws/ingest", f"Authorization: Bearer {TOKEN}\r\n")
        head = read_head(sock)
        sock.sendall(frame_header(declared) + b"\0" * (sent // 4))
        sock.settimeout(60)
        closed = False
        try:   # the server's ping, then the end of the connection (or 60 s without either)
            while sock.recv(65536):
                pass
            closed = True
        except OSError as error:
            closed = not isinstance(error, TimeoutError)   # a reset is a close too
        sock.close()
        served = normal.stop()
        right = refused == clients and head.startswith(b"HTTP/1.1 101") and closed
        detail = (f"{refused}/{clients} refused 401 before a frame; a token holder stalled mid-frame "
                  f"was closed by the ping timeout")
    finally:
        rss = watch.stop()
        server.stop()
    return Row(f"stalled-ws-frames ({clients} x {declared // MIB} MiB)", right, detail, *rss, served)


def case_stalled_live_reader(folder: Path, short: bool) -> list[Row]:
    return [live_posts(folder, short, reader=True), live_posts(folder, short, reader=False)]


def live_posts(folder: Path, short: bool, reader: bool) -> Row:
    posts, steps = (4, 20_000) if short else (20, 100_000)
    server = start(folder, f"live-{reader}", [])
    watch = RssWatch(server.process.pid)
    normal = NormalClient(server.url)
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            client.post("/api/runs/live/steps", json={"step": [0], "pre_norm": [1.0]})
            head = b"HTTP/1.1 101 (no reader)"
            if reader:
                listener = raw_handshake(server.port, "/ws/live/live")
                head = read_head(listener)   # and never reads again
            codes = []
            rng = np.random.default_rng(0)
            for index in range(posts):
                first = 1 + index * steps
                body = msgpack_batch(np.arange(first, first + steps), rng.lognormal(size=steps))
                codes.append(client.post("/api/runs/live/steps", content=body,
                                         headers={"Content-Type": "application/msgpack"}).status_code)
            stored = client.get("/api/runs/live").json()["steps"]
        if reader:
            listener.close()
        served = normal.stop()
        right = head.startswith(b"HTTP/1.1 101") and codes == [200] * posts and stored == 1 + posts * steps
        detail = f"{codes.count(200)}/{posts} POSTs 200, {stored:,} steps stored"
    finally:
        rss = watch.stop()
        server.stop()
    name = "stalled-live-reader" if reader else "  the same POSTs, no reader (baseline)"
    row = Row(f"{name} ({posts} x {steps:,} steps)", right, detail, *rss, served)
    row.extra.append("goal <= +30 MB" if reader else "for comparison")
    return row


def tensor_body(names: int, steps: int) -> bytes:
    rng = np.random.default_rng(1)
    norms = rng.lognormal(size=(steps, names)).astype("<f4")
    return msgpack.packb({"step": typed(np.arange(steps), "<i8"), "pre_norm": typed(np.ones(steps), "<f8"),
                          "tensor_norms": {"names": [f"layers.{i}.w" for i in range(names)],
                                           "norms": typed(norms, "<f4")}})


def case_tensor_names(folder: Path, short: bool) -> list[Row]:
    rows = []
    for names, goal in ((2_000, "an answer") if short else (16_000, "an answer, <= +100 MB"),
                        (10_000, "a 4xx or an answer") if short else (100_000, "a 4xx or an answer")):
        server = start(folder, f"tensors-{names}", ["--max-body", str(64 * MIB)])
        try:
            with httpx.Client(base_url=server.url, timeout=300) as client:
                posted = client.post("/api/runs/wide/steps", content=tensor_body(names, 32),
                                     headers={"Content-Type": "application/msgpack"})
                watch = RssWatch(server.process.pid)
                normal = NormalClient(server.url)
                began = time.perf_counter()
                grouped = client.get("/api/runs/wide/tensors", params={"group": "block"})
                took = time.perf_counter() - began
                served = normal.stop()
                rss = watch.stop()
            ok = grouped.status_code == 200 or 400 <= grouped.status_code < 500
            detail = (f"POST {posted.status_code}; group=block {grouped.status_code} in {took:.2f} s"
                      + ("" if grouped.status_code == 200 else f": {grouped.text[:80]}"))
            row = Row(f"tensor-names ({names:,} x 32 steps)", ok and posted.status_code == 200, detail, *rss, served)
            row.extra.append(f"goal {goal}")
            rows.append(row)
        finally:
            server.stop()
    return rows


def case_growing_meta(folder: Path, short: bool) -> Row:
    messages = 40 if short else 300
    server = start(folder, "meta", [])
    watch = RssWatch(server.process.pid)
    normal = NormalClient(server.url)

    async def go():
        import websockets

        replies, ack_times = [], []
        async with websockets.connect(f"{server.ws_url}/ws/ingest", max_size=None) as ws:
            for index in range(messages):
                meta = {f"key-{index}-{j}": "x" * 1000 for j in range(60)}   # ~60 KiB of new keys
                began = time.perf_counter()
                await ws.send(json.dumps({"type": "batch", "seq": index, "run": "meta-run", "meta": meta,
                                          "batch": {"step": [index], "pre_norm": [1.0]}}))
                replies.append(json.loads(await ws.recv()))
                ack_times.append(time.perf_counter() - began)
        return replies, ack_times

    try:
        replies, ack_times = asyncio.run(go())
        with httpx.Client(base_url=server.url, timeout=60) as client:
            began = time.perf_counter()
            listed = client.get("/api/runs")
            list_time = time.perf_counter() - began
        served = normal.stop()
        refused = [r for r in replies if r.get("type") == "error"]
        statuses = sorted({r.get("status") for r in refused})
        right = bool(refused) and set(statuses) <= {413, 422} and listed.status_code == 200 \
            and all("MiB" in r.get("detail", "") or "bytes" in r.get("detail", "") for r in refused)
        detail = (f"{len(replies) - len(refused)} acked, {len(refused)} refused {statuses}; last ack "
                  f"{ack_times[-1] * 1000:.0f} ms; GET /api/runs {list_time * 1000:.0f} ms")
    finally:
        rss = watch.stop()
        server.stop()
    return Row(f"growing-meta ({messages} x 60 KiB)", right, detail, *rss, served)


class Receiver(http.server.BaseHTTPRequestHandler):
    """Webhook receivers: 'slow' answers a byte every 2 s, 'fail' answers 500, 'ok' 200."""

    posts: dict = {}

    def do_POST(self):  # noqa: N802 - http.server's name
        kind = self.path.strip("/")
        length = int(self.headers.get("Content-Length", 0))
        self.rfile.read(length)
        Receiver.posts[kind] = Receiver.posts.get(kind, 0) + 1
        if kind == "slow":
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n":
                try:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(2)
            return
        self.send_response(500 if kind == "fail" else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def case_webhooks(folder: Path, short: bool) -> Row:
    runs = 5 if short else 20
    wait_s = 40
    Receiver.posts = {}
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{receiver.server_address[1]}"
    server = start(folder, "hooks", ["--alert-webhook", f"{base}/slow", "--alert-webhook", f"{base}/fail",
                                     "--alert-webhook", f"{base}/ok"])
    watch = RssWatch(server.process.pid)
    normal = NormalClient(server.url)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for index in range(runs):   # one non-finite step per run: one alert each
                client.post(f"/api/runs/hook-{index}/steps",
                            json={"step": [0, 1], "pre_norm": [1.0, "NaN"]})
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and Receiver.posts.get("ok", 0) < runs:
            time.sleep(0.1)
        served = normal.stop()
        ok_posts = Receiver.posts.get("ok", 0)
        right = ok_posts >= runs
        detail = (f"healthy webhook got {ok_posts}/{runs} alerts within {wait_s} s; slow got "
                  f"{Receiver.posts.get('slow', 0)} posts, failing {Receiver.posts.get('fail', 0)}")
    finally:
        rss = watch.stop()
        server.stop()
        receiver.shutdown()
    return Row(f"webhooks (slow + failing + healthy, {runs} alerts)", right, detail, *rss, served)


def case_worker_kill(folder: Path, short: bool) -> Row:
    if not sys.platform.startswith("linux"):
        return Row("worker-kill", False, "skipped: per-worker sockets are Linux-only")
    steps = 4_000 if short else 20_000
    server = start(folder, "workers", ["--workers", "2"])
    pids = wait_for_workers(server, 2)
    watch = RssWatch(server.process.pid)
    normal = NormalClient(server.url)
    try:
        victim = min(pids)
        survivor = max(pids)
        answered = failed = 0
        up_after = None
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for first in range(0, steps, 200):
                if first == steps // 2:
                    os.kill(victim, signal.SIGKILL)
                    killed_at = time.monotonic()
                    while Path(f"/proc/{victim}").exists():   # reaped: all its threads gone, its socket closed
                        time.sleep(0.01)
                    for _ in range(20):
                        try:
                            answering_worker(server.port)
                            answered += 1
                        except OSError:
                            failed += 1
                body = {"step": list(range(first, first + 200)), "pre_norm": [1.0 + (s % 5) for s in
                                                                             range(first, first + 200)]}
                for _ in range(50):
                    try:
                        if client.post("/api/runs/kill/steps", json=body).status_code == 200:
                            break
                    except httpx.TransportError:
                        time.sleep(0.05)
            while up_after is None and time.monotonic() - killed_at < 60:
                children = child_pids(server.process.pid) - {victim, survivor}
                if children:
                    try:
                        if answering_worker(server.port) in children:
                            up_after = time.monotonic() - killed_at
                    except OSError:
                        pass
                time.sleep(0.02)
            run = client.get("/api/runs/kill").json()
            series = client.get("/api/runs/kill/series", params={"points": steps + 1}).json()
        served = normal.stop()
        once = run["steps"] == steps and series["step"] == list(range(steps))
        right = once and up_after is not None and up_after <= 10 and server.process.poll() is None
        detail = (f"{answered}/{answered + failed} /healthz on new connections right after the kill; "
                  f"replacement answering after {up_after if up_after is None else round(up_after, 1)} s; "
                  f"{run['steps']:,}/{steps:,} steps stored once")
    finally:
        rss = watch.stop()
        server.stop()
    return Row("worker-kill (kill -9 of 1 of 2)", right, detail, *rss, served)


CASES = {"stalled-bodies": case_stalled_bodies, "stalled-ws-frames": case_stalled_ws_frames,
         "stalled-live-reader": case_stalled_live_reader, "tensor-names": case_tensor_names,
         "growing-meta": case_growing_meta, "webhooks": case_webhooks, "worker-kill": case_worker_kill}


def print_table(rows: list[Row]) -> None:
    print(f"{'case':<44} {'right':<6} {'RSS start -> peak (MB)':<26} {'normal client served':<26} detail")
    for row in rows:
        rss = f"{row.rss_start:.0f} -> {row.rss_peak:.0f} (+{row.rss_peak - row.rss_start:.0f})"
        print(f"{row.case:<44} {'yes' if row.right else 'NO':<6} {rss:<26} {row.normal:<26} {row.detail}"
              + (f" [{'; '.join(row.extra)}]" if row.extra else ""), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--short", action="store_true", help="smaller sizes (CI)")
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="only these cases")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="gradwatch-soak-") as folder:
        for name in args.case or list(CASES):
            try:
                found = CASES[name](Path(folder), args.short)
            except Exception as error:  # noqa: BLE001 - a case that crashed is a row, not the end
                found = Row(name, False, f"the case failed: {type(error).__name__}: {error}"[:300])
            rows.extend(found if isinstance(found, list) else [found])
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps([row.__dict__ for row in rows], indent=1))
    return 0 if all(row.right for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

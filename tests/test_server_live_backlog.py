"""The live feed's backlog is bounded in bytes (issue 19, item 2): a `/ws/live` reader that
stops reading gets its backlog dropped and one `{"type": "resync", "run": ...}` message,
then new updates again; a reader that keeps up gets every update. Through a real server
and real WebSocket clients: the stalled one a raw socket (small receive buffer) driven by
websockets' own sans-I/O client protocol, so it reads exactly when the test says."""
from __future__ import annotations

import asyncio
import json
import socket
from contextlib import closing

import httpx
import numpy as np
import pytest
from websockets.client import ClientProtocol
from websockets.frames import Opcode
from websockets.http11 import Response
from websockets.sync.client import connect
from websockets.uri import parse_uri

from gradwatch.server.app.live import LiveHub, Subscriber, resync_message
from tests.test_server_support import start_server

QUEUE_BYTES = 64 * 1024
RUN = "live-backlog"


class RawReader:
    """A WebSocket client that reads from its socket only when asked."""

    def __init__(self, url: str):
        uri = parse_uri(url)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)   # the kernel holds little for us
        self.sock.settimeout(30)
        self.sock.connect((uri.host, uri.port))
        self.protocol = ClientProtocol(uri, max_size=None)
        self.protocol.send_request(self.protocol.connect())
        self._flush()
        self._parts: list[bytes] = []
        self.messages: list[dict] = []
        while not any(isinstance(event, Response) for event in self._read()):
            pass
        assert self.protocol.handshake_exc is None, self.protocol.handshake_exc

    def _flush(self) -> None:
        data = b"".join(self.protocol.data_to_send())
        if data:
            self.sock.sendall(data)

    def _read(self) -> list:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the live socket")
        self.protocol.receive_data(data)
        self._flush()   # pongs
        events = self.protocol.events_received()
        for event in events:
            if getattr(event, "opcode", None) in (Opcode.TEXT, Opcode.CONT):
                self._parts.append(event.data)
                if event.fin:
                    self.messages.append(json.loads(b"".join(self._parts)))
                    self._parts = []
        return events

    def next_message(self) -> dict:
        while not self.messages:
            self._read()
        return self.messages.pop(0)

    def close(self) -> None:
        self.sock.close()


def post_steps(client: httpx.Client, steps: np.ndarray) -> None:
    body = {"step": steps.tolist(), "pre_norm": np.linspace(1.0, 2.0, len(steps)).tolist()}
    answer = client.post(f"/api/runs/{RUN}/steps", json=body)
    assert answer.status_code == 200 and answer.json()["accepted"] == len(steps), answer.text


@pytest.fixture()
def server(tmp_path):
    process = start_server(f"sqlite:///{tmp_path / 'live.db'}", tmp_path,
                           ["--live-queue-bytes", str(QUEUE_BYTES)])
    yield process
    process.stop()


def test_a_stalled_live_reader_gets_one_resync_then_new_updates(server):
    batches = [np.arange(1000 + i * 20_000, 1000 + (i + 1) * 20_000) for i in range(24)]  # ~0.6 MB each
    with httpx.Client(base_url=server.url, timeout=60) as client:
        post_steps(client, np.arange(0, 10))
        # `since` replays what is stored; the socket subscribed before that replay was read
        stalled = RawReader(f"{server.ws_url}/ws/live/{RUN}?since=-1")
        with closing(stalled), connect(f"{server.ws_url}/ws/live/{RUN}?since=-1", max_size=None, compression=None,
                     open_timeout=30) as healthy:
            assert stalled.next_message()["data"]["step"] == list(range(10))
            assert json.loads(healthy.recv(timeout=30))["data"]["step"] == list(range(10))
            for steps in batches:        # the stalled reader reads nothing meanwhile
                post_steps(client, steps)
                update = json.loads(healthy.recv(timeout=30))
                assert update == {"type": "points", "run": RUN, "data": update["data"]}
                assert update["data"]["step"] == steps.tolist()    # the reader that keeps up gets all

            before_resync = []
            while (message := stalled.next_message())["type"] != "resync":
                assert message["type"] == "points"
                before_resync.append(message["data"]["step"])
            assert message == {"type": "resync", "run": RUN}           # exactly this shape
            kept = len(before_resync)
            assert 1 <= kept < len(batches), kept                     # a backlog was dropped
            assert before_resync == [steps.tolist() for steps in batches[:kept]]   # in order, whole
            assert not stalled.messages                               # nothing after the resync

            fresh = np.arange(10_000_000, 10_000_003)
            post_steps(client, fresh)                                 # after the resync: updates again
            assert stalled.next_message() == {"type": "points", "run": RUN, "data": points_data(fresh)}
            assert json.loads(healthy.recv(timeout=30))["data"]["step"] == fresh.tolist()


def points_data(steps: np.ndarray) -> dict:
    """The `data` a points message of `steps` (posted by `post_steps`) carries."""
    return {"step": steps.tolist(), "pre_norm": np.linspace(1.0, 2.0, len(steps)).tolist(),
            "post_norm": [None] * len(steps), "threshold": [None] * len(steps),
            "clipped": [None] * len(steps), "loss": [None] * len(steps),
            "spike": [None] * len(steps), "nonfinite": [None] * len(steps)}


def test_subscriber_backlog_is_bounded_in_bytes_and_resyncs_once():
    """The queue rule on its own: bytes, not messages; an overflow drops the backlog and the
    message for one resync; messages before the resync is taken are dropped too; a reader
    waiting with nothing queued takes a message of any size."""

    async def scenario() -> list[bytes]:
        hub = LiveHub()
        subscriber = hub.subscribe("r", max_bytes=100)
        assert isinstance(subscriber, Subscriber) and hub.has_subscribers("r")
        got: list[bytes] = []
        hub.publish("r", {"n": 1})                  # encoded once: b'{"n":1}'
        hub.publish("r", b"x" * 80)
        assert subscriber.queued_bytes == 7 + 80
        hub.publish("r", b"y" * 20)                  # 107 > 100: backlog dropped, one resync
        assert subscriber.resyncs == 1 and subscriber.dropped == 3
        hub.publish("r", b"z")                       # resync not taken yet: dropped as well
        got.append(await subscriber.get())           # the resync
        hub.publish("r", b"w" * 10)
        got.append(await subscriber.get())
        waiter = asyncio.ensure_future(subscriber.get())
        await asyncio.sleep(0)                       # the reader waits with nothing queued
        hub.publish("r", b"big" * 100)               # 300 bytes > 100: still taken whole
        got.append(await waiter)
        assert subscriber.queued_bytes == 0 and subscriber.dropped == 4
        hub.unsubscribe("r", subscriber)
        assert not hub.has_subscribers("r")
        return got

    assert asyncio.run(scenario()) == [resync_message("r"), b"w" * 10, b"big" * 100]
    assert json.loads(resync_message("r")) == {"type": "resync", "run": "r"}

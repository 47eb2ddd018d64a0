"""The live chart draws only what happened (real server, real WebSockets, real Chromium):
steps stored between the page's first /series read and its live subscription are drawn (the
socket asks `since=` the first read's last step), late steps (below the last drawn one) are
merged in step order instead of dropped, and a `resync` message makes the page read the run
again, so points the server dropped from a lagging socket's backlog are drawn too."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from tests.procs import ServerProcess
from tests.test_dashboard import browser, page  # noqa: F401  (fixtures)
from tests.test_dashboard_support import post_steps, wait_until

RUN = "live-gap"


def norm(step: int) -> float:
    return 1.0 + 0.25 * np.sin(step / 7.0)


def batch(steps) -> dict:
    steps = list(steps)
    return {"step": steps, "pre_norm": [norm(s) for s in steps], "loss": [2.0 - s / 1000 for s in steps]}


@pytest.fixture
def server(tmp_path):
    with ServerProcess(f"sqlite:///{tmp_path / 'gradwatch.db'}", log_path=tmp_path / "server.log") as process:
        yield process


def drawn(page) -> tuple[list, list]:
    trace = page.evaluate("""(() => { const t = document.getElementById('norm-chart').data
        .find((t) => t.name === 'pre-clip norm'); return [t.x, t.y]; })()""")
    return trace[0], trace[1]


def test_steps_stored_before_the_subscription_and_late_steps_are_drawn_in_order(page, server, output_dir):  # noqa: F811
    # Steps may skip: 200-239 are not there yet (they come late), which is no gap to bridge.
    post_steps(server.url, RUN, batch([*range(0, 200), *range(240, 300)]))
    reads = []

    def store_between_read_and_subscription(route):
        response = route.fetch()  # the server has read the series ...
        if not reads:
            post_steps(server.url, RUN, batch(range(300, 330)))  # ... these arrive before the socket
        reads.append(route.request.url)
        route.fulfill(response=response)

    page.route(re.compile(r".*/api/runs/live-gap/series.*"), store_between_read_and_subscription)
    page.goto(f"{server.url}/?run={RUN}")
    wait_until(page, "window.gradwatch && window.gradwatch.live === 'live'", what="the live feed")
    assert any("since=299" in url for url in page.recorded.websockets), page.recorded.websockets
    wait_until(page, "document.getElementById('norm-chart').data && document.getElementById('norm-chart')"
                     ".data[0].x.length === 290", what="steps 300-329 drawn from the since= replay")

    post_steps(server.url, RUN, batch(range(200, 240)))  # late: below the last drawn step
    post_steps(server.url, RUN, batch(range(330, 340)))
    wait_until(page, "document.getElementById('norm-chart').data[0].x.length === 340", what="every step drawn")
    x, y = drawn(page)
    assert x == list(range(340))  # in step order: nothing bridged, nothing dropped
    assert y == pytest.approx([norm(s) for s in range(340)], rel=1e-12)
    assert len(reads) == 1  # drawn from the live feed, not from a second read
    page.screenshot(path=str(output_dir / "dashboard-live-no-gap.png"))
    assert not page.recorded.page_errors and not page.recorded.console_errors


def test_a_resync_message_rereads_the_run_and_draws_what_the_socket_lost(page, server):  # noqa: F811
    post_steps(server.url, RUN, batch(range(0, 100)))
    state = {"drop": False, "dropped": 0, "socket": None}

    def relay(socket):
        upstream = socket.connect_to_server()

        def from_server(message):
            if state["drop"] and '"points"' in str(message):
                state["dropped"] += 1  # a backlog the server dropped for a lagging reader
                return
            socket.send(message)

        upstream.on_message(from_server)
        socket.on_message(lambda message: upstream.send(message))
        state["socket"] = socket

    page.route_web_socket(re.compile(r".*/ws/live/.*"), relay)
    page.goto(f"{server.url}/?run={RUN}")
    wait_until(page, "window.gradwatch && window.gradwatch.live === 'live'", what="the live feed")
    wait_until(page, "document.getElementById('norm-chart').data[0].x.length === 100")
    state["drop"] = True
    post_steps(server.url, RUN, batch(range(100, 150)))
    wait_until(page, "true && window.gradwatch.live", what="a pump of the relay")
    for _ in range(200):
        if state["dropped"]:
            break
        page.wait_for_timeout(25)
    assert state["dropped"] >= 1 and drawn(page)[0] == list(range(100))  # the page missed them
    state["drop"] = False
    state["socket"].send(json.dumps({"type": "resync", "run": RUN}))
    wait_until(page, "document.getElementById('norm-chart').data[0].x.length === 150", what="the re-read")
    assert drawn(page)[0] == list(range(150))
    assert page.evaluate("window.gradwatch.resyncs") == 1

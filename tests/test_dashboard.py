"""The dashboard in real headless Chromium against a real `gradwatch serve` (SQLite in tmp).

Data goes in over HTTP (`POST /api/runs/{run}/steps`, columnar batches); the
page is read back through Plotly's own `gd.data`, the DOM, and the requests it
made. The page is served with the server's CSP, which stays on: Playwright's
`wait_for_function` would need `unsafe-eval`, so waits poll `page.evaluate`.
"""
from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest

from gradwatch.dashboard import STATIC_DIR
from tests.procs import ServerProcess
from tests.test_dashboard_support import (SPIKY_TENSOR, get_json, launch_chromium, post_steps,
                                          synthetic_batch, wait_until)

MAIN_RUN = "tiny-gpt"
MAIN_STEPS = 1500
OTHER_RUN = "other-run"
EVIL_RUN = '<img src=x onerror="window.__pwned=1">'
CSP_RECORDER = """
window.__csp = [];
document.addEventListener('securitypolicyviolation',
  (e) => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dashboard")
    with ServerProcess(f"sqlite:///{folder / 'gradwatch.db'}", log_path=folder / "server.log") as process:
        evil_batch, _ = synthetic_batch(0, 50, seed=3, tensors=False)
        post_steps(process.url, EVIL_RUN, evil_batch)
        other_batch, _ = synthetic_batch(0, 800, seed=2, tensors=False)
        post_steps(process.url, OTHER_RUN, other_batch)
        main_batch, main_run = synthetic_batch(0, MAIN_STEPS, seed=1)
        post_steps(process.url, MAIN_RUN, main_batch)  # posted last: the most recently updated run
        process.main_run = main_run
        yield process


@pytest.fixture(scope="module")
def browser(chromium_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright, chromium_path)
        yield browser
        browser.close()


class Recorded:
    def __init__(self):
        self.requests: list[str] = []
        self.websockets: list[str] = []
        self.console_errors: list[str] = []
        self.page_errors: list[str] = []


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1500, "height": 1300})
    page = context.new_page()
    recorded = Recorded()
    page.on("request", lambda request: recorded.requests.append(request.url))
    page.on("websocket", lambda socket: recorded.websockets.append(socket.url))
    page.on("console", lambda message: recorded.console_errors.append(message.text)
            if message.type == "error" else None)
    page.on("pageerror", lambda error: recorded.page_errors.append(str(error)))
    page.add_init_script(CSP_RECORDER)
    page.recorded = recorded
    yield page
    context.close()


def open_run(page, server, run: str | None = None):
    address = server.url + "/" + (f"?run={urllib.parse.quote(run, safe='')}" if run else "")
    page.goto(address)
    wait_until(page, "window.gradwatch && window.gradwatch.firstNormChartMs !== null", what="the norm chart")


def norm_traces(page) -> dict:
    return page.evaluate("""Object.fromEntries(document.getElementById('norm-chart').data
        .map((t) => [t.name, {x: t.x, y: t.y, yaxis: t.yaxis || 'y'}]))""")


def test_run_page_draws_norm_chart_and_histogram_from_the_api(page, server, output_dir):
    expected = server.main_run
    open_run(page, server, MAIN_RUN)
    wait_until(page, "window.gradwatch.renders.histogram > 0 && window.gradwatch.renders.heatmap > 0",
               what="histogram and heatmap")
    traces = norm_traces(page)
    assert {"pre-clip norm", "clip threshold", "clipped", "spike", "loss", "non-finite"} <= set(traces)

    norm = traces["pre-clip norm"]
    assert norm["x"] == expected.steps.tolist()  # fewer steps than points: every step, unchanged
    shown = np.array([np.nan if v is None else v for v in norm["y"]])
    np.testing.assert_allclose(shown, expected.pre_norm, rtol=1e-6)  # NaN where NaN: a gap
    assert traces["loss"]["yaxis"] == "y2"
    assert traces["spike"]["x"] == expected.spike_steps
    nonfinite_x = {x for x in traces["non-finite"]["x"] if x is not None}
    assert nonfinite_x == set(expected.nonfinite_steps) and nonfinite_x
    assert set(traces["clipped"]["x"]) - {None} == {int(s) for s, v in zip(expected.steps, expected.pre_norm)
                                           if np.isfinite(v) and v > expected.threshold}

    histogram = page.evaluate("document.getElementById('histogram').data[0].meta.counts")
    assert sum(histogram) == len(expected.finite_norms)
    recommended = float(page.text_content("#rec-threshold"))
    # The robust rule on the default window (the last 500 steps), spikes and NaN left out:
    # exp(median + 3·1.4826·MAD) of the log norms, within 1-10x the median norm.
    window_steps, window_norms = expected.steps[-500:], expected.pre_norm[-500:]
    clean = window_norms[np.isfinite(window_norms) & ~np.isin(window_steps, expected.spike_steps)]
    logs = np.log(clean)
    tau = np.exp(np.median(logs) + 3 * 1.4826 * np.median(np.abs(logs - np.median(logs))))
    tau = min(max(tau, np.median(clean)), 10 * np.median(clean))
    assert recommended == pytest.approx(tau, rel=5e-3)
    assert page.text_content("#rec-rationale").strip()
    # The raw clip rate over the window the server used (its default: 10% of the run, at least
    # 500 steps), the non-finite steps left out; the clean rate beside it, labelled.
    window_finite = window_norms[np.isfinite(window_norms)]
    rate_text = page.text_content("#rec-rate")
    assert f"of the {len(window_finite)} finite steps 1,000–1,499" in rate_text and "clean steps" in rate_text
    assert float(page.get_attribute("#rec-rate", "data-clip-rate")) == np.mean(window_finite > tau) or \
        float(page.get_attribute("#rec-rate", "data-clip-rate")) == pytest.approx(np.mean(window_finite > recommended), abs=2e-3)
    assert page.evaluate("document.querySelectorAll('#event-rows tr').length") > 0
    assert page.get_attribute("#export-csv", "href") == f"/api/runs/{MAIN_RUN}/export.csv"

    # The live indicator says so once the socket is open.
    wait_until(page, "document.getElementById('live-indicator').dataset.state === 'live'")
    assert page.text_content("#live-text") == "live"
    page.screenshot(path=str(output_dir / "dashboard-run-page.png"), full_page=True)
    assert not page.recorded.console_errors and not page.recorded.page_errors


def test_page_opens_the_most_recently_updated_run_and_lists_every_run(page, server):
    runs = get_json(server.url, "/api/runs")
    newest = max(runs, key=lambda run: run["updated"])["name"]  # MAIN_RUN unless other tests posted since
    open_run(page, server)
    assert page.text_content("#run-title") == newest
    rows = page.evaluate("""[...document.querySelectorAll('#run-rows tr')].map((tr) =>
        [...tr.querySelectorAll('td')].slice(1).map((td) => td.textContent))""")
    by_name = {row[0]: row for row in rows}
    assert set(by_name) == {run["name"] for run in runs} >= {MAIN_RUN, OTHER_RUN, EVIL_RUN}
    assert by_name[MAIN_RUN][1] == f"{MAIN_STEPS:,}" and by_name[MAIN_RUN][2] == f"{MAIN_STEPS - 1:,}"
    assert by_name[OTHER_RUN][1] == "800"
    assert by_name[MAIN_RUN][4].endswith("%")  # clip rate
    assert by_name[MAIN_RUN][5].startswith(str(len(server.main_run.spike_steps)))


def test_points_posted_after_load_appear_without_reload(page, server):
    run = "live-run"
    batch, _ = synthetic_batch(0, 200, seed=5, tensors=False)
    post_steps(server.url, run, batch)
    open_run(page, server, run)
    wait_until(page, "window.gradwatch.live === 'live'", what="the live socket")
    page.evaluate("window.__before = performance.timeOrigin")
    latencies = []
    for start in (200, 230, 260):
        new_batch, _ = synthetic_batch(start, 30, seed=5, tensors=False)
        post_steps(server.url, run, new_batch)  # stored when this returns
        stored = time.monotonic()
        wait_until(page, f"Math.max(...document.getElementById('norm-chart').data[0].x) === {start + 29}",
                   timeout=5, what=f"step {start + 29} on the chart")
        latencies.append(time.monotonic() - stored)
    assert page.evaluate("window.__before") == page.evaluate("performance.timeOrigin")  # no reload
    assert page.evaluate("document.getElementById('norm-chart').data[0].x.length") == 290
    # Latency is measured by benchmarks/dashboard_bench.py, not asserted here (shared, noisy machine).
    print(f"live points appeared {', '.join(f'{latency * 1000:.0f} ms' for latency in latencies)} after commit")


def test_a_run_opened_before_it_exists_appears_when_its_first_points_arrive(page, server):
    run = "not-yet-started"
    page.goto(f"{server.url}/?run={run}")
    wait_until(page, "!document.getElementById('error-banner').hidden", what="the unknown-run message")
    banner = page.text_content("#error-banner")
    assert run in banner and " · " not in banner  # one message, not one per panel
    wait_until(page, "window.gradwatch.live === 'live'")
    batch, _ = synthetic_batch(0, 50, seed=13, tensors=False)
    post_steps(server.url, run, batch)
    wait_until(page, "window.gradwatch.firstNormChartMs !== null && "
               "document.getElementById('norm-chart').data[0].x.length === 50", what="the new run's points")
    wait_until(page, "document.getElementById('error-banner').hidden", what="the message to go")
    assert not page.recorded.page_errors


@pytest.mark.slow
def test_live_feed_reconnects_after_a_server_restart(browser, tmp_path):
    run = "restart-run"
    context = browser.new_context(viewport={"width": 1300, "height": 900})
    page = context.new_page()
    with ServerProcess(f"sqlite:///{tmp_path / 'restart.db'}") as process:
        batch, _ = synthetic_batch(0, 100, seed=7, tensors=False)
        post_steps(process.url, run, batch)
        open_run(page, process, run)
        wait_until(page, "window.gradwatch.live === 'live'", what="the live socket")
        process.kill()
        wait_until(page, "document.getElementById('live-indicator').dataset.state === 'disconnected'",
                   timeout=5, what="the disconnected indicator")
        assert page.text_content("#live-text").startswith("disconnected")
        batch, _ = synthetic_batch(100, 20, seed=7, tensors=False)
        process.start()
        post_steps(process.url, run, batch)  # stored while the page was away
        wait_until(page, "window.gradwatch.live === 'live'", timeout=20, what="the reconnect")
        batch, _ = synthetic_batch(120, 20, seed=7, tensors=False)
        post_steps(process.url, run, batch)
        wait_until(page, "document.getElementById('norm-chart').data[0].x.length === 140", timeout=5,
                   what="the points missed while disconnected and those sent after")
        assert page.evaluate("document.getElementById('norm-chart').data[0].x") == list(range(140))
    context.close()


def test_run_name_with_markup_is_shown_as_text_and_runs_nothing(page, server):
    open_run(page, server, EVIL_RUN)
    wait_until(page, "window.gradwatch.renders.histogram > 0")
    assert page.text_content("#run-title") == EVIL_RUN
    links = page.evaluate("[...document.querySelectorAll('#run-rows a')].map((a) => a.textContent)")
    assert EVIL_RUN in links
    # Overlay it on another run: its name becomes a Plotly legend entry, still text.
    open_run(page, server, OTHER_RUN)
    page.check(f"#run-rows input[aria-label='overlay {EVIL_RUN}']")
    wait_until(page, "document.getElementById('norm-chart').data.some((t) => t.meta && t.meta.overlay)")
    legend = page.evaluate("[...document.querySelectorAll('#norm-chart .legendtext')].map((t) => t.textContent)")
    assert EVIL_RUN in legend
    time.sleep(0.3)
    assert page.evaluate("window.__pwned") is None
    assert page.evaluate("document.querySelectorAll('img').length") == 0
    assert not page.recorded.console_errors and not page.recorded.page_errors


def test_page_requests_nothing_outside_the_server(page, server):
    open_run(page, server, MAIN_RUN)
    wait_until(page, "window.gradwatch.renders.histogram > 0 && window.gradwatch.live === 'live'")
    page.click("#event-rows tr:first-child")
    wait_until(page, "window.gradwatch.renders.contributions > 0")
    page.check(f"#run-rows input[aria-label='overlay {OTHER_RUN}']")
    page.fill("#whatif-input", "2.5")
    wait_until(page, "window.gradwatch.whatif && window.gradwatch.whatif.threshold === 2.5")
    origin = server.url + "/"
    outside = [url for url in page.recorded.requests if not url.startswith(origin)]
    assert not outside, outside
    assert page.recorded.requests and page.recorded.websockets
    assert all(url.startswith(server.ws_url + "/ws/live/") for url in page.recorded.websockets)


def test_first_chart_takes_one_early_series_request_and_the_versioned_bundle(page, server):
    """boot.js asks for the series before the other modules have loaded; panel-norm.js takes
    that answer (one request, not two), and the run list is asked for after the first chart."""
    open_run(page, server, MAIN_RUN)
    wait_until(page, "window.gradwatch.renders.histogram > 0 && document.querySelectorAll('#run-rows tr').length > 0")
    requests = page.recorded.requests
    series = [index for index, url in enumerate(requests) if f"/api/runs/{MAIN_RUN}/series" in url]
    assert len(series) == 1 and page.evaluate("window.gradwatch.marks.earlySeries") is not None
    assert series[0] < min(index for index, url in enumerate(requests) if url.endswith("/api/runs"))
    version = json.loads((STATIC_DIR / "plotly-cartesian.json").read_text())["version"]
    assert {url for url in requests if "plotly" in url} == {f"{server.url}/static/plotly-cartesian.min.js?v={version}"}
    assert not page.recorded.console_errors and not page.recorded.page_errors


def test_versioned_bundle_is_kept_for_a_year_and_other_files_revalidated(server):
    version = json.loads((STATIC_DIR / "plotly-cartesian.json").read_text())["version"]
    for text in ((STATIC_DIR / "boot.js").read_text(), (STATIC_DIR / "index.html").read_text()):
        assert f"/static/plotly-cartesian.min.js?v={version}" in text  # the URL names the shipped version

    def cache_control(path: str) -> str:
        request = urllib.request.Request(server.url + path, headers={"Accept-Encoding": "gzip"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            answer.read()
            return answer.headers["Cache-Control"]

    assert cache_control(f"/static/plotly-cartesian.min.js?v={version}") == "public, max-age=31536000, immutable"
    assert cache_control("/static/plotly-cartesian.min.js?v=0.0.1") == "no-cache"  # not this version
    assert cache_control("/static/plotly-cartesian.min.js") == "no-cache"
    assert cache_control("/static/boot.js") == "no-cache"


def test_whatif_control_shows_the_clip_rate_of_the_chosen_threshold(page, server):
    finite = server.main_run.finite_norms
    last500 = server.main_run.pre_norm[-500:]
    window_finite = last500[np.isfinite(last500)]  # the recommendation's default window, finite steps
    open_run(page, server, MAIN_RUN)
    wait_until(page, "window.gradwatch.whatif !== null", what="the first what-if answer")
    for threshold in (1.5, 3.0, 40.0):
        page.fill("#whatif-input", str(threshold))
        wait_until(page, f"document.getElementById('whatif-output').dataset.threshold === '{threshold:g}'")
        shown = float(page.get_attribute("#whatif-output", "data-clip-rate"))
        assert shown == np.mean(window_finite > threshold)  # over the recommendation's window ...
        text = page.text_content("#whatif-output")
        assert "%" in text and "steps 1,000–1,499" in text and "recommendation's window" in text

    # ... or over the whole run, when asked.
    page.select_option("#whatif-over", "run")
    wait_until(page, "document.getElementById('whatif-output').dataset.over === 'run'")
    assert float(page.get_attribute("#whatif-output", "data-clip-rate")) == pytest.approx(np.mean(finite > 40.0), abs=1e-12)
    assert "whole run" in page.text_content("#whatif-output")
    for threshold in (1.5, 3.0):
        page.fill("#whatif-input", str(threshold))
        wait_until(page, f"document.getElementById('whatif-output').dataset.threshold === '{threshold:g}'")
        shown = float(page.get_attribute("#whatif-output", "data-clip-rate"))
        assert shown == pytest.approx(np.mean(finite > threshold), abs=1e-12)

    # The slider moves the threshold too.
    page.fill("#whatif-range", "100")
    wait_until(page, "window.gradwatch.whatif && window.gradwatch.whatif.threshold < 1.5")
    threshold = page.evaluate("window.gradwatch.whatif.threshold")  # exact; the input shows it rounded
    shown = page.evaluate("Number(document.getElementById('whatif-input').value)")
    assert shown == pytest.approx(threshold, rel=1e-3)
    assert page.evaluate("window.gradwatch.whatif.clip_rate") == pytest.approx(np.mean(finite > threshold))

    # A window of the last 1,000 steps changes the population (the recommendation's window).
    page.select_option("#whatif-over", "window")
    page.select_option("#window-select", "1000")
    page.fill("#whatif-input", "1.2")
    last = server.main_run.pre_norm[-1000:]
    wait_until(page, "window.gradwatch.whatif.threshold === 1.2")
    wait_until(page, f"window.gradwatch.whatif.count === {int(np.isfinite(last).sum())}")
    assert page.evaluate("window.gradwatch.whatif.clip_rate") == pytest.approx(
        np.mean(last[np.isfinite(last)] > 1.2))


def test_spike_event_shows_the_tensor_that_caused_it(page, server):
    open_run(page, server, MAIN_RUN)
    page.select_option("#event-kind", "spike")
    wait_until(page, "document.querySelector('#event-rows tr .kind-spike') !== null")
    spike_step = max(server.main_run.spike_steps)
    page.click(f"#event-rows tr[data-step='{spike_step}']")
    wait_until(page, "window.gradwatch.renders.contributions > 0", what="the contributions chart")
    bars = page.evaluate("document.getElementById('contributions').data[0]")
    assert bars["y"][-1] == SPIKY_TENSOR  # largest bar is drawn last (top)
    assert bars["x"][-1] > 10  # about 40x its usual norm
    # The chart jumped there and fetched that range at full resolution.
    wait_until(page, f"""(() => {{ const x = document.getElementById('norm-chart').data[0].x;
        return x.length > 0 && x[0] >= {spike_step} - 2100 && x.includes({spike_step}); }})()""")
    view = page.evaluate("document.getElementById('norm-chart').layout.xaxis.range")
    assert view[0] <= spike_step <= view[1] and view[1] - view[0] < MAIN_STEPS


def test_overlaying_runs_adds_their_norm_curves(page, server):
    open_run(page, server, MAIN_RUN)
    page.check(f"#run-rows input[aria-label='overlay {OTHER_RUN}']")
    wait_until(page, f"document.getElementById('norm-chart').data.some((t) => t.name === '{OTHER_RUN}')")
    other = [t for t in page.evaluate("document.getElementById('norm-chart').data.map((t) => ({name: t.name, n: t.x.length}))")
             if t["name"] == OTHER_RUN]
    assert other[0]["n"] == 800
    page.uncheck(f"#run-rows input[aria-label='overlay {OTHER_RUN}']")
    wait_until(page, f"!document.getElementById('norm-chart').data.some((t) => t.name === '{OTHER_RUN}')")


def test_interactions_raise_no_console_errors_or_csp_violations(page, server):
    open_run(page, server, MAIN_RUN)
    wait_until(page, "window.gradwatch.renders.histogram > 0 && window.gradwatch.live === 'live'")
    page.select_option("#y-scale", "log")
    wait_until(page, "document.getElementById('norm-chart').layout.yaxis.type === 'log'")
    # Zoom like a drag would: Plotly emits plotly_relayout and the page fetches that range.
    page.evaluate("Plotly.relayout('norm-chart', {'xaxis.range': [100, 300]})")
    wait_until(page, """(() => { const x = document.getElementById('norm-chart').data[0].x;
        return x[0] >= 100 && x[x.length - 1] <= 300 && x.length === 201; })()""", what="the zoomed fetch")
    page.click("#reset-zoom")
    wait_until(page, f"document.getElementById('norm-chart').data[0].x.length === {MAIN_STEPS}")
    page.click("#event-rows tr:first-child")
    page.select_option("#contrib-by", "norm")
    page.select_option("#window-select", "custom")
    page.fill("#window-custom", "500")
    page.dispatch_event("#window-custom", "change")
    wait_until(page, "window.gradwatch.whatif && window.gradwatch.whatif.count <= 500")
    time.sleep(0.5)
    assert page.evaluate("window.__csp") == []
    assert not page.recorded.console_errors, page.recorded.console_errors
    assert not page.recorded.page_errors, page.recorded.page_errors


def test_read_token_is_asked_for_kept_and_sent(browser, tmp_path):
    token = "read-secret"
    context = browser.new_context(viewport={"width": 1300, "height": 900})
    page = context.new_page()
    sent = []
    page.on("request", lambda request: sent.append((request.url, request.headers.get("authorization"))))
    sockets = []
    page.on("websocket", lambda socket: sockets.append(socket.url))
    with ServerProcess(f"sqlite:///{tmp_path / 'token.db'}", extra_args=["--read-token", token]) as process:
        batch, _ = synthetic_batch(0, 100, seed=9, tensors=False)
        post_steps(process.url, "guarded", batch)
        page.goto(process.url + "/?run=guarded")
        wait_until(page, "document.getElementById('token-dialog').open", what="the token prompt")
        page.fill("#token-input", token)
        page.click("#token-submit")
        wait_until(page, "window.gradwatch.firstNormChartMs !== null", what="the chart after the token")
        wait_until(page, "window.gradwatch.live === 'live'", what="the live socket with the token")
        assert page.evaluate("sessionStorage.getItem('gradwatch.readToken')") == token
        api_after = [auth for url, auth in sent if "/api/" in url][-5:]
        assert api_after and all(auth == f"Bearer {token}" for auth in api_after)
        assert any(f"token={token}" in url for url in sockets)
        # A reload in the same tab keeps the token: no prompt.
        page.reload()
        wait_until(page, "window.gradwatch && window.gradwatch.firstNormChartMs !== null")
        assert not page.evaluate("document.getElementById('token-dialog').open")
    context.close()


def test_dashboard_sources_have_no_inline_script_and_never_parse_html():
    from html.parser import HTMLParser

    from gradwatch.dashboard import STATIC_DIR

    class Checker(HTMLParser):
        problems: list[str] = []

        def handle_starttag(self, tag, attrs):
            names = dict(attrs)
            if tag == "script" and not names.get("src"):
                self.problems.append("inline <script>")
            self.problems += [f"<{tag} {name}=...>" for name in names if name.startswith("on")]

        def handle_data(self, data):
            if self.lasttag == "script" and data.strip():
                self.problems.append("script text")

    checker = Checker()
    checker.feed((STATIC_DIR / "index.html").read_text(encoding="utf-8"))
    assert checker.problems == []
    sources = [path for path in sorted(STATIC_DIR.glob("*.js")) if not path.name.endswith(".min.js")]
    assert len(sources) >= 12  # app.js, the panels, charts.js, ...: the vendored plotly bundle aside
    for source in sources:
        text = source.read_text(encoding="utf-8")
        for forbidden in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                          "new Function"):
            assert forbidden not in text, f"{source.name} uses {forbidden}"
        assert text.lstrip().startswith("//") and "'use strict';" in text

"""`gradwatch report RUN -o FILE`: one offline HTML file from a real server's REST API."""
from __future__ import annotations

import re
import time
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.procs import ServerProcess, free_port
from tests.test_dashboard_support import launch_chromium, post_steps, synthetic_batch
from tests.test_demo import dashboard_rate

RUN = 'report <run> & "quotes"'


def plotly_js_header() -> str:
    """The first line that names the embedded plotly.js bundle (the shipped cartesian one)."""
    from gradwatch.dashboard import plotly_bundle_path

    return re.search(r"plotly\.js[^\n]* v[0-9.]+", plotly_bundle_path().read_text(encoding="utf-8")[:500]).group(0)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    with ServerProcess(f"sqlite:///{folder / 'gradwatch.db'}", log_path=folder / "server.log") as process:
        batch, run = synthetic_batch(0, 1200, seed=11)
        post_steps(process.url, RUN, batch)
        process.run = run
        yield process


def report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gradwatch.server.commands.cli", "report", *args],
                          capture_output=True, text=True, timeout=120)


def drawn_report(page, path: Path) -> dict:
    """Open the report file and read back what the dashboard's chart code drew: {chart id: gd.data}."""
    page.goto(path.as_uri())
    deadline = time.monotonic() + 30
    while page.evaluate("window.gradwatchReport === undefined ? null : 1") is None:
        assert time.monotonic() < deadline, "the report's charts were not drawn"
        time.sleep(0.05)
    page.evaluate("window.gradwatchReport")  # awaits every Plotly.newPlot
    return page.evaluate("""Object.fromEntries([...document.querySelectorAll('.js-plotly-plot')]
        .map((gd) => [gd.id, gd.data.map((t) => ({name: t.name, type: t.type, x: t.x, y: t.y}))]))""")


def test_report_writes_one_offline_file_with_plotly_and_the_run_data(server, tmp_path, output_dir, chromium_path):
    from playwright.sync_api import sync_playwright

    target = tmp_path / "out" / "report.html"
    done = report(RUN, "-o", str(target), "--url", server.url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(target)
    document = target.read_text(encoding="utf-8")
    assert document.count(plotly_js_header()) == 1  # plotly.js itself is embedded, once
    assert "function normFigure(" in document  # the dashboard's chart code, inlined
    assert '<script src=' not in document and 'src="http' not in document  # nothing to download
    assert "report &lt;run&gt; &amp; &quot;quotes&quot;" in document  # the name, escaped, in the title
    assert "<run>" not in document  # ... and in the embedded JSON (as \u003c)

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright, chromium_path)
        page = browser.new_page()
        requests, errors = [], []
        page.on("request", lambda request: requests.append(request.url))
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        charts = drawn_report(page, target)
        title = page.evaluate("document.querySelector('h1').textContent")
        browser.close()
    assert not errors, errors
    assert all(url.startswith("file://") for url in requests), requests
    assert title == f"gradwatch report: {RUN}"
    assert {"chart-norm", "chart-histogram", "chart-heatmap"} <= set(charts)
    norm = {trace["name"]: trace for trace in charts["chart-norm"]}
    expected = server.run
    assert norm["pre-clip norm"]["x"] == expected.steps.tolist()
    shown = np.array([np.nan if v is None else v for v in norm["pre-clip norm"]["y"]])
    np.testing.assert_allclose(shown, expected.pre_norm, rtol=1e-6)
    assert norm["spike"]["x"] == expected.spike_steps
    histogram_counts = charts["chart-histogram"][0]["y"][:-1]
    assert sum(histogram_counts) == len(expected.finite_norms)
    (output_dir / "report.html").write_text(document, encoding="utf-8")


def test_report_of_an_unknown_run_is_a_one_line_error(server, tmp_path):
    done = report("no-such-run", "-o", str(tmp_path / "x.html"), "--url", server.url)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0
    assert "no run named 'no-such-run'" in done.stderr
    assert not (tmp_path / "x.html").exists()


def test_report_without_a_server_is_a_one_line_error(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    done = report("anything", "-o", str(tmp_path / "x.html"), "--url", url)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0
    assert f"cannot reach the server at {url}" in done.stderr


def test_report_skips_events_without_a_step(tmp_path, chromium_path):
    """Moved from test_server_events.py: the report's charts are drawn by charts.js now."""
    from playwright.sync_api import sync_playwright

    from gradwatch.server.commands.report import RunData, render_report

    events = [{"step": None, "kind": "spike", "value": 3.0, "threshold": None, "message": "no step", "time": None},
              {"step": None, "kind": "nonfinite", "value": "NaN", "threshold": None, "message": "", "time": None},
              {"step": None, "kind": "drop", "value": None, "threshold": None, "message": "dropped", "time": None},
              {"step": 2, "kind": "spike", "value": 9.0, "threshold": 1.0, "message": "spike", "time": None}]
    series = {"step": [0, 1, 2], "pre_norm": [1.0, 1.1, 9.0], "threshold": [1.0] * 3,
              "clipped": [False, True, True], "loss": [2.0] * 3, "spike": [False, False, True],
              "nonfinite": [False] * 3}
    data = RunData(run="r", info={"name": "r", "steps": 3}, series=series, stats={}, recommendation={},
                   histogram={}, events=events, spikes=[e for e in events if e["kind"] == "spike"],
                   nonfinite=[e for e in events if e["kind"] == "nonfinite"], tensors=None)
    target = tmp_path / "stepless.html"
    target.write_text(render_report(data, "http://127.0.0.1:1"), encoding="utf-8")
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright, chromium_path)
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        charts = drawn_report(page, target)
        rows = page.evaluate("""[...document.querySelectorAll('#events tbody tr')]
            .map((tr) => [...tr.cells].map((td) => td.textContent))""")
        browser.close()
    assert not errors, errors
    names = [trace["name"] for trace in charts["chart-norm"]]
    spike = next(trace for trace in charts["chart-norm"] if trace["name"] == "spike")
    assert spike["x"] == [2]
    assert not any(name and name.startswith("non-finite") for name in names)
    assert ["–", "drop"] == rows[2][:2] and all("None" not in cell for row in rows for cell in row)


def test_report_says_over_which_steps_each_figure_is_and_shows_readable_times(server, tmp_path, chromium_path):
    import datetime as dt

    import httpx
    from playwright.sync_api import sync_playwright

    rng = np.random.default_rng(5)
    steps = np.arange(700)
    norms = rng.lognormal(-0.1, 0.25, len(steps))
    norms[[250, 640]] *= 20  # two spikes, one inside the recommendation's window
    stamps = 1_765_000_000.0 + 1.5 * steps  # 2025-12-06 05:46:40 UTC onwards
    batch = {"step": steps.tolist(), "pre_norm": norms.tolist(), "threshold": [1.0] * len(steps),
             "clipped": (norms > 1.0).tolist(), "time": stamps.tolist()}
    answer = httpx.post(f"{server.url}/api/runs/timed/steps", json=batch, timeout=30)
    assert answer.status_code == 200, answer.text
    rec = httpx.get(f"{server.url}/api/runs/timed/recommendation", timeout=30).json()

    target = tmp_path / "timed.html"
    done = report("timed", "-o", str(target), "--url", server.url)
    assert done.returncode == 0, done.stderr
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright, chromium_path)
        page = browser.new_page()
        drawn_report(page, target)
        windows = page.evaluate("[...document.querySelectorAll('#windows li')].map((li) => li.textContent)")
        rows = page.evaluate("""[...document.querySelectorAll('#events tbody tr')]
            .map((tr) => [...tr.cells].map((td) => td.textContent))""")
        summary = dict(page.evaluate("""[...document.querySelectorAll('#summary tbody tr')]
            .map((tr) => [...tr.cells].map((td) => td.textContent))"""))
        candidate_header = page.evaluate("[...document.querySelectorAll('#candidates th')].map((th) => th.textContent)")
        browser.close()

    # The summary says over which steps each figure is.
    assert summary["clip rate, whole run"] == dashboard_rate(np.mean(norms > 1.0))
    assert "p50 / p90 / p95 / p99 / p99.9 (clean window)" in summary
    assert candidate_header[2:] == ["would clip (recommendation's window)", "clean steps only"]

    # The recommended threshold's clip rate over its window, recomputed from what was sent.
    start, end = rec["window"]["start"], rec["window"]["end"]
    assert not rec["level_shift"] and end == 699
    in_window = norms[(steps >= start) & (steps <= end)]
    rate = np.mean(in_window > rec["threshold"])
    assert windows[0] == (f"Recommended threshold {rec['threshold']:.4g}: it would have clipped {dashboard_rate(rate)} of the "
                          f"recommendation's window, steps {start:,}–{end:,} ({len(in_window):,} finite steps); "
                          f"1.0 would have clipped {dashboard_rate(np.mean(in_window > 1.0))} of the same steps.")
    assert windows[1].startswith(f"Clean window: the {rec['window']['clean_steps']:,} clean steps of steps "
                                 f"{start:,}–{end:,}")
    assert windows[2].startswith(f"Whole run: 700 steps, 0–699; the summary's clip rate "
                                 f"({dashboard_rate(np.mean(norms > 1.0))}, steps clipped")
    # Each event's time as UTC text, as a reader would write it from the Unix time sent.
    by_step = {row[0].replace(",", ""): row for row in rows}
    clip_rows = [row for row in rows if row[1] == "clip"]
    assert clip_rows
    for row in clip_rows:
        step = int(row[0].replace(",", ""))
        expected = dt.datetime.fromtimestamp(stamps[step], dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        assert row[5] == expected, (row, by_step.get(str(step)))

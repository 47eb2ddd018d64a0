"""The small CLI surfaces of issue 22: `--version`, `delete` asks first, a 422 put in words.

Real `gradwatch` processes against a real server (tests.procs.ServerProcess)."""
from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import httpx
import numpy as np
import pytest

from tests.procs import ServerProcess

CLI = [sys.executable, "-m", "gradwatch.server.commands.cli"]


def gradwatch(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=60,
                          input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    with ServerProcess(f"sqlite:///{folder / 'cli.db'}") as process:
        rng = np.random.default_rng(3)
        norms = rng.lognormal(0.0, 0.2, 600).tolist()
        answer = httpx.post(f"{process.url}/api/runs/kept/steps", json={"step": list(range(600)), "pre_norm": norms},
                            timeout=30)
        assert answer.status_code == 200, answer.text
        yield process


def post_run(server: ServerProcess, run: str, steps: int) -> None:
    answer = httpx.post(f"{server.url}/api/runs/{run}/steps",
                        json={"step": list(range(steps)), "pre_norm": [1.0] * steps}, timeout=30)
    assert answer.status_code == 200, answer.text


def run_names(server: ServerProcess) -> set[str]:
    return {entry["name"] for entry in httpx.get(f"{server.url}/api/runs", timeout=30).json()}


def test_version_prints_the_installed_distribution_version():
    done = gradwatch("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"gradwatch {version('gradwatch')}"


def test_delete_asks_and_a_no_or_no_answer_deletes_nothing(server):
    post_run(server, "asked", 7)
    refused = gradwatch("delete", "asked", "--url", server.url, stdin="n\n")
    assert refused.returncode == 1
    assert "delete run 'asked' (7 steps, steps 0–6)" in refused.stdout and "[y/N]" in refused.stdout
    assert "nothing deleted" in refused.stderr and "--yes" in refused.stderr
    closed = gradwatch("delete", "asked", "--url", server.url)  # stdin at its end: no answer is a no
    assert closed.returncode == 1 and "nothing deleted" in closed.stderr
    assert "asked" in run_names(server)

    agreed = gradwatch("delete", "asked", "--url", server.url, stdin="y\n")
    assert agreed.returncode == 0, agreed.stderr
    assert "deleted run 'asked': 7 steps" in agreed.stdout
    assert "asked" not in run_names(server)


def test_delete_with_yes_does_not_ask(server):
    post_run(server, "unasked", 3)
    done = gradwatch("delete", "unasked", "--url", server.url, "--yes")
    assert done.returncode == 0, done.stderr
    assert "[y/N]" not in done.stdout and "deleted run 'unasked': 3 steps" in done.stdout
    assert "unasked" not in run_names(server)
    again = gradwatch("delete", "unasked", "--url", server.url)  # unknown: nothing to ask about
    assert again.returncode == 1 and "404" in again.stderr and "[y/N]" not in again.stdout


def test_recommend_with_a_too_small_window_says_so_in_one_sentence(server):
    done = gradwatch("recommend", "kept", "--url", server.url, "--window", "50")
    assert done.returncode == 1
    assert done.stderr.strip() == "gradwatch recommend: --window must be at least 100 (got 50)."
    rate = gradwatch("recommend", "kept", "--url", server.url, "--target-clip-rate", "1.5")
    assert rate.returncode == 1
    assert rate.stderr.strip() == "gradwatch recommend: --target-clip-rate must be less than 1 (got 1.5)."


def test_detail_in_words_names_each_field_and_limit_of_a_real_422(server):
    from gradwatch.server.commands.client import ApiClient, ApiError, detail_in_words

    answer = httpx.get(f"{server.url}/api/runs/kept/series", params={"points": "many", "start": "-5"}, timeout=30)
    assert answer.status_code == 422
    detail = answer.json()["detail"]
    if isinstance(detail, str):  # a server that words its own 422s: passed through as it is
        assert detail_in_words(detail) == detail
        return
    sentence = detail_in_words(detail)
    assert "{" not in sentence and sentence.endswith(".") and sentence.count("\n") == 0
    for problem in detail:
        assert problem["loc"][-1] in sentence and str(problem["input"]) in sentence
    with pytest.raises(ApiError) as raised:
        ApiClient(server.url).get("/api/runs/kept/recommendation", window=20)
    assert raised.value.status == 422 and str(raised.value) == "window must be at least 100 (got 20)."


def test_clip_rates_read_the_same_in_the_terminal_as_on_the_dashboard(server, chromium_path):
    """`format_rate` (recommend, demo, report) against the dashboard's own `formatRate`, run in Chromium."""
    from playwright.sync_api import sync_playwright

    from gradwatch.server.commands.recommend import format_rate
    from tests.test_dashboard_support import launch_chromium

    rates = [0.0, 1e-5, 0.0001, 0.00019, 0.004, 0.0123456, 0.05, 0.0999, 0.1, 0.12345, 0.5, 1.0, 2 / 3, 1 / 499]
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright, chromium_path)
        page = browser.new_page()
        page.goto(server.url + "/static/util.js")  # same origin as the module
        shown = page.evaluate("async (rates) => { const util = await import('/static/util.js');"
                              " return rates.map((rate) => util.formatRate(rate)); }", rates)
        browser.close()
    assert [format_rate(rate) for rate in rates] == shown
    assert format_rate(None) == "n/a"

"""One threshold, one clip rate: the recommendation's threshold read on every surface of one run
(the API's recommendation and what-if, the dashboard's headline, candidates table and what-if box
in real Chromium, `gradwatch recommend` run as a subprocess) gives the same raw clip rate over the
same stated steps, and NumPy over the stored norms agrees. Two cases: the default window, and a
window with a level shift in it (the rate window then starts at the first clean step after it)."""
from __future__ import annotations

import re
import subprocess
import sys
import urllib.parse

import numpy as np
import pytest

from tests.procs import ServerProcess
from tests.test_dashboard import browser, page  # noqa: F401  (fixtures)
from tests.test_dashboard_support import get_json, post_steps, wait_until

SPIKY = "one-number"
SHIFTED = "one-number-shift"
STEPS = 3000
SHIFT_AT = 2400


def spiky_norms() -> np.ndarray:
    rng = np.random.default_rng(22)
    norms = 0.7 * np.exp(rng.normal(0.0, 0.1, STEPS))
    norms[rng.choice(np.arange(2500, STEPS), 12, replace=False)] *= 40.0  # corrupted batches in the window
    norms[[2600, 2777]] = np.nan
    return norms


def shifted_norms() -> np.ndarray:
    rng = np.random.default_rng(23)
    norms = np.exp(rng.normal(0.0, 0.05, STEPS))
    norms[SHIFT_AT:] *= 5.0
    norms[[2700, 2900]] *= 30.0
    return norms


def wire(values: np.ndarray) -> list:
    return ["NaN" if not np.isfinite(v) else float(v) for v in values]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("one-number")
    with ServerProcess(f"sqlite:///{folder / 'gradwatch.db'}", log_path=folder / "server.log") as process:
        process.norms = {SPIKY: spiky_norms(), SHIFTED: shifted_norms()}
        for run, norms in process.norms.items():
            post_steps(process.url, run, {"step": list(range(STEPS)), "pre_norm": wire(norms)})
        yield process


def numpy_rate(norms: np.ndarray, start: int, end: int, threshold: float) -> tuple[float, int]:
    """The independent reference: finite stored norms of steps start..end strictly above it."""
    part = norms[start:end + 1]
    part = part[np.isfinite(part)]
    return float(np.count_nonzero(part > threshold) / len(part)), len(part)


def cli_figure(server, run: str, window: int | None) -> tuple[float, int, int]:
    """`gradwatch recommend`'s headline: the percentage and the steps it says it is over."""
    command = [sys.executable, "-m", "gradwatch.server.commands.cli", "recommend", run, "--url", server.url]
    if window is not None:
        command += ["--window", str(window)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if "would have clipped" in line)
    found = re.search(r"clipped ([0-9.]+)%.*?steps ([0-9,]+)\s*[–-]\s*([0-9,]+)", line)
    assert found, line
    return float(found.group(1)) / 100, int(found.group(2).replace(",", "")), int(found.group(3).replace(",", ""))


@pytest.mark.parametrize("run, window", [(SPIKY, None), (SHIFTED, 1000)])
def test_the_recommended_threshold_has_one_clip_rate_on_every_surface(page, server, run, window,  # noqa: F811
                                                                      output_dir):
    norms = server.norms[run]
    path = f"/api/runs/{urllib.parse.quote(run, safe='')}"
    query = "" if window is None else f"?window={window}"
    rec = get_json(server.url, f"{path}/recommendation{query}")
    threshold, rate, span = rec["threshold"], rec["clip_rate_raw"], rec["rate_window"]
    assert threshold is not None and 0 < rate < 0.5
    start, end = span["start"], span["end"]
    if run == SHIFTED:  # the rate window is the regime after the shift: from its first clean step
        assert rec["level_shift"] and span["after_level_shift"]
        assert start == rec["window"]["clean_start"] and SHIFT_AT <= start < SHIFT_AT + 100
    else:
        assert not rec["level_shift"] and start == rec["window"]["start"] == STEPS - 500
    assert end == STEPS - 1

    # NumPy over the stored norms: the same figure, exactly, over the steps the answer names.
    expected, finite = numpy_rate(norms, start, end, threshold)
    assert rate == expected and span["finite"] == finite
    recommended = next(c for c in rec["candidates"] if c["label"] == "recommended")
    assert recommended["clip_rate_raw"] == rate
    for candidate in rec["candidates"]:
        assert candidate["clip_rate_raw"] == numpy_rate(norms, start, end, candidate["threshold"])[0]

    # The what-if API, default over the recommendation's window.
    params = urllib.parse.urlencode({"threshold": repr(threshold), **({"window": window} if window else {})})
    what = get_json(server.url, f"{path}/whatif?{params}")
    assert what["over"] == "window" and what["clip_rate"] == rate
    assert (what["window"]["start"], what["window"]["end"], what["count"]) == (start, end, finite)

    # The dashboard: the headline, the recommended candidate's row and the what-if box.
    page.goto(f"{server.url}/?run={urllib.parse.quote(run, safe='')}")
    wait_until(page, "window.gradwatch && window.gradwatch.firstNormChartMs !== null", what="the norm chart")
    if window is not None:
        page.select_option("#window-select", str(window))
        wait_until(page, f"document.getElementById('rec-rate').dataset.start === '{start}'", what="the new window")
    wait_until(page, "document.getElementById('rec-rate').dataset.clipRate !== undefined", what="the headline")
    headline = page.evaluate("({...document.getElementById('rec-rate').dataset})")
    assert float(headline["clipRate"]) == rate
    assert (int(headline["start"]), int(headline["end"]), int(headline["count"])) == (start, end, finite)
    shown = page.text_content("#rec-rate")
    assert f"{start:,}–{end:,}" in shown and f"{finite:,} finite steps" in shown
    row_rate = page.evaluate("document.querySelector('#candidate-rows tr.recommended td:nth-child(3)').dataset.clipRate")
    assert float(row_rate) == rate
    wait_until(page, f"document.getElementById('whatif-output').dataset.start === '{start}' && "
                     f"Number(document.getElementById('whatif-output').dataset.threshold) === {threshold!r}",
               what="the what-if box at the recommended threshold")
    box = page.evaluate("({...document.getElementById('whatif-output').dataset})")
    assert float(box["threshold"]) == threshold and float(box["clipRate"]) == rate
    assert (int(box["start"]), int(box["end"]), int(box["count"])) == (start, end, finite)
    percent = re.search(r"would clip ([0-9.]+)%", shown).group(1)
    assert f"would clip {percent}%" in page.text_content("#whatif-output")  # the same words, too
    page.screenshot(path=str(output_dir / f"one-number-{run}.png"), full_page=True)

    # `gradwatch recommend`: the same rate (to its two decimals) over the same steps.
    cli_rate, cli_start, cli_end = cli_figure(server, run, window)
    assert (cli_start, cli_end) == (start, end)
    assert cli_rate == pytest.approx(rate, abs=5e-5)

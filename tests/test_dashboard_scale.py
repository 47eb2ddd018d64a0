"""The dashboard at the scale of a real model, in headless Chromium against a real server:
the norm axis chosen from the data (a spiky run and a calm one), clean log ticks, a
300-tensor run's heatmap grouped by module path (checked against NumPy), expand/collapse,
the groups that spike most often, and the report drawn by the same chart code as the page."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest

from tests.procs import ServerProcess
from tests.test_dashboard import browser, page  # noqa: F401  (fixtures)
from tests.test_dashboard_support import post_steps, wait_until

SPIKY = "demo-like"
CALM = "calm"
LLAMA = "llama-300"
SPIKE_STEPS = [200, 450, 700, 900]
LLAMA_STEPS = 400
LLAMA_SPIKES = [300, 350]
SPIKY_TENSOR = "model.layers.5.input_layernorm.weight"


def llama_names(layers: int = 33) -> list[str]:
    names = ["model.embed_tokens.weight"]
    for i in range(layers):
        block = f"model.layers.{i}"
        names += [f"{block}.self_attn.{m}.weight" for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [f"{block}.mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")]
        names += [f"{block}.input_layernorm.weight", f"{block}.post_attention_layernorm.weight"]
    return names + ["model.norm.weight", "lm_head.weight"]


NAMES = llama_names()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dashboard-scale")
    rng = np.random.default_rng(5)
    with ServerProcess(f"sqlite:///{folder / 'gradwatch.db'}", log_path=folder / "server.log") as process:
        # Like `gradwatch demo`: ordinary norms near 0.7, four corrupted batches at 110-140.
        steps = np.arange(1000)
        spiky = 0.7 * np.exp(rng.normal(0.0, 0.08, len(steps)))
        spiky[SPIKE_STEPS] = [110.0, 140.0, 125.0, 131.0]
        post_steps(process.url, SPIKY, {"step": steps.tolist(), "pre_norm": spiky.tolist(),
                                        "loss": (3.0 * np.exp(-steps / 500.0) + 0.5).tolist(),
                                        "spike": np.isin(steps, SPIKE_STEPS).tolist()})
        calm = np.exp(rng.normal(0.0, 0.1, 1200))
        post_steps(process.url, CALM, {"step": list(range(1200)), "pre_norm": calm.tolist()})
        norms = np.exp(rng.normal(0.0, 0.1, (LLAMA_STEPS, len(NAMES)))).astype(np.float32)
        norms[LLAMA_SPIKES, NAMES.index(SPIKY_TENSOR)] *= 200.0
        pre = np.sqrt((norms.astype(np.float64) ** 2).sum(axis=1))
        post_steps(process.url, LLAMA, {"step": list(range(LLAMA_STEPS)), "pre_norm": pre.tolist(),
                                        "spike": np.isin(np.arange(LLAMA_STEPS), LLAMA_SPIKES).tolist(),
                                        "tensor_norms": {"names": NAMES, "norms": norms.tolist()}})
        process.spiky, process.calm, process.llama = spiky, calm, norms
        yield process


def open_run(page, server, run):  # noqa: F811
    page.goto(f"{server.url}/?run={urllib.parse.quote(run, safe='')}")
    wait_until(page, "window.gradwatch && window.gradwatch.firstNormChartMs !== null", what="the norm chart")


def no_errors(page):  # noqa: F811
    assert page.evaluate("window.__csp") == []
    assert not page.recorded.console_errors, page.recorded.console_errors
    assert not page.recorded.page_errors, page.recorded.page_errors


def test_spiky_run_fits_the_ordinary_steps_and_marks_the_spikes_on_the_edge(page, server, output_dir):  # noqa: F811
    open_run(page, server, SPIKY)
    wait_until(page, "window.gradwatch.renders.histogram > 0 && window.gradwatch.renders.norm > 1")
    layout = page.evaluate("(() => { const l = document.getElementById('norm-chart').layout;"
                           " return {type: l.yaxis.type, range: l.yaxis.range}; })()")
    ordinary = np.delete(server.spiky, SPIKE_STEPS)
    low, high = layout["range"]
    if layout["type"] == "log":
        low, high, ordinary = low, high, np.log10(ordinary)
    assert low <= ordinary.min() and ordinary.max() <= high  # every ordinary step on the chart ...
    assert (ordinary.max() - ordinary.min()) / (high - low) >= 0.6  # ... using most of its height
    traces = page.evaluate("Object.fromEntries(document.getElementById('norm-chart').data.map((t) => [t.name, t]))")
    assert traces["off-scale norm"]["x"] == SPIKE_STEPS  # the corrupted batches, on the top edge
    np.testing.assert_allclose(traces["off-scale norm"]["customdata"], server.spiky[SPIKE_STEPS])
    assert traces["spike"]["x"] == SPIKE_STEPS
    # The histogram spans decades: a log axis labelled 1-2-5 or by powers of ten, labels apart.
    axis = page.evaluate("document.getElementById('histogram').layout.xaxis")
    assert axis["type"] == "log" and axis["dtick"] in ("D2", 1)
    boxes = page.evaluate("""[...document.querySelectorAll('#histogram .xtick text')]
        .map((t) => t.getBoundingClientRect()).filter((r) => r.width > 0).map((r) => [r.left, r.right])""")
    boxes.sort()
    assert len(boxes) >= 2 and all(a[1] <= b[0] for a, b in zip(boxes, boxes[1:])), boxes
    texts = page.evaluate("document.body.innerText")
    assert not any(len(part.split(".")[-1]) > 6 for part in texts.split() if part.replace(".", "").isdigit())
    page.screenshot(path=str(output_dir / "dashboard-demo-like.png"), full_page=True)
    no_errors(page)


def test_calm_run_stays_linear_on_its_whole_range(page, server):  # noqa: F811
    open_run(page, server, CALM)
    axis = page.evaluate("document.getElementById('norm-chart').layout.yaxis")
    assert axis["type"] == "linear" and axis["autorange"] is True
    names = page.evaluate("document.getElementById('norm-chart').data.map((t) => t.name)")
    assert "off-scale norm" not in names
    # The user's choice wins: log shows the whole range.
    page.select_option("#y-scale", "log")
    wait_until(page, "document.getElementById('norm-chart').layout.yaxis.type === 'log'")
    no_errors(page)


def expected_block_rows(norms: np.ndarray, points: int) -> dict[str, np.ndarray]:
    """Block norms per step by hand (L2 over the block's tensors), then the max per bucket."""
    blocks: dict[str, list[int]] = {}
    for column, name in enumerate(NAMES):
        parts = name.split(".")
        block = ".".join(parts[:3]) if parts[1] == "layers" else ".".join(parts[:-1])
        blocks.setdefault(block, []).append(column)
    size = max(math.ceil(len(norms) / points), 1)
    out = {}
    for block, columns in blocks.items():
        per_step = np.sqrt((norms[:, columns].astype(np.float64) ** 2).sum(axis=1))
        out[block] = np.array([per_step[i:i + size].max() for i in range(0, len(per_step), size)])
    return out


def test_300_tensor_run_is_a_heatmap_of_blocks_that_expand_into_modules(page, server, output_dir):  # noqa: F811
    open_run(page, server, LLAMA)
    wait_until(page, "window.gradwatch.renders.heatmap > 0 && window.gradwatch.renders.groupSpikes > 0",
               what="the grouped heatmap")
    heat = page.evaluate("(() => { const t = document.getElementById('heatmap').data[0];"
                         " return {rows: t.meta.rows, z: t.z, x: t.x}; })()")
    asked = [u for u in page.recorded.requests if "/tensors" in u and "group=block" in u][-1]
    points = int(urllib.parse.parse_qs(urllib.parse.urlparse(asked).query)["points"][0])
    assert points <= 1000
    expected = expected_block_rows(server.llama, points)
    assert heat["rows"] == list(expected)  # 36 rows for 300 tensors: embed, 33 blocks, norm, head
    for row, name in enumerate(heat["rows"]):
        np.testing.assert_allclose(heat["z"][row], np.log10(expected[name]), rtol=1e-5, atol=1e-6)
    # Which groups spike most often: the block whose layernorm spiked, at the top (bars are drawn
    # bottom-up), at every spike; the adaptive rule may flag a noise step in any group, that one
    # included (its false-positive budget, about 0.1%), never as often as the spikes.
    bars = page.evaluate("document.getElementById('group-spikes').data[0]")
    assert bars["y"][-1] == "model.layers.5" and len(LLAMA_SPIKES) <= bars["x"][-1] <= len(LLAMA_SPIKES) + 1
    assert all(count < len(LLAMA_SPIKES) for count in bars["x"][:-1]), bars
    # Expand one block: its modules appear under it; collapse: gone again.
    page.click("#group-chips button[data-group='model.layers.5']")
    wait_until(page, "document.getElementById('heatmap').data[0].meta.rows.includes('model.layers.5.mlp')",
               what="the expanded block")
    rows = page.evaluate("document.getElementById('heatmap').data[0].meta.rows")
    at = rows.index("model.layers.5")
    assert rows[at + 1:at + 5] == ["model.layers.5.self_attn", "model.layers.5.mlp",
                                   "model.layers.5.input_layernorm", "model.layers.5.post_attention_layernorm"]
    # The latest spike is selected: its top contributing tensor is the spiky one.
    wait_until(page, "window.gradwatch.renders.contributions > 0")
    top = page.evaluate("(() => { const y = document.getElementById('contributions').data[0].y; return y[y.length - 1]; })()")
    assert top == SPIKY_TENSOR
    page.screenshot(path=str(output_dir / "dashboard-300-tensors.png"), full_page=True)
    page.click("#group-chips button[data-group='model.layers.5']")
    wait_until(page, "!document.getElementById('heatmap').data[0].meta.rows.includes('model.layers.5.mlp')")
    no_errors(page)


def test_report_draws_the_same_traces_as_the_page(page, server, tmp_path):  # noqa: F811
    from tests.test_dashboard_report import drawn_report

    open_run(page, server, SPIKY)
    wait_until(page, "window.gradwatch.renders.histogram > 0")
    time.sleep(0.3)  # the marks and recommendation redraws settle
    wait_until(page, "window.gradwatch.renders.norm >= 2")
    summary = """(id) => document.getElementById(id).data.map((t) => ({name: t.name, type: t.type,
        mode: t.mode || null, yaxis: t.yaxis || 'y', x: t.x, y: t.y}))"""
    on_page = page.evaluate(f"({summary})('norm-chart')")
    page_axis = page.evaluate("document.getElementById('norm-chart').layout.yaxis.range")
    target = tmp_path / "same.html"
    done = subprocess.run([sys.executable, "-m", "gradwatch.server.commands.cli", "report", SPIKY, "-o", str(target),
                           "--url", server.url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    drawn_report(page, target)
    in_report = page.evaluate(f"({summary})('chart-norm')")
    report_axis = page.evaluate("document.getElementById('chart-norm').layout.yaxis.range")
    assert [t["name"] for t in in_report] == [t["name"] for t in on_page]
    assert in_report == on_page
    assert report_axis == page_axis


@pytest.mark.slow
def test_the_real_demo_run_fits_its_ordinary_steps(page, tmp_path, output_dir):  # noqa: F811
    """`gradwatch demo --exit` (real MLX training, real agent), then the page on its database:
    the corrupted batches are off-scale marks on the top edge, the ordinary steps fill the chart."""
    from tests.procs import free_port

    db_url = f"sqlite:///{tmp_path / 'demo.db'}"
    demo = subprocess.run([sys.executable, "-m", "gradwatch.server.commands.cli", "demo", "--steps", "800", "--exit",
                           "--port", str(free_port()), "--db", db_url],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr[-2000:]
    with ServerProcess(db_url, log_path=tmp_path / "server.log") as server:
        run = json.loads(urllib.request.urlopen(server.url + "/api/runs", timeout=30).read())[0]["name"]
        meta = json.loads(urllib.request.urlopen(
            f"{server.url}/api/runs/{urllib.parse.quote(run, safe='')}", timeout=30).read())["meta"]
        corrupted = meta["config"]["corrupted_steps"]
        open_run(page, server, run)
        wait_until(page, "window.gradwatch.renders.histogram > 0 && window.gradwatch.renders.heatmap > 0",
                   what="the histogram and the heatmap")
        wait_until(page, "window.gradwatch.renders.norm > 1")
        traces = page.evaluate("Object.fromEntries(document.getElementById('norm-chart').data.map((t) => [t.name, t]))")
        layout = page.evaluate("document.getElementById('norm-chart').layout.yaxis")
        norms = np.array([np.nan if v is None else v for v in traces["pre-clip norm"]["y"]], dtype=float)
        assert set(corrupted) <= set(traces["off-scale norm"]["x"])  # every corrupted batch on the edge
        ordinary = norms[np.isfinite(norms) & ~np.isin(traces["pre-clip norm"]["x"], traces["off-scale norm"]["x"])]
        low, high = layout["range"]
        if layout["type"] == "log":
            ordinary = np.log10(ordinary)
        assert low <= ordinary.min() and ordinary.max() <= high
        assert np.percentile(ordinary, 99) - np.percentile(ordinary, 1) >= 0.4 * (high - low)
        rate_text = page.text_content("#rec-rate")  # the raw rate over the window, the clean one labelled
        assert "finite steps 300–799" in rate_text and "clean steps" in rate_text
        page.screenshot(path=str(output_dir / "dashboard-demo-run.png"), full_page=True)
        no_errors(page)

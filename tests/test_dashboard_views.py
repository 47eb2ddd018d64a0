"""Views of the dashboard in real Chromium against a real server: the zoom kept across scale
changes, a readable tensor level at 20 and 300 tensors (rows of a minimum height, labels apart,
the box scrolls), words where a panel is empty, and errors in words (the server's 422 turned into
one sentence naming the field and the limit; inputs carrying the server's limits)."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from tests.procs import ServerProcess
from tests.test_dashboard import browser, page  # noqa: F401  (fixtures)
from tests.test_dashboard_support import post_steps, wait_until

ZOOM_RUN = "zoom-run"
LONG_NAME = "demo-20261206-220649-a-rather-long-experiment-name"
SPIKE = 1810


def names(tensors: int) -> list[str]:
    per_block = 10
    return [f"model.layers.{i // per_block}.{['attn.q', 'attn.k', 'attn.v', 'attn.o', 'mlp.up', 'mlp.down', 'mlp.gate', 'norm1', 'norm2', 'extra'][i % per_block]}.weight"
            for i in range(tensors)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("views")
    rng = np.random.default_rng(7)
    with ServerProcess(f"sqlite:///{folder / 'gradwatch.db'}", log_path=folder / "server.log") as process:
        norms = 0.7 * np.exp(rng.normal(0.0, 0.1, 2000))
        norms[SPIKE] = 60.0
        post_steps(process.url, ZOOM_RUN, {"step": list(range(2000)), "pre_norm": norms.tolist(),
                                           "loss": (3.0 * np.exp(-np.arange(2000) / 700) + 0.4).tolist()})
        post_steps(process.url, LONG_NAME, {"step": list(range(50)), "pre_norm": [1.0] * 50})
        for count in (20, 300):
            tensor = np.exp(rng.normal(0.0, 0.1, (120, count)))
            post_steps(process.url, f"tensors-{count}", {
                "step": list(range(120)), "pre_norm": np.sqrt((tensor ** 2).sum(axis=1)).tolist(),
                "tensor_norms": {"names": names(count), "norms": tensor.tolist()}})
        yield process


def open_run(page, server, run):  # noqa: F811
    page.goto(f"{server.url}/?run={run}")
    wait_until(page, "window.gradwatch && window.gradwatch.firstNormChartMs !== null", what="the norm chart")


def x_range(page) -> list[float]:
    return page.evaluate("document.getElementById('norm-chart')._fullLayout.xaxis.range.slice()")


def test_zoom_is_kept_when_the_scale_changes(page, server, output_dir):  # noqa: F811
    open_run(page, server, ZOOM_RUN)
    page.evaluate("window.Plotly.relayout(document.getElementById('norm-chart'), {'xaxis.range': [1760, 1860]})")
    wait_until(page, "document.getElementById('chart-note').textContent === 'steps 1,760–1,860'")
    # the zoomed range is read again at full resolution: every step 1,760-1,860 drawn
    wait_until(page, "document.getElementById('norm-chart').data[0].x.length === 101", what="the zoomed read")
    for scale in ("log", "linear", "auto", "log"):
        page.select_option("#y-scale", scale)
        wait_until(page, f"window.gradwatch.scale && window.gradwatch.scale.type === '{'linear' if scale == 'auto' else scale}'"
                         f" && document.getElementById('norm-chart')._fullLayout.yaxis.type === "
                         f"'{'linear' if scale == 'auto' else scale}'", what=f"the {scale} scale")
        low, high = x_range(page)
        assert low == pytest.approx(1760, abs=1) and high == pytest.approx(1860, abs=1), (scale, low, high)
        x = page.evaluate("document.getElementById('norm-chart').data[0].x")
        assert min(x) >= 1760 and max(x) <= 1860 and len(x) == 101  # the chart draws what the note says
        assert page.text_content("#chart-note") == "steps 1,760–1,860"
        if scale == "log":  # log labels without trailing zeros ("1", "0.5", never "1.000")
            labels = page.evaluate("[...document.querySelectorAll('#norm-chart .ytick text')].map((t) => t.textContent)")
            assert labels and not [label for label in labels if "." in label and label.rstrip("0") != label]
    page.screenshot(path=str(output_dir / "dashboard-zoom-log.png"))


def tick_boxes(page, element: str) -> list[dict]:
    return page.evaluate(f"""[...document.querySelectorAll('#{element} .ytick text')]
        .map((t) => {{ const r = t.getBoundingClientRect(); return {{top: r.top, bottom: r.bottom, text: t.textContent}}; }})""")


@pytest.mark.parametrize("count", [20, 300])
def test_the_tensor_level_is_readable(page, server, output_dir, count):  # noqa: F811
    open_run(page, server, f"tensors-{count}")
    wait_until(page, "window.gradwatch.renders.heatmap > 0", what="the heatmap")
    page.select_option("#group-level", "tensor")
    wait_until(page, f"document.getElementById('heatmap').data && "
                     f"document.getElementById('heatmap').data[0].meta.rows.length === {count}", what="tensor rows")
    wait_until(page, f"document.querySelectorAll('#heatmap .ytick text').length === {count}", what="every label")
    boxes = sorted(tick_boxes(page, "heatmap"), key=lambda box: box["top"])
    assert {box["text"] for box in boxes} == set(names(count))  # every tensor named ...
    gaps = [b["top"] - a["bottom"] for a, b in zip(boxes, boxes[1:])]
    assert min(gaps) >= 1.0  # ... and no label on another
    plot_height = page.evaluate("document.getElementById('heatmap')._fullLayout._size.h")
    assert plot_height / count >= 14  # rows of a readable height, not 3-8 px
    scroll = page.evaluate("(() => { const b = document.getElementById('heatmap-scroll');"
                           " return {client: b.clientHeight, scroll: b.scrollHeight}; })()")
    if count == 300:
        assert scroll["scroll"] > scroll["client"]  # the box scrolls
    # The spike panel says why it is empty at this level, in words.
    assert "blocks" in page.text_content("#group-spike-note")
    page.locator("#heatmap-scroll").screenshot(path=str(output_dir / f"dashboard-tensors-{count}.png"))
    page.select_option("#group-level", "block")
    wait_until(page, "document.getElementById('heatmap').data[0].meta.rows.length < 40", what="block rows")
    assert page.text_content("#group-spike-note").strip()  # none, said in words, or the rule


def test_errors_reach_people_in_words(page, server, output_dir):  # noqa: F811
    # The server refuses a what-if threshold <= 0 (422) and says which field and limit.
    for threshold in ("0", "-1"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{server.url}/api/runs/{ZOOM_RUN}/whatif?threshold={threshold}", timeout=30)
        assert refused.value.code == 422
        assert "threshold" in json.loads(refused.value.read())["detail"][0]["loc"]
    open_run(page, server, ZOOM_RUN)
    # The inputs carry the server's limits.
    assert page.get_attribute("#window-custom", "min") == "1"
    assert page.get_attribute("#whatif-input", "min") == "0"
    # A 422 from the server, as the page words it.
    sentence = page.evaluate("""import('/static/api.js').then((api) => api.getJSON(
        api.runPath('zoom-run', '/recommendation'), {window: 50}).then(() => 'no error', (e) => e.detail))""")
    assert sentence == "The window must be at least 100 (got 50)."
    sentence = page.evaluate("""import('/static/api.js').then((api) => api.getJSON(
        api.runPath('zoom-run', '/whatif'), {threshold: -1}).then(() => 'no error', (e) => e.detail))""")
    assert sentence == "The threshold must be above 0 (got -1)."
    # A custom window of 50: the page says what happens below the recommendation's 100 steps.
    page.select_option("#window-select", "custom")
    page.fill("#window-custom", "50")
    page.dispatch_event("#window-custom", "change")
    wait_until(page, "!document.getElementById('window-note').hidden", what="the window note")
    assert "at least 100 steps" in page.text_content("#window-note")
    wait_until(page, "window.gradwatch.renders.histogram > 1")
    assert page.is_hidden("#error-banner"), page.text_content("#error-banner")
    # A what-if threshold of 0 or -1: a sentence, not "would clip 100%".
    for value in ("0", "-1"):
        page.fill("#whatif-input", value)
        wait_until(page, "window.gradwatch.whatif && window.gradwatch.whatif.refused === true && "
                         f"window.gradwatch.whatif.threshold === {value}")
        assert page.text_content("#whatif-output") == "The threshold must be a number above 0."
    page.screenshot(path=str(output_dir / "dashboard-errors-in-words.png"))
    assert not page.recorded.page_errors


def mantissa(step: float) -> float:
    return round(step / 10 ** np.floor(np.log10(step)), 6)


def test_round_ticks_on_every_linear_axis_and_overlay_colours_apart_from_the_flags(page, server):  # noqa: F811
    open_run(page, server, ZOOM_RUN)
    wait_until(page, "window.gradwatch.renders.histogram > 0 && window.gradwatch.renders.norm > 1")
    page.select_option("#y-scale", "linear")
    wait_until(page, "document.getElementById('norm-chart')._fullLayout.yaxis.type === 'linear'")
    for element, axes in (("norm-chart", ("xaxis", "yaxis", "yaxis2")), ("histogram", ("yaxis",))):
        for name in axes:
            dtick = page.evaluate(f"document.getElementById('{element}')._fullLayout.{name}.dtick")
            assert mantissa(float(dtick)) in (1.0, 2.0, 5.0), (element, name, dtick)  # 1-2-5 steps
    loss_ticks = page.evaluate("[...document.querySelectorAll('#norm-chart .y2tick text')].map((t) => t.textContent)")
    assert loss_ticks and all(not text.startswith(("−", "-")) for text in loss_ticks)  # no negative loss tick
    colours = page.evaluate("""import('/static/charts.js').then((charts) => ({
        flags: ['norm', 'threshold', 'clipped', 'spike', 'loss', 'nonfinite', 'recommended', 'levelShift',
                'skipped', 'lossSpike', 'offscale'].map((key) => charts.COLORS[key]),
        overlays: [0, 1, 2, 3, 4, 5, 6].map((i) => charts.overlayColor(i))}))""")

    def rgb(text):
        return np.array([int(text[i:i + 2], 16) for i in (1, 3, 5)], dtype=float)

    for overlay in colours["overlays"]:
        nearest = min(np.linalg.norm(rgb(overlay) - rgb(flag)) for flag in colours["flags"])
        assert nearest >= 60, (overlay, nearest)  # an overlaid run never reads as a flag


def test_histogram_labels_do_not_collide_and_long_run_names_are_ellipsised(page, server):  # noqa: F811
    open_run(page, server, ZOOM_RUN)
    wait_until(page, "window.gradwatch.renders.histogram > 0 && "
                     "document.querySelectorAll('#histogram .annotation').length >= 3", what="the histogram labels")
    boxes = page.evaluate("""[...document.querySelectorAll('#histogram .annotation')].map((a) => {
        const r = a.getBoundingClientRect(); return {l: r.left, r: r.right, t: r.top, b: r.bottom, text: a.textContent}; })""")
    for i, one in enumerate(boxes):
        for other in boxes[i + 1:]:
            apart = one["r"] <= other["l"] or other["r"] <= one["l"] or one["b"] <= other["t"] or other["b"] <= one["t"]
            assert apart, (one, other)
    wait_until(page, f"document.querySelector('#run-rows a[title=\"{LONG_NAME}\"]') !== null", what="the long name")
    cut = page.evaluate(f"""(() => {{ const a = document.querySelector('#run-rows a[title="{LONG_NAME}"]');
        return {{text: a.textContent, scroll: a.scrollWidth, client: a.clientWidth,
                 lines: Math.round(a.getBoundingClientRect().height / parseFloat(getComputedStyle(a).lineHeight || 16))}}; }})()""")
    assert cut["text"] == LONG_NAME and cut["scroll"] > cut["client"]  # one line, ellipsised; whole on hover
    assert page.evaluate("getComputedStyle(document.querySelector('#run-rows td.name a')).textOverflow") == "ellipsis"

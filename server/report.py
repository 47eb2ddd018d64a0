"""`gradwatch report RUN -o report.html`: a run's charts as one offline HTML file.

The report reads the same REST API as the dashboard (over HTTP with urllib, so
it works against any server, local or remote) and draws the same charts with
plotly's Python package: the norm chart, the histogram with the percentiles
and the recommended threshold, the per-tensor heatmap, and the events. The
file embeds plotly.js once and needs no network to open.
"""
from __future__ import annotations

import argparse
import datetime as dt
import html
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .client import ApiClient, ApiError, run_path

SERIES_POINTS = 5000
TENSOR_POINTS = 400
EVENT_LIMIT = 1000
NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}

COLORS = {"norm": "#1f77b4", "threshold": "#ff7f0e", "clipped": "#ff7f0e", "spike": "#d62728",
          "loss": "#2ca02c", "nonfinite": "#d62728", "recommended": "#17becf", "percentile": "#7f7f7f"}


class ReportError(Exception):
    """A one-line reason the report could not be written (beside the API's own `ApiError`)."""


@dataclass
class RunData:
    run: str
    info: dict
    series: dict
    stats: dict
    recommendation: dict
    histogram: dict
    events: list
    tensors: dict | None


# ----------------------------------------------------------------- fetching

def fetch_run(api: ApiClient, run: str) -> RunData:
    runs = api.get("/api/runs")
    info = next((item for item in runs if item.get("name") == run), None)
    if info is None:
        known = ", ".join(repr(item.get("name")) for item in runs[:5])
        raise ReportError(f"no run named {run!r} at {api.url}" + (f" (runs: {known}{', ...' if len(runs) > 5 else ''})"
                                                                 if runs else " (it has no runs)"))
    series = api.get(run_path(run, "/series"), points=SERIES_POINTS,
                     fields="pre_norm,threshold,clipped,loss,spike,nonfinite")
    stats = api.get(run_path(run, "/stats"))
    recommendation = api.get(run_path(run, "/recommendation"))
    histogram = api.get(run_path(run, "/histogram"), bins=60)
    events = api.get(run_path(run, "/events"), limit=EVENT_LIMIT)
    try:
        tensors = api.get(run_path(run, "/tensors"), points=TENSOR_POINTS)
    except ApiError:
        tensors = None  # the report is still useful without the heatmap
    return RunData(run, info, series, stats, recommendation, histogram, events, tensors)


# ----------------------------------------------------------------- figures

def wire_float(value: Any) -> float | None:
    """A wire float ("NaN"/"Infinity" strings allowed) as a Python float, None when absent."""
    if value is None:
        return None
    if isinstance(value, str):
        return NON_FINITE.get(value, math.nan)
    return float(value)


def plottable(value: Any) -> float | None:
    number = wire_float(value)
    return number if number is not None and math.isfinite(number) else None


def event_step(event: dict) -> int | None:
    """An event's step, None when it has none (or not a usable one)."""
    step = event.get("step")
    return step if type(step) is int else None


def plotly_text(text: Any) -> str:
    """A database string as a Plotly label: Plotly reads a few HTML tags in labels; escape them."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def fmt(value: Any) -> str:
    number = wire_float(value)
    if number is None:
        return "–"
    if not math.isfinite(number):
        return str(number)
    return f"{number:.4g}"


def norm_figure(data: RunData):
    import plotly.graph_objects as go

    series = data.series
    steps = [int(step) for step in series.get("step", [])]
    column = lambda name: series.get(name) or [None] * len(steps)  # noqa: E731
    pre = [wire_float(value) for value in column("pre_norm")]
    pre_plot = [value if value is not None and math.isfinite(value) else None for value in pre]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=steps, y=pre_plot, mode="lines", name="pre-clip norm",
                             line=dict(color=COLORS["norm"], width=1)))
    threshold = [plottable(value) for value in column("threshold")]
    if any(value is not None for value in threshold):
        fig.add_trace(go.Scatter(x=steps, y=threshold, mode="lines", name="clip threshold",
                                 line=dict(color=COLORS["threshold"], dash="dash", shape="hv")))
    clipped = [(s, v) for s, c, v in zip(steps, column("clipped"), pre_plot) if c and v is not None]
    if clipped:
        fig.add_trace(go.Scatter(x=[s for s, _ in clipped], y=[v for _, v in clipped], mode="markers",
                                 name="clipped", marker=dict(color=COLORS["clipped"], size=5,
                                                             symbol="circle-open")))
    spikes = {s: v for s, flag, v in zip(steps, column("spike"), pre_plot) if flag}
    nonfinite = {s for s, flag, v in zip(steps, column("nonfinite"), pre) if flag or (v is not None and not math.isfinite(v))}
    for event in data.events:
        step = event_step(event)
        if step is None:  # a drop report may have no step; nothing to place on the chart
            continue
        if event.get("kind") == "spike":
            spikes.setdefault(step, plottable(event.get("value")))
        elif event.get("kind") == "nonfinite":
            nonfinite.add(step)
    if spikes:
        ordered = sorted(spikes)
        fig.add_trace(go.Scatter(x=ordered, y=[spikes[s] for s in ordered], mode="markers", name="spike",
                                 marker=dict(color=COLORS["spike"], size=10, symbol="x-thin",
                                             line=dict(width=2, color=COLORS["spike"]))))
    loss = [plottable(value) for value in column("loss")]
    if any(value is not None for value in loss):
        fig.add_trace(go.Scatter(x=steps, y=loss, mode="lines", name="loss", yaxis="y2",
                                 line=dict(color=COLORS["loss"], width=1), opacity=0.8))
    if nonfinite:
        xs: list = []
        ys: list = []
        for step in sorted(nonfinite):
            xs += [step, step, None]
            ys += [0, 1, None]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name="non-finite (NaN/Inf)", yaxis="y3",
                                 line=dict(color=COLORS["nonfinite"], width=1.5), hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=sorted(nonfinite), y=[0.97] * len(nonfinite), mode="markers",
                                 yaxis="y3", showlegend=False, name="non-finite step",
                                 marker=dict(color=COLORS["nonfinite"], size=10, symbol="triangle-down")))
    recommended = plottable(data.recommendation.get("threshold"))
    if recommended is not None:
        fig.add_hline(y=recommended, line=dict(color=COLORS["recommended"], dash="dot", width=1),
                      annotation_text=f"recommended {recommended:.4g}", annotation_position="top left")
    fig.update_layout(
        title=dict(text=f"Gradient norm: {plotly_text(data.run)}"), height=480, hovermode="closest",
        xaxis=dict(title=dict(text="step")), yaxis=dict(title=dict(text="pre-clip norm")),
        yaxis2=dict(title=dict(text="loss"), overlaying="y", side="right", showgrid=False),
        yaxis3=dict(overlaying="y", range=[0, 1], visible=False, fixedrange=True),
        legend=dict(orientation="h", y=1.02, yanchor="bottom", x=0),
        updatemenus=[dict(type="buttons", direction="left", x=1, xanchor="right", y=1.15, buttons=[
            dict(label="linear", method="relayout", args=[{"yaxis.type": "linear"}]),
            dict(label="log", method="relayout", args=[{"yaxis.type": "log"}]),
        ])],
    )
    return fig


def histogram_figure(data: RunData):
    import plotly.graph_objects as go

    edges = [float(edge) for edge in data.histogram.get("edges", [])]
    counts = [int(count) for count in data.histogram.get("counts", [])]
    fig = go.Figure()
    if len(edges) < 2:
        fig.update_layout(title=dict(text="Pre-clip norms: no finite norms"))
        return fig
    log_x = edges[0] > 0 and edges[-1] / edges[0] > 100 and \
        abs((edges[1] / edges[0]) - (edges[-1] / edges[-2])) < 1e-6 * (edges[1] / edges[0])
    fig.add_trace(go.Scatter(x=edges, y=counts + counts[-1:], mode="lines", name="pre-clip norms",
                             line=dict(shape="hv", color=COLORS["norm"]), fill="tozeroy"))
    percentiles = data.recommendation.get("percentiles") or data.stats.get("percentiles") or {}
    for key in ("p50", "p90", "p95", "p99"):
        value = plottable(percentiles.get(key))
        if value is not None and (value > 0 or not log_x):
            fig.add_vline(x=value, line=dict(color=COLORS["percentile"], dash="dot", width=1),
                          annotation_text=key, annotation_position="top")
    recommended = plottable(data.recommendation.get("threshold"))
    if recommended is not None:
        fig.add_vline(x=recommended, line=dict(color=COLORS["recommended"], width=3),
                      annotation_text=f"recommended {recommended:.4g}", annotation_position="top right")
    fig.update_layout(title=dict(text="Pre-clip norms, percentiles and the recommended threshold"), height=380,
                      xaxis=dict(title=dict(text="pre-clip norm"), type="log" if log_x else "linear"),
                      yaxis=dict(title=dict(text="steps")), showlegend=False)
    return fig


def tensor_figure(data: RunData):
    import plotly.graph_objects as go

    tensors = data.tensors or {}
    names = tensors.get("names") or []
    steps = tensors.get("step") or []
    if not names or not steps:
        return None
    z = []
    for row in tensors.get("norms", []):
        values = [wire_float(value) for value in row]
        z.append([math.log10(v) if v is not None and math.isfinite(v) and v > 0 else None for v in values])
    fig = go.Figure(go.Heatmap(x=steps, y=[plotly_text(name) for name in names], z=z, colorscale="Viridis",
                               colorbar=dict(title=dict(text="log10 norm"))))
    fig.update_layout(title=dict(text="Per-tensor norms (max per bucket of steps)"),
                      height=max(300, min(900, 120 + 16 * len(names))),
                      xaxis=dict(title=dict(text="step")), yaxis=dict(autorange="reversed"))
    return fig


# ----------------------------------------------------------------- HTML

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1200px; color: #222; padding: 0 16px; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; }
table { border-collapse: collapse; } td, th { padding: 3px 10px; border-bottom: 1px solid #ddd; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.figures td { border: none; padding: 2px 16px 2px 0; } .muted { color: #666; }
.rationale { background: #f3f7fa; border-left: 4px solid #17becf; padding: 8px 12px; }
.warn { color: #b00; font-weight: 600; }
"""


def _table(headers: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    head = "".join(f'<th class="{"num" if i in numeric else ""}">{html.escape(h)}</th>' for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f'<td class="{"num" if i in numeric else ""}">{html.escape(cell)}</td>'
                                   for i, cell in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _rate(value: Any) -> str:
    number = wire_float(value)
    return "–" if number is None or not math.isfinite(number) else f"{number:.2%}"


def render_report(data: RunData, url: str) -> str:
    import plotly.io as pio

    info, stats, rec = data.info, data.stats, data.recommendation
    percentiles = rec.get("percentiles") or stats.get("percentiles") or {}
    figures = [norm_figure(data), histogram_figure(data)]
    heatmap = tensor_figure(data)
    if heatmap is not None:
        figures.append(heatmap)
    charts = [pio.to_html(fig, full_html=False, include_plotlyjs=(index == 0), config={"displaylogo": False})
              for index, fig in enumerate(figures)]

    summary_rows = [
        ["steps", f"{info.get('steps', 0):,}"],
        ["first / last step", f"{info.get('first_step')} / {info.get('last_step')}"],
        ["clip rate", _rate(info.get("clip_rate", stats.get("clip_rate")))],
        ["spikes", str(info.get("spikes", "–"))],
        ["non-finite steps", str(info.get("nonfinite", stats.get("nonfinite", "–")))],
        ["p50 / p90 / p95 / p99 / p99.9", " / ".join(fmt(percentiles.get(k)) for k in ("p50", "p90", "p95", "p99", "p99.9"))],
        ["recommended threshold", fmt(rec.get("threshold"))],
        ["last update", str(info.get("updated", "–"))],
    ]
    candidates = [[str(c.get("label", "")), fmt(c.get("threshold")), _rate(c.get("clip_rate"))]
                  for c in rec.get("candidates", [])]
    events = [["–" if event_step(e) is None else str(event_step(e)), str(e.get("kind", "")), fmt(e.get("value")), fmt(e.get("threshold")),
               str(e.get("message") or ""), str(e.get("time") or "")] for e in data.events]
    warnings = "".join(f'<p class="warn">{html.escape(str(w))}</p>' for w in rec.get("warnings") or [])
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = f"gradwatch report: {data.run}"
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="muted">From {html.escape(url)}, {html.escape(generated)}. Offline file: plotly.js is embedded.</p>',
        '<table class="figures">' + "".join(f"<tr><td>{html.escape(k)}</td><td><b>{html.escape(v)}</b></td></tr>"
                                            for k, v in summary_rows) + "</table>",
        "<h2>Recommendation</h2>",
        f'<p class="rationale">{html.escape(str(rec.get("rationale") or ""))}</p>', warnings,
        _table(["candidate", "threshold", "would clip"], candidates, {1, 2}) if candidates else "",
        "<h2>Charts</h2>", *[f'<div class="chart">{chart}</div>' for chart in charts],
        f"<h2>Events (newest first{', first ' + str(EVENT_LIMIT) if len(events) >= EVENT_LIMIT else ''})</h2>",
        _table(["step", "kind", "norm", "threshold", "message", "time"], events, {0, 2, 3})
        if events else '<p class="muted">No events.</p>',
        "</body></html>",
    ]
    return "\n".join(parts)


def default_output(run: str) -> Path:
    return Path(re.sub(r"[^A-Za-z0-9_.-]", "_", run)[:100] + ".html")


def write_report(run: str, output: Path, url: str, token: str | None = None) -> Path:
    data = fetch_run(ApiClient(url, token), run)
    document = render_report(data, url)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(document, encoding="utf-8")
    return output


def write_report_from_args(args: argparse.Namespace) -> int:
    output = Path(args.output) if args.output else default_output(args.run)
    try:
        path = write_report(args.run, output, args.url, getattr(args, "token", None))
    except (ReportError, ApiError) as error:
        print(f"gradwatch report: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"gradwatch report: cannot write {output}: {error.strerror or error}", file=sys.stderr)
        return 1
    print(path)
    return 0

"""`gradwatch report RUN -o report.html`: a run's charts as one offline HTML file.

The report reads the same REST API as the dashboard (over HTTP with urllib, so
it works against any server, local or remote) and draws its charts with the
dashboard's own chart code: `dashboard/charts.js` and the modules it needs are
inlined into the file (each wrapped in a function, imports turned into plain
bindings), together with plotly.js (the shipped cartesian bundle, or the plotly
package's full one) and the run's data as JSON. One chart code for the page and
the report; the file needs no network to open.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from .client import ApiClient, ApiError, run_path

SERIES_POINTS = 4000
TENSOR_POINTS = 600
EVENT_LIMIT = 1000
# The dashboard modules the report runs, dependencies first.
MODULES = ("util.js", "columns.js", "series.js", "charts.js", "report.js")


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
    spikes: list
    nonfinite: list
    tensors: dict | None


# ----------------------------------------------------------------- fetching

def fetch_run(api: ApiClient, run: str) -> RunData:
    runs = api.get("/api/runs")
    runs = runs.get("items", []) if isinstance(runs, dict) else runs
    info = next((item for item in runs if item.get("name") == run), None)
    if info is None:
        known = ", ".join(repr(item.get("name")) for item in runs[:5])
        raise ReportError(f"no run named {run!r} at {api.url}" + (f" (runs: {known}{', ...' if len(runs) > 5 else ''})"
                                                                 if runs else " (it has no runs)"))
    # The same requests as the page: every column, the spike and NaN marks on their own.
    series = api.get(run_path(run, "/series"), points=SERIES_POINTS, fields="all")
    stats = api.get(run_path(run, "/stats"))
    recommendation = api.get(run_path(run, "/recommendation"))
    histogram = api.get(run_path(run, "/histogram"), bins=60)
    events = api.get(run_path(run, "/events"), limit=EVENT_LIMIT)
    spikes = api.get(run_path(run, "/events"), kind="spike", limit=EVENT_LIMIT)
    nonfinite = api.get(run_path(run, "/events"), kind="nonfinite", limit=EVENT_LIMIT)
    try:
        tensors = api.get(run_path(run, "/tensors"), points=TENSOR_POINTS, group="block")
    except ApiError:
        try:  # a server without groups: one row per tensor
            tensors = api.get(run_path(run, "/tensors"), points=TENSOR_POINTS)
        except ApiError:
            tensors = None  # the report is still useful without the heatmap
    return RunData(run, info, series, stats, recommendation, histogram, with_readable_times(events),
                   with_readable_times(spikes), with_readable_times(nonfinite), tensors)


def readable_time(stamp) -> str | None:
    """An event's Unix time as `2026-12-07 00:21:57 UTC` (None stays None; text stays as it is)."""
    import datetime as dt

    if isinstance(stamp, bool) or not isinstance(stamp, (int, float)) or stamp != stamp:
        return stamp if isinstance(stamp, str) else None
    moment = dt.datetime.fromtimestamp(float(stamp), dt.timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def with_readable_times(events: list) -> list:
    """The events with `time` as readable UTC text (the report's events table shows it as is)."""
    return [{**event, "time": readable_time(event.get("time"))} if isinstance(event, dict) else event
            for event in events]


# ----------------------------------------------------------------- scripts

_IMPORT = re.compile(r"import\s*\{([^}]*)\}\s*from\s*'\./([\w-]+)\.js';", re.S)
_EXPORT = re.compile(r"^export\s+((?:async\s+)?(?:function\*?|const|let|class))\s+(\w+)", re.M)


def _binding(module: str) -> str:
    return "__gradwatch_" + re.sub(r"\W", "_", module.removesuffix(".js"))


def inline_modules(names: tuple[str, ...] = MODULES) -> str:
    """The dashboard's ES modules as one classic script: each module body runs in its own
    function and returns its exports; `import {a} from './x.js'` becomes a binding."""
    from gradwatch.dashboard import STATIC_DIR

    parts = []
    for name in names:
        source = (Path(STATIC_DIR) / name).read_text(encoding="utf-8")
        exported = [match.group(2) for match in _EXPORT.finditer(source)]
        body = _IMPORT.sub(lambda m: f"const {{{' '.join(m.group(1).split())}}} = {_binding(m.group(2) + '.js')};", source)
        body = _EXPORT.sub(lambda m: f"{m.group(1)} {m.group(2)}", body)
        if re.search(r"^\s*(import|export)\b", body, re.M):
            raise ReportError(f"dashboard/{name}: an import or export the report cannot inline")
        parts.append(f"const {_binding(name)} = (() => {{\n{body}\nreturn {{ {', '.join(exported)} }};\n}})();")
    return "\n".join(parts)


def plotly_bundle() -> tuple[str, Path]:
    """(text, path) of plotly.js: the shipped cartesian bundle, else the plotly package's full one."""
    from gradwatch.dashboard import plotly_bundle_path

    path = plotly_bundle_path()
    if path is None:
        raise ReportError("no plotly.js bundle: dashboard/plotly-cartesian.min.js is missing and "
                          "the plotly package is not installed")
    return path.read_text(encoding="utf-8"), path


def _script_text(text: str) -> str:
    """Text that cannot end its <script> element early."""
    return re.sub(r"</(script)", r"<\\/\1", text, flags=re.I)


# ----------------------------------------------------------------- HTML

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1200px; padding: 0 16px;
  background: #0d1117; color: #d8dee9; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; }
table { border-collapse: collapse; } td, th { padding: 3px 10px; border-bottom: 1px solid #263040; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.muted { color: #8b97a8; }
.rationale { background: #161c24; border-left: 4px solid #3ddc97; padding: 8px 12px; }
.warn { color: #ff5c8a; font-weight: 600; }
"""


def _rate_text(rate) -> str:
    from .recommend import format_rate

    return format_rate(rate)


def figure_windows(data: RunData) -> list[str]:
    """One plain-text sentence per kind of figure in the report, saying over which steps it is:
    the recommended threshold's clip rate over the recommendation's window (the figure `gradwatch
    recommend` and the dashboard's headline give), the clean steps behind the percentiles and the
    candidates, and the whole run behind the run's own clip rate."""
    from .recommend import describe_span, rate_window

    rec, info = data.recommendation or {}, data.info or {}
    lines = []
    threshold = rec.get("threshold")
    span = rec.get("window") or {}
    if threshold is not None:
        lines.append(f"Recommended threshold {threshold:.4g}: it would have clipped "
                     f"{_rate_text(rec.get('clip_rate_raw'))} of the recommendation's window, "
                     f"{describe_span(rate_window(rec))}; 1.0 would have clipped "
                     f"{_rate_text(rec.get('clip_rate_at_1_raw'))} of the same steps.")
        lines.append(f"Clean window: the {span.get('clean_steps', 0):,} clean steps of steps "
                     f"{span.get('start', 0):,}–{span.get('end', 0):,} (spikes, non-finite and level-shift steps "
                     f"left out). The percentiles (p50 … p99.9), the histogram's percentile lines and the "
                     f"candidates' \u201cwould clip\u201d rates are over these clean steps; the threshold clips "
                     f"{_rate_text(rec.get('clip_rate_clean'))} of them.")
    elif rec.get("reason"):
        lines.append(f"No recommended threshold: {rec['reason']}.")
    if info.get("steps") is not None:
        lines.append(f"Whole run: {info['steps']:,} steps, {info.get('first_step', 0):,}–{info.get('last_step', 0):,}; "
                     f"the summary's clip rate ({_rate_text(info.get('clip_rate'))}, steps clipped at the run's own "
                     f"threshold), spikes and non-finite steps are over the whole run.")
    return lines


def render_report(data: RunData, url: str) -> str:
    import datetime as dt
    import html

    bundle, bundle_path = plotly_bundle()
    payload = json.dumps(asdict(data), allow_nan=False, separators=(",", ":")).replace("<", "\\u003c")
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = f"gradwatch report: {data.run}"
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="muted">From {html.escape(url)}, {html.escape(generated)}. Offline file: plotly.js '
        f'({html.escape(bundle_path.name)}) and the dashboard\'s chart code are embedded.</p>',
        '<div id="summary"></div>',
        "<h2>Which steps each figure is over</h2>",
        '<ul id="windows">' + "".join(f"<li>{html.escape(line)}</li>" for line in figure_windows(data)) + "</ul>",
        "<h2>Recommendation</h2>", '<p class="rationale" id="rationale"></p><div id="warnings"></div>',
        '<div id="candidates"></div>',
        '<div id="charts"></div>',
        f"<h2>Events (newest first{', first ' + str(EVENT_LIMIT) if len(data.events) >= EVENT_LIMIT else ''})</h2>",
        '<div id="events"></div>',
        f'<script type="application/json" id="gradwatch-data">{payload}</script>',
        f"<script>{_script_text(bundle)}</script>",
        f"<script>\n{_script_text(inline_modules())}\n</script>",
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

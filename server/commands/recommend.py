"""`gradwatch recommend RUN`: ask a running server for a clip-threshold recommendation."""
from __future__ import annotations

import argparse
import sys

from .client import ApiClient, ApiError, run_path


# The query parameters as the command line spells them (for errors in words).
FLAG_NAMES = {"window": "--window", "target_clip_rate": "--target-clip-rate", "optimizer": "--optimizer"}


def fetch_recommendation(url: str, run: str, window: int | None = None, target_clip_rate: float | None = None,
                         token: str | None = None, timeout: float = 30.0, optimizer: str | None = None) -> dict:
    return ApiClient(url, token, timeout, names=FLAG_NAMES).get(
        run_path(run, "/recommendation"), window=window or None,
        target_clip_rate=None if target_clip_rate is None else repr(target_clip_rate), optimizer=optimizer or None)


def format_rate(rate: float | None) -> str:
    """A clip rate as the dashboard writes it (`formatRate` in dashboard/util.js), so one figure
    reads the same on every surface: 0%, <0.01%, two decimals below 10%, one above; n/a for none."""
    if rate is None or rate != rate:
        return "n/a"
    percent = rate * 100
    if percent == 0:
        return "0%"
    if percent < 0.01:
        return "<0.01%"
    return f"{percent:.2f}%" if percent < 10 else f"{percent:.1f}%"


_rate = format_rate


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.6g}"


def _int(value) -> str:
    return "?" if value is None else f"{value:,}"


def rate_window(rec: dict) -> dict:
    """The steps the headline (raw) clip rate is over: `{start, end, steps}`, `steps` being the
    finite norms counted (None when the answer does not say). The recommendation's window (its
    finite steps from `window.start`), or from `clean_start` after a level shift; a server that
    names the span itself (`rate_window`) is taken at its word."""
    named = rec.get("rate_window") or rec.get("raw_window")
    if isinstance(named, dict) and named.get("start") is not None:
        return {"start": named.get("start"), "end": named.get("end"),
                "steps": named.get("finite", named.get("steps")),
                "after_level_shift": bool(named.get("after_level_shift"))}
    span = rec.get("window") or {}
    if rec.get("level_shift") and span.get("clean_start") is not None:
        return {"start": span["clean_start"], "end": span.get("end"), "steps": None, "after_level_shift": True}
    steps = span.get("steps")
    finite = None if steps is None else steps - int(rec.get("nonfinite_left_out") or 0)
    return {"start": span.get("start"), "end": span.get("end"), "steps": finite, "after_level_shift": False}


def describe_span(span: dict) -> str:
    """`steps 1,500–1,999 (500 finite steps)`: which steps a figure is over."""
    text = f"steps {_int(span.get('start'))}–{_int(span.get('end'))}"
    counted = [f"{span['steps']:,} finite steps"] if span.get("steps") is not None else []
    counted += ["since the level shift"] if span.get("after_level_shift") else []
    return text + (f" ({', '.join(counted)})" if counted else "")


def format_recommendation(run: str, rec: dict) -> str:
    """The threshold and the one clip rate it would have had over the recommendation's window
    (raw: every finite step of it), then the figures a user decides with, each saying over which
    steps it is (clean = the window with spikes, non-finite and level-shift steps left out),
    then the candidates."""
    threshold = rec.get("threshold")
    lines = [f"run {run}: recommended clip threshold " + (_number(threshold) if threshold is not None
                                                             else "(none)")]
    if threshold is None:
        lines += ["", rec.get("rationale", "")]
        if rec.get("reason"):
            lines.append(f"  reason: {rec['reason']}")
        return "\n".join(lines).rstrip()
    span = rec.get("window") or {}
    over = describe_span(rate_window(rec))
    clean = f"{_int(span.get('clean_steps'))} clean steps"
    lines += [f"it would have clipped {_rate(rec.get('clip_rate_raw'))} of the recommendation's window, {over}",
              "", rec.get("rationale", ""), ""]
    fields = [
        ("method", rec.get("method", "") + (f" (optimizer {rec['optimizer']})" if rec.get("optimizer") else "")),
        ("window", f"steps {_int(span.get('start'))}–{_int(span.get('end'))} ({_int(span.get('steps'))} steps, "
                   f"{clean} from {_int(span.get('clean_start'))})"),
        ("median norm", _number(rec.get("median")) + " (clean steps)"),
        ("threshold / median", _number(rec.get("ratio_to_median"))),
        ("clip rate, window", f"{_rate(rec.get('clip_rate_raw'))} of {over}"),
        ("clip rate, clean", _rate(rec.get("clip_rate_clean")) + f" (the window's {clean})"),
        ("current threshold", _number(rec.get("current_threshold"))),
        ("  its clip rate", f"{_rate(rec.get('current_clip_rate_raw'))} of the window, "
                            f"{_rate(rec.get('current_clip_rate_clean'))} of its clean steps"),
        ("clip rate at 1.0", f"{_rate(rec.get('clip_rate_at_1_raw'))} of the window, "
                             f"{_rate(rec.get('clip_rate_at_1_clean'))} of its clean steps"),
        ("left out", f"{rec.get('spikes_left_out', 0)} spikes, {rec.get('nonfinite_left_out', 0)} non-finite, "
                     f"{rec.get('transition_left_out', 0)} level-shift steps"),
        ("level shift", ", ".join(f"{s:,}" for s in rec.get("level_shift_steps", [])) or "none"),
    ]
    lines.extend(f"  {name:<19} {value}" for name, value in fields)
    for warning in rec.get("warnings", []):
        lines.append(f"  warning: {warning}")
    if rec.get("candidates"):
        lines += ["", f"  candidates (percentiles of the {clean}; clip rates over the window and its clean steps)",
                  f"  {'candidate':<14} {'threshold':>12} {'window':>9} {'clean':>9}"]
        for item in rec["candidates"]:
            lines.append(f"  {item['label']:<14} {item['threshold']:>12.6g} {_rate(item.get('clip_rate_raw')):>9} "
                         f"{_rate(item.get('clip_rate')):>9}")
    return "\n".join(lines)


def print_recommendation(args: argparse.Namespace) -> int:
    try:
        rec = fetch_recommendation(args.url, args.run, args.window, args.target_clip_rate, args.token,
                                   optimizer=getattr(args, "optimizer", None))
    except ApiError as error:
        print(f"gradwatch recommend: {error}", file=sys.stderr)
        return 1 if error.status is not None else 2
    print(format_recommendation(args.run, rec))
    return 0

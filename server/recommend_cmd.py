"""`gradwatch recommend RUN`: ask a running server for a clip-threshold recommendation."""
from __future__ import annotations

import argparse
import sys

from .client import ApiClient, ApiError, run_path


def fetch_recommendation(url: str, run: str, window: int | None = None, target_clip_rate: float | None = None,
                         token: str | None = None, timeout: float = 30.0) -> dict:
    return ApiClient(url, token, timeout).get(
        run_path(run, "/recommendation"), window=window or None,
        target_clip_rate=None if target_clip_rate is None else repr(target_clip_rate))


def _rate(value) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.6g}"


def format_recommendation(run: str, rec: dict) -> str:
    """The sentence first, then the numbers a user decides with, then the candidates
    (all computed on the clean window; the raw window's rate beside it)."""
    threshold = rec.get("threshold")
    lines = [f"run {run}: recommended clip threshold " + (_number(threshold) if threshold is not None
                                                             else "(none)"),
             "", rec.get("rationale", ""), ""]
    if threshold is None:
        if rec.get("reason"):
            lines.append(f"  reason: {rec['reason']}")
        return "\n".join(lines).rstrip()
    span = rec.get("window") or {}
    fields = [
        ("method", rec.get("method", "")),
        ("median norm", _number(rec.get("median"))),
        ("threshold / median", _number(rec.get("ratio_to_median"))),
        ("clip rate, clean", _rate(rec.get("clip_rate_clean"))),
        ("clip rate, raw", _rate(rec.get("clip_rate_raw"))),
        ("current threshold", _number(rec.get("current_threshold"))),
        ("  its clip rate", f"{_rate(rec.get('current_clip_rate_clean'))} clean, "
                            f"{_rate(rec.get('current_clip_rate_raw'))} raw"),
        ("clip rate at 1.0", f"{_rate(rec.get('clip_rate_at_1_clean'))} clean, "
                             f"{_rate(rec.get('clip_rate_at_1_raw'))} raw"),
        ("window", f"steps {span.get('start')}-{span.get('end')} ({span.get('steps')} steps, "
                   f"{span.get('clean_steps')} clean)"),
        ("left out", f"{rec.get('spikes_left_out', 0)} spikes, {rec.get('nonfinite_left_out', 0)} non-finite, "
                     f"{rec.get('transition_left_out', 0)} level-shift steps"),
        ("level shift", ", ".join(str(s) for s in rec.get("level_shift_steps", [])) or "none"),
    ]
    lines.extend(f"  {name:<19} {value}" for name, value in fields)
    for warning in rec.get("warnings", []):
        lines.append(f"  warning: {warning}")
    if rec.get("candidates"):
        lines += ["", f"  {'candidate':<14} {'threshold':>12} {'clean':>9} {'raw':>9}"]
        for item in rec["candidates"]:
            lines.append(f"  {item['label']:<14} {item['threshold']:>12.6g} {_rate(item.get('clip_rate')):>9} "
                         f"{_rate(item.get('clip_rate_raw')):>9}")
    return "\n".join(lines)


def print_recommendation(args: argparse.Namespace) -> int:
    try:
        rec = fetch_recommendation(args.url, args.run, args.window, args.target_clip_rate, args.token)
    except ApiError as error:
        print(f"gradwatch recommend: {error}", file=sys.stderr)
        return 1 if error.status is not None else 2
    print(format_recommendation(args.run, rec))
    return 0

"""`gradwatch recommend RUN`: ask a running server for a clip-threshold recommendation."""
from __future__ import annotations

import argparse
import sys

from .client import ApiClient, ApiError, run_path


def fetch_recommendation(url: str, run: str, window: int | None = None, target_clip_rate: float = 0.01,
                         token: str | None = None, timeout: float = 30.0) -> dict:
    return ApiClient(url, token, timeout).get(run_path(run, "/recommendation"), window=window or None,
                                              target_clip_rate=repr(target_clip_rate))


def format_recommendation(run: str, rec: dict) -> str:
    lines = [f"run {run}: recommended clip threshold "
             + (f"{rec['threshold']:.6g}" if rec.get("threshold") is not None else "(none)"),
             "", rec.get("rationale", ""), ""]
    if rec.get("candidates"):
        lines.append(f"  {'candidate':<14} {'threshold':>12} {'clip rate':>10}")
        for item in rec["candidates"]:
            lines.append(f"  {item['label']:<14} {item['threshold']:>12.6g} {item['clip_rate']:>10.2%}")
    return "\n".join(lines)


def print_recommendation(args: argparse.Namespace) -> int:
    try:
        rec = fetch_recommendation(args.url, args.run, args.window, args.target_clip_rate, args.token)
    except ApiError as error:
        print(f"gradwatch recommend: {error}", file=sys.stderr)
        return 1 if error.status is not None else 2
    print(format_recommendation(args.run, rec))
    return 0

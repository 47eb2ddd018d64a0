"""`gradwatch recommend RUN`: ask a running server for a clip-threshold recommendation."""
from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request


def fetch_recommendation(url: str, run: str, window: int | None = None, target_clip_rate: float = 0.01,
                         token: str | None = None, timeout: float = 30.0) -> dict:
    query = {"target_clip_rate": repr(target_clip_rate)}
    if window:
        query["window"] = str(window)
    address = (f"{url.rstrip('/')}/api/runs/{urllib.parse.quote(run, safe='')}/recommendation?"
               + urllib.parse.urlencode(query))
    request = urllib.request.Request(address, headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        return json.loads(answer.read())


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
    except urllib.error.HTTPError as error:
        try:
            detail = json.loads(error.read()).get("detail")
        except Exception:
            detail = error.reason
        print(f"gradwatch recommend: {error.code}: {detail}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as error:
        print(f"gradwatch recommend: cannot reach {args.url}: {getattr(error, 'reason', error)}", file=sys.stderr)
        return 2
    print(format_recommendation(args.run, rec))
    return 0

"""`gradwatch push DIR`: upload what a run left in its spool folder.

    python -m gradwatch.agent.push gradwatch-spool/tiny-gpt --url http://127.0.0.1:8765

Replays the spool in order through the same sender the agent uses, moves
the acknowledged position forward as the server acks (so a second push
sends nothing again; and if it did, the server stores nothing twice: it
keeps one row per (run, step)), and prints what the server answered.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .buffer import RecordBuffer
from .sender import Sender
from .stats import Stats
from .spool import Position, Spool, SpoolBusy
from .transport import WebSocketTransport
from .wire import load_payload

DEFAULT_URL = "http://127.0.0.1:8765"


class PushError(RuntimeError):
    """Something the user can act on; printed as one line."""


def _run_name(spool: Spool, meta_file: dict | None) -> str:
    if meta_file and isinstance(meta_file.get("run"), str):
        return meta_file["run"]
    for frame in spool.read(Position(0, 0), max_frames=16):
        if frame.payload:
            return load_payload(frame.payload)["run"]
    raise PushError(f"{spool.directory} holds no run name (no meta.json and no readable batch)")


def push(directory: str | os.PathLike, url: str = DEFAULT_URL, token: str | None = None,
         timeout: float = 600.0, max_failures: int = 5) -> tuple[str, Stats]:
    """Upload the spool in `directory`; returns (run, the sender's counts)."""
    path = Path(directory)
    if not path.is_dir():
        raise PushError(f"{path} is not a folder")
    spool = Spool(path)
    try:
        spool.open()
    except SpoolBusy as error:
        raise PushError(f"{error} (is the run still going?)") from None
    meta_file = spool.read_json("meta.json")
    run = _run_name(spool, meta_file)
    sender = Sender(run, RecordBuffer(1, wake_at=1), spool, WebSocketTransport(url, token),
                    backoff_base=0.2, backoff_cap=2.0)
    if meta_file and isinstance(meta_file.get("meta"), dict):
        sender.set_meta(meta_file["meta"])
    drops = spool.read_json("drops.json") or {}
    if drops:
        sender.report_drops(drops)
    sender.start()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            stats = sender.stats
            if stats.refused:
                raise PushError(stats.refused)
            if sender.failures >= max_failures:
                raise PushError(f"cannot reach {url} (tried {sender.failures} times)")
            if sender.delivered():
                break
            time.sleep(0.05)
        else:
            raise PushError(f"push did not finish within {timeout:.0f} s")
        if drops:
            (path / "drops.json").unlink(missing_ok=True)
    finally:
        sender.stop(timeout=5.0)
    return run, sender.stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gradwatch push", description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="spool folder of a run (e.g. gradwatch-spool/RUN)")
    parser.add_argument("--url", default=os.environ.get("GRADWATCH_URL", DEFAULT_URL))
    parser.add_argument("--token", default=os.environ.get("GRADWATCH_TOKEN"), help="write token")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    args = parser.parse_args(argv)
    try:
        run, stats = push(args.dir, args.url, args.token, args.timeout)
    except PushError as error:
        print(f"gradwatch push: {error}", file=sys.stderr)
        return 1
    print(f"gradwatch push: run {run!r}: {stats.sent} step(s) sent, {stats.accepted} stored, "
          f"{stats.duplicates} duplicate(s), {stats.conflicts} conflict(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

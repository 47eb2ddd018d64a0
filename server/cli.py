"""The `gradwatch` command line.

One entry point for every subcommand. Each handler is a thin function that
imports its implementation lazily, so `gradwatch --help` stays fast and a
missing optional piece fails only the subcommand that needs it.

`server/` never imports `agent/` or `clip/` (see DESIGN.md): subcommands that
need the agent (`push`, the training part of `demo`) run it as a separate
process with `python -m gradwatch.agent...`.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Sequence

from gradwatch.server.settings import DEFAULT_DB, DEFAULT_MAX_BODY

DEFAULT_PORT = 8765
DEFAULT_HOST = "127.0.0.1"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradwatch",
        description="Gradient-norm monitoring, clipping and threshold recommendations for MLX.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the server (API, ingest, dashboard)")
    serve.add_argument("--db", default=os.environ.get("GRADWATCH_DB", DEFAULT_DB),
                       help="SQLAlchemy database URL (default: %(default)s)")
    serve.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default: %(default)s)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s)")
    serve.add_argument("--token", default=os.environ.get("GRADWATCH_TOKEN"),
                       help="write token guarding ingest (env GRADWATCH_TOKEN)")
    serve.add_argument("--read-token", default=os.environ.get("GRADWATCH_READ_TOKEN"),
                       help="read token guarding reads and the dashboard (env GRADWATCH_READ_TOKEN)")
    serve.add_argument("--max-body", type=int, default=DEFAULT_MAX_BODY,
                       help="largest accepted request body in bytes (default: %(default)s)")
    serve.add_argument("--workers", type=int, default=1,
                       help="uvicorn worker processes (use with PostgreSQL; default: %(default)s)")
    serve.set_defaults(handler=_serve)

    demo = commands.add_parser("demo", help="serve and train a small MLX model with the agent attached")
    demo.add_argument("--steps", type=positive_int, default=2000, help="training steps (default: %(default)s)")
    demo.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s)")
    demo.add_argument("--db", default="sqlite:///gradwatch-demo.db",
                      help="SQLAlchemy database URL (default: %(default)s)")
    demo.add_argument("--exit", action="store_true", help="stop once the run is stored")
    demo.set_defaults(handler=_demo)

    recommend = commands.add_parser("recommend", help="print the clip-threshold recommendation for a run")
    recommend.add_argument("run", help="run name")
    recommend.add_argument("--url", default=os.environ.get("GRADWATCH_URL", f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"))
    recommend.add_argument("--token", default=os.environ.get("GRADWATCH_READ_TOKEN"), help="read token")
    recommend.add_argument("--window", type=int, default=None, help="last N steps (default: whole run)")
    recommend.add_argument("--target-clip-rate", type=float, default=0.01)
    recommend.set_defaults(handler=_recommend)

    push = commands.add_parser("push", help="upload what an agent left in its spool folder")
    push.add_argument("dir", help="spool folder of a run")
    push.add_argument("--url", default=os.environ.get("GRADWATCH_URL", f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"))
    push.add_argument("--token", default=os.environ.get("GRADWATCH_TOKEN"), help="write token")
    push.set_defaults(handler=_push)

    report = commands.add_parser("report", help="write a run's charts as one offline HTML file")
    report.add_argument("run", help="run name")
    report.add_argument("-o", "--output", default=None, help="output file (default: RUN.html)")
    report.add_argument("--url", default=os.environ.get("GRADWATCH_URL", f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"))
    report.add_argument("--token", default=os.environ.get("GRADWATCH_READ_TOKEN"), help="read token")
    report.set_defaults(handler=_report)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from gradwatch.server.serve import serve_from_args

    return serve_from_args(args)


def _demo(args: argparse.Namespace) -> int:
    from gradwatch.server.demo import run_demo

    return run_demo(args)


def _recommend(args: argparse.Namespace) -> int:
    from gradwatch.server.recommend_cmd import print_recommendation

    return print_recommendation(args)


def _push(args: argparse.Namespace) -> int:
    command = [sys.executable, "-m", "gradwatch.agent.push", args.dir, "--url", args.url]
    if args.token:
        command += ["--token", args.token]
    return subprocess.call(command)


def _report(args: argparse.Namespace) -> int:
    from gradwatch.server.report import write_report_from_args

    return write_report_from_args(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

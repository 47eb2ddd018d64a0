"""The `gradwatch` command line.

One entry point for every subcommand. Each handler is a thin function that
imports its implementation lazily, so `gradwatch --help` stays fast and a
missing optional piece fails only the subcommand that needs it.

`server/` never imports `agent/` or `clip/` (docs/architecture.md): subcommands that
need the agent (`push`, the training part of `demo`) run it as a separate
process with `python -m gradwatch.agent...`.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from typing import Sequence

from pydantic_core import PydanticUndefined

from gradwatch.server.app.settings import DEFAULT_PORT, SERVE_FLAGS, ClientSettings, Settings


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per `Settings` field, its help, variable and default taken from the field.
    A flag not given is None, so only the flags given reach `settings_from_args`."""
    for field, flag in SERVE_FLAGS.items():
        info = Settings.model_fields[field]
        shown = "not set" if info.default in (None, [], PydanticUndefined) or info.default_factory else info.default
        repeatable = {"action": "append"} if info.default_factory is list else {}
        kind = {int: int, float: float, float | None: float}.get(info.annotation, str)
        parser.add_argument(flag, type=kind, default=None,
                            metavar=flag[2:].replace("-", "_").upper(), **repeatable,
                            help=f"{info.description} (env {Settings.env_name(field)}; default: {shown})")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with the flags given on the command line on top."""
    given = {field: getattr(args, flag[2:].replace("-", "_"), None) for field, flag in SERVE_FLAGS.items()}
    return Settings(**{field: value for field, value in given.items() if value is not None})


def installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gradwatch")
    except PackageNotFoundError:
        return "(not installed)"


def _server_options(parser: argparse.ArgumentParser, client, kind: str) -> None:
    """`--url` and the `kind` ("read" or "write") `--token`, with their environment defaults."""
    parser.add_argument("--url", default=client.url, help="server address (env GRADWATCH_URL; default: %(default)s)")
    if kind == "write":
        parser.add_argument("--token", default=client.token, help="write token (env GRADWATCH_TOKEN)")
    else:
        parser.add_argument("--token", default=client.read_token, help="read token (env GRADWATCH_READ_TOKEN)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradwatch",
        description="Gradient-norm monitoring, clipping and threshold recommendations for MLX.",
    )
    parser.add_argument("--version", action="version", version=f"gradwatch {installed_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    client = ClientSettings()

    serve = commands.add_parser(
        "serve", help="run the server (API, ingest, dashboard)",
        description="Run the server. Every flag also reads a GRADWATCH_* variable (named in its help); "
                    "a flag given wins over the variable, the variable over the default.")
    add_settings_flags(serve)
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
    _server_options(recommend, client, "read")
    recommend.add_argument("--window", type=int, default=None,
                           help="last N steps, at least 100 (default: the last 10%% of the run, at least 500, at most 20,000)")
    recommend.add_argument("--target-clip-rate", type=float, default=None,
                           help="optional: the (1 - rate) quantile of the clean window instead of the robust rule")
    recommend.add_argument("--optimizer", default=None,
                           help="the run's optimizer by name, e.g. Lion (default: what the run's meta says); "
                                "a sign-based one gets the clean window's 1st percentile")
    recommend.set_defaults(handler=_recommend)

    push = commands.add_parser("push", help="upload what an agent left in its spool folder")
    push.add_argument("dir", help="spool folder of a run")
    _server_options(push, client, "write")
    push.set_defaults(handler=_push)

    delete = commands.add_parser("delete", help="delete a run: its steps, tensor norms, events (write token)")
    delete.add_argument("run", help="run name")
    _server_options(delete, client, "write")
    delete.add_argument("-y", "--yes", action="store_true", help="delete without asking")
    delete.set_defaults(handler=_delete)

    report = commands.add_parser("report", help="write a run's charts as one offline HTML file")
    report.add_argument("run", help="run name")
    report.add_argument("-o", "--output", default=None, help="output file (default: RUN.html)")
    _server_options(report, client, "read")
    report.set_defaults(handler=_report)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from gradwatch.server.commands.serve import serve_from_args

    return serve_from_args(args)


def _demo(args: argparse.Namespace) -> int:
    from gradwatch.server.commands.demo import run_demo

    return run_demo(args)


def _recommend(args: argparse.Namespace) -> int:
    from gradwatch.server.commands.recommend import print_recommendation

    return print_recommendation(args)


def _push(args: argparse.Namespace) -> int:
    command = [sys.executable, "-m", "gradwatch.agent.push", args.dir, "--url", args.url]
    if args.token:
        command += ["--token", args.token]
    return subprocess.call(command)


def _delete(args: argparse.Namespace) -> int:
    from gradwatch.server.commands.client import ApiClient, ApiError, run_path

    api = ApiClient(args.url, args.token)
    if not args.yes and not confirm_delete(api, args.run):
        print("gradwatch delete: nothing deleted (answer y, or pass --yes to delete without asking)",
              file=sys.stderr)
        return 1
    try:
        answer = api.delete(run_path(args.run))
    except ApiError as error:
        print(f"gradwatch delete: {error}", file=sys.stderr)
        return 1
    print(f"deleted run {answer['deleted']!r}: {answer['steps']} steps, {answer['tensor_norms']} "
          f"steps of tensor norms, {answer['events']} events")
    return 0


def confirm_delete(api, run: str) -> bool:
    """Ask on the terminal (stdin) whether to delete `run`, saying what it holds when the
    server tells (a write token may not read: then the question names the run only).
    True for an answer starting with y, or a run the server does not know; end of input is a no."""
    from gradwatch.server.commands.client import ApiError, run_path

    try:
        entry = api.get(run_path(run))
        holds = f" ({entry.get('steps', 0):,} steps, steps {entry.get('first_step')}–{entry.get('last_step')})"
    except ApiError as error:
        if error.status == 404:
            return True  # nothing to lose: the delete itself says the run is unknown
        holds = ""
    print(f"delete run {run!r}{holds} from {api.url} with its tensor norms and events? [y/N] ",
          end="", flush=True)
    try:
        answer = input()
    except EOFError:
        print()
        return False
    return answer.strip().lower().startswith("y")


def _report(args: argparse.Namespace) -> int:
    from gradwatch.server.commands.report import write_report_from_args

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

"""The `gradwatch` command line and what its subcommands run.

- `cli`: the entry point (`gradwatch = "gradwatch.server.commands.cli:main"`), every subcommand;
- `serve`, `workers`: `gradwatch serve` (`--workers N`: one uvicorn process per socket);
- `demo`: `gradwatch demo` (the server and `python -m gradwatch.agent.demo` as child processes);
- `report`: `gradwatch report RUN -o FILE`; `recommend`: `gradwatch recommend RUN`;
- `client`: the small REST client `recommend`, `report`, `demo` and `delete` share.

`gradwatch push` runs `python -m gradwatch.agent.push` (the server never imports the agent).
Nothing is imported here at package import, so `python -m gradwatch.server.commands.cli` runs
the module once.
"""
from __future__ import annotations

import importlib

_PUBLIC = {"main": "cli"}   # name -> module of this room; loaded on first use
__all__ = ["main"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

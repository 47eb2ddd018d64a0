"""Alerts: webhook posts on non-finite steps, spikes, level shifts and sustained clipping.

Ingest hands each stored batch to `AlertDispatcher.submit` and goes on; the rules, the rate limit
and the posts (retried, bounded) run on the dispatcher's own thread (`dispatch`). Several servers
on one database send each alert once (`DatabaseClaims`). Reads storage's rows, posts to the
network; nothing of HTTP serving.
"""
from __future__ import annotations

import importlib

_PUBLIC = {"Alert": "dispatch", "AlertDispatcher": "dispatch", "AlertRules": "dispatch", "DatabaseClaims": "dispatch"}   # name -> module of this room; loaded on first use
__all__ = ["Alert", "AlertDispatcher", "AlertRules", "DatabaseClaims"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

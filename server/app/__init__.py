"""The HTTP app: `create_app(settings)`, its routes, the edge, the live feed, settings.

- `factory`: `create_app(settings)` wires the store, the live hub, the alert dispatcher and the
  routers together, and nothing else;
- `routes/`: one `APIRouter` per file, thin handlers with typed dependencies (`routes/deps.py`);
- `security`: tokens, allowed hosts and origins, body-size and byte budgets (the edge);
- `live`: the live hub behind `/ws/live/{run}` (and PostgreSQL's LISTEN between workers);
- `settings`: one pydantic-settings class per side, every `GRADWATCH_*` variable;
- `warmup`, `malloc`: a started server's first reads and its memory handed back to the OS.

Arrows: routes -> analysis -> storage; the wire decodes what arrives. Nothing here is imported
by `analysis` or `storage`.
"""
from __future__ import annotations

import importlib

_PUBLIC = {"create_app": "factory", "Settings": "settings"}   # name -> module of this room; loaded on first use
__all__ = ["create_app", "Settings"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

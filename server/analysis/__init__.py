"""Analysis of stored numbers: statistics, spike rules, the recommendation, derived events,
tensor groups. Numbers in, plain dicts out; nothing of HTTP (no web framework, nothing of the app
room: tests/test_rooms.py checks).

- `diagnostics`: spikes, level shifts and loss spikes on stored norms, and *the* recommendation
  (`diagnostics.recommend`: the robust rule over a recent window of clean steps; the only place
  a threshold is computed);
- `stats`: window statistics (percentiles, clip rates, what-if, histogram, drift) and the
  API's recommendation answer (`stats.recommend` adds the fields around `diagnostics.recommend`);
- `derived_events`: events derived at read time (level shifts, skipped steps, loss spikes);
- `tensor_groups`: per-tensor norms grouped by module path, with their own spike counts.
"""
from __future__ import annotations

import importlib

_PUBLIC = {"recommend": "diagnostics", "robust_spikes": "diagnostics", "window_stats": "stats"}   # name -> module of this room; loaded on first use
__all__ = ["recommend", "robust_spikes", "window_stats"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

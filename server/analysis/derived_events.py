"""Events the server derives at read time from a run's cached step arrays.

`level_shift` (the server's robust rule on the stored norms, or the agent's
`level_shift` column), `skipped` (the `skipped` column) and `loss_spike` (the
robust rule on the stored loss, linked to the gradient spikes just before it,
see `diagnostics.loss_spikes`). Derived on read, like clip events, so that runs
sent over HTTP, runs with `detectors=[]` and old runs get them too, and a
better rule changes old runs' answers without a migration. The work is done
once per cached version of the run's arrays (rows are never overwritten); the
server's own rules cover the last `SERVER_RULE_SPAN` steps (see there).
"""
from __future__ import annotations

import math
import threading

import numpy as np

from gradwatch.server.analysis import diagnostics
from gradwatch.server.storage.serialise import encode_float
from gradwatch.server.storage.reads import merge_newest_first

DERIVED_KINDS = ("level_shift", "skipped", "loss_spike")
COLUMNS_NEEDED = ("pre_norm", "threshold", "loss", "spike", "time", "skipped", "level_shift")
_ATTRIBUTE = "_gradwatch_derived_events"
# The server's robust rules are a Python loop (about 50 µs a step): they run over the last
# SERVER_RULE_SPAN steps of a run, fed the SERVER_RULE_LEAD steps before as history, so an
# events read stays well under a second however long the run. The `skipped` and agent
# `level_shift` columns are read over the whole run.
SERVER_RULE_SPAN = 10_000
SERVER_RULE_LEAD = 400
_lock = threading.Lock()


def _column(arrays, name: str) -> np.ndarray:
    values = arrays.values.get(name)
    return values if values is not None else np.full(len(arrays.steps), np.nan)


def _event(arrays, index: int, kind: str, message: str, detail: dict | None = None) -> dict:
    value = float(arrays.values["pre_norm"][index])
    threshold = float(_column(arrays, "threshold")[index])
    stamp = float(_column(arrays, "time")[index])
    item = {"step": int(arrays.steps[index]), "kind": kind, "value": encode_float(value),
            "threshold": None if math.isnan(threshold) and _absent(arrays, "threshold", index)
            else encode_float(threshold),
            "message": message, "time": None if math.isnan(stamp) else stamp}
    if detail is not None:
        item["detail"] = detail
    return item


def _absent(arrays, name: str, index: int) -> bool:
    missing = arrays.missing.get(name)
    return name not in arrays.values or (missing is not None and bool(missing[index]))


def compute(arrays) -> list[dict]:
    """Every derived event of the run, newest first (within a step: level_shift, skipped, loss_spike)."""
    steps = arrays.steps
    norms = arrays.values["pre_norm"]
    n = len(steps)
    first = max(n - SERVER_RULE_SPAN, 0)       # the server's rules report from here on ...
    lead = max(first - SERVER_RULE_LEAD, 0)    # ... with the steps before as their history
    found = diagnostics.robust_spikes(norms[lead:])
    server_shift = np.zeros(n, bool)
    server_shift[first:] = found.level_shift[first - lead:]
    grad_spike = np.zeros(n, bool)
    grad_spike[lead:] = found.spike
    agent_shift = _column(arrays, "level_shift") == 1.0
    events: list[tuple[int, int, dict]] = []
    for index in np.flatnonzero(server_shift | agent_shift).tolist():
        sources = [name for name, flag in (("server", server_shift[index]), ("agent", agent_shift[index]))
                   if flag]
        message = (f"level shift at step {int(steps[index]):,}: the norms moved to a new regime "
                   f"(pre-clip norm {float(norms[index]):.4g})")
        events.append((index, 0, _event(arrays, index, "level_shift", message, {"source": sources})))
    for index in np.flatnonzero(_column(arrays, "skipped") == 1.0).tolist():
        message = f"optimizer step {int(steps[index]):,} skipped (pre-clip norm {float(norms[index]):.4g})"
        events.append((index, 1, _event(arrays, index, "skipped", message)))
    loss = _column(arrays, "loss")
    loss_missing = arrays.missing.get("loss") if "loss" in arrays.values else np.ones(len(steps), bool)
    known = np.ones(n, bool) if loss_missing is None else ~loss_missing
    known[:lead] = False
    if known.any():
        grad_steps = steps[grad_spike | (_column(arrays, "spike") == 1.0)]
        for spike in diagnostics.loss_spikes(steps[known], loss[known], grad_steps.tolist()):
            index = int(np.searchsorted(steps, spike["step"]))
            if index < first:
                continue
            item = _event(arrays, index, "loss_spike", spike["message"], spike["detail"])
            item["value"] = encode_float(float(loss[index]))  # a loss spike's value is the loss
            events.append((index, 2, item))
    events.sort(key=lambda entry: (-entry[0], entry[1]))
    return [item for _, _, item in events]


def derived(arrays) -> list[dict]:
    """`compute(arrays)`, kept on the cached arrays object (one computation per version)."""
    cached = getattr(arrays, _ATTRIBUTE, None)
    if cached is None:
        with _lock:
            cached = getattr(arrays, _ATTRIBUTE, None)
            if cached is None:
                cached = compute(arrays)
                setattr(arrays, _ATTRIBUTE, cached)
    return cached


def merged_events(store, run: str, kind: str | None, limit: int) -> list[dict]:
    """The stored and clip events (`store.events`) with the derived ones, newest first, at most `limit`.

    A derived event is left out when a stored event of the same kind names the
    same step (an agent may send them itself). Within a step the derived
    events come after the stored ones; events without a step sort as the
    database sorts NULL (last in SQLite, first in PostgreSQL), as in `store.events`.
    """
    run_id = store.run_id(run)
    stored = store.events(run_id, kind, limit)
    if kind is not None and kind not in DERIVED_KINDS:
        return stored
    arrays = store.arrays(run, COLUMNS_NEEDED)
    seen = {(item["kind"], item["step"]) for item in stored}
    extra = [item for item in derived(arrays)
             if (kind is None or item["kind"] == kind) and (item["kind"], item["step"]) not in seen]
    return merge_newest_first(stored, extra, not store.reader.is_postgres)[:limit]

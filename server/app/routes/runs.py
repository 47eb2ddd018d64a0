"""Runs: the list (paged), one run, a run's series, events, per-tensor norms, CSV export, delete.

Lists say when they were cut the same way as `/series` (`X-Total-Steps`):
`X-Total-Count` is how many there are, `X-Next-Cursor` (runs) the cursor of
the next page, `X-Truncated: true` (events) that the limit cut the answer.
"""
from __future__ import annotations

import base64
import json
import re
from typing import Literal

import numpy as np
from fastapi import APIRouter, Query
from pydantic import create_model
from fastapi.responses import Response, StreamingResponse

from gradwatch.server.analysis import derived_events, tensor_groups
from gradwatch.server.app.routes.deps import READ, WRITE, RunName, StoreDep, check_range, json_response
from gradwatch.server.storage.registry import COLUMNS, LIVE_FIELDS, EVENT_KIND_NAMES
from gradwatch.server.wire import MAX_STEP, BatchError
from gradwatch.server.wire.responses import DeletedOut, EventOut, RunOut, SeriesOut, TensorsOut
from gradwatch.server.storage.serialise import encode_floats
from gradwatch.server.storage import UnknownRun, csv_lines, encode_series

router = APIRouter(tags=["runs"])
EventKind = Literal[EVENT_KIND_NAMES]  # type: ignore[valid-type]


def series_fields(fields: str | None) -> tuple[str, ...]:
    """`?fields=`: default the live feed's columns, 'all' every column, else the names given."""
    if not fields:
        return LIVE_FIELDS[1:]
    if fields.strip() == "all":
        return COLUMNS[1:]
    wanted = tuple(dict.fromkeys(f.strip() for f in fields.split(",") if f.strip()))
    for name in wanted:
        if name not in COLUMNS:
            raise BatchError(f"unknown field '{name}' in fields; choose from {', '.join(COLUMNS)}")
    return wanted


# A run in the list: the counters, without `meta` (tensor names and shapes: GET /api/runs/{run}).
RunSummaryOut = create_model("RunSummaryOut", **{name: (info.annotation, ...)
                                                 for name, info in RunOut.model_fields.items() if name != "meta"})


def encode_cursor(run: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps([run["updated"], run["name"]]).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        decoded = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if isinstance(decoded, list) and len(decoded) == 2 and all(isinstance(part, str) for part in decoded):
            return decoded[0], decoded[1]
    except ValueError:  # not base64, not UTF-8, not JSON (binascii.Error and UnicodeDecodeError are ValueErrors)
        pass
    raise BatchError(f"cursor {cursor[:40]!r} is not one this server gave (take it from X-Next-Cursor)")


@router.get("/api/runs", dependencies=READ, response_model=list[RunSummaryOut])
def list_runs(store: StoreDep, limit: int | None = Query(None, ge=1, le=100_000, description="at most this "
                                                         "many runs; all when left out"),
              cursor: str | None = Query(None, description="X-Next-Cursor of the previous page")) -> Response:
    """Runs, most recently updated first (ties by name), without `meta`. Paged by a keyset
    cursor (updated, name): a run updated between two pages moves to the front and is not
    repeated or skipped among the others. Headers: `X-Total-Count`, `X-Next-Cursor` when cut."""
    runs = sorted(sorted(store.list_runs(), key=lambda run: run["name"]), key=lambda run: run["updated"],
                  reverse=True)
    total = len(runs)
    if cursor:
        updated, name = decode_cursor(cursor)
        runs = [run for run in runs if run["updated"] < updated or (run["updated"] == updated and run["name"] > name)]
    headers = {"X-Total-Count": str(total)}
    if limit is not None and len(runs) > limit:
        runs = runs[:limit]
        headers["X-Next-Cursor"] = encode_cursor(runs[-1])
    for run in runs:
        run.pop("meta", None)
    return json_response(runs, headers=headers)


@router.get("/api/runs/{run}", dependencies=READ, response_model=RunOut)
def get_run(name: RunName, store: StoreDep) -> Response:
    """One run: the list's counters plus `meta` (config, clipper, tensor names and shapes)."""
    store.run_id(name)  # 404 for an unknown run
    found = next((run for run in store.list_runs() if run["name"] == name), None)
    if found is None:
        raise UnknownRun(name)
    return json_response(found)


@router.delete("/api/runs/{run}", dependencies=WRITE, response_model=DeletedOut)
def delete_run(name: RunName, store: StoreDep) -> Response:
    """Remove a run: its steps, per-tensor norms, events and cached arrays (write token)."""
    removed = store.delete_run(name)
    return json_response({"deleted": name, "steps": removed["steps"], "tensor_norms": removed["tensor_norms"],
                          "events": removed["events"]})


@router.get("/api/runs/{run}/series", dependencies=READ, response_model=SeriesOut)
def series(name: RunName, store: StoreDep, fields: str | None = Query(
               None, description="comma-separated columns, or 'all'; default: step, pre_norm, post_norm, "
                                 "threshold, clipped, loss, spike, nonfinite (the live feed's columns)"),
           start: int | None = Query(None, ge=0, le=MAX_STEP), end: int | None = Query(None, ge=0, le=MAX_STEP),
           points: int = Query(2000, ge=2, le=10_000_000)) -> Response:
    """Columnar series; downsampled to about `points` rows by per-bucket min/max of the
    pre-clip norm, always keeping spikes and non-finite steps; never sampled."""
    check_range(start, end)
    wanted = series_fields(fields)
    found = store.overview(store.run_id(name), start, end, points, tuple(n for n in wanted if n != "step"))
    body = encode_series(found.steps, found.values, found.missing, tuple(wanted))
    return json_response(body, headers={"X-Total-Steps": str(found.total),
                                        "X-Downsampled": "true" if found.downsampled else "false"})


@router.get("/api/runs/{run}/events", dependencies=READ, response_model=list[EventOut])
def events(name: RunName, store: StoreDep,
           kind: EventKind | None = Query(None, description="one kind of event; all when left out"),
           limit: int = Query(1000, ge=1, le=100_000)) -> Response:
    """Newest first, at most `limit`; `X-Total-Count` (all of that kind) and `X-Truncated`.
    `threshold_kind` says what `threshold` is: 'clip' (the clip threshold of the step, for
    clip and spike events), 'detector' (a detector's bound), 'alert' (an alert rule's), or null."""
    run_id = store.run_id(name)
    rows = derived_events.merged_events(store, name, kind, limit + 1)  # one more: was it cut?
    truncated = len(rows) > limit
    rows = rows[:limit]
    for row in rows:
        row["threshold_kind"] = threshold_kind(row)
    total = max(count_events(store, run_id, kind), len(rows) + truncated)
    return json_response(rows, headers={"X-Total-Count": str(total),
                                        "X-Truncated": "true" if truncated else "false"})


def threshold_kind(event: dict) -> str | None:
    detail = event.get("detail") or {}
    if isinstance(detail, dict) and detail.get("threshold_kind") in ("clip", "detector", "alert"):
        return detail["threshold_kind"]
    if event.get("threshold") is None:
        return None
    return {"clip": "clip", "spike": "clip", "alert": "alert"}.get(event["kind"], "detector")


def count_events(store, run_id: int, kind: str | None) -> int:
    """Stored events of the kind plus, for 'clip' or all kinds, the clipped steps (clip
    events are read from the steps, see `Reader.events`)."""
    if kind == "clip":
        stored = 0
    elif kind:
        stored = store.reader.read("SELECT COUNT(*) FROM events WHERE run_id = ? AND kind = ?", (run_id, kind))[0][0]
    else:
        stored = store.reader.read("SELECT COUNT(*) FROM events WHERE run_id = ?", (run_id,))[0][0]
    clips = 0 if kind not in (None, "clip") else \
        store.reader.read("SELECT clips FROM runs WHERE id = ?", (run_id,))[0][0] or 0
    return int(stored) + int(clips)


@router.get("/api/runs/{run}/tensors", dependencies=READ, response_model=TensorsOut)
def tensors(name: RunName, store: StoreDep, start: int | None = Query(None, ge=0, le=MAX_STEP),
            end: int | None = Query(None, ge=0, le=MAX_STEP),
            points: int = Query(500, ge=1, le=100_000),
            group: Literal["block", "module", "tensor"] = Query(
                "tensor", description="rows: one per tensor, or per module path (block `layers.N`, "
                "module `layers.N.mlp`), each the per-step L2 of its tensors' norms")) -> Response:
    """Per-tensor norms, one row per tensor (or per group); downsampled by the max per bucket of steps."""
    check_range(start, end)
    if group != "tensor":  # per-step norms first: a group's norm is not a max of bucket maxima
        body = tensor_groups.grouped_json(store, store.run_id(name), start, end, group, points)
        return Response(body, media_type="application/json")
    names, steps, norms, absent = store.tensor_norms(store.run_id(name), start, end, points)
    rows = [encode_floats(np.asarray(norms[:, i], dtype=np.float64), absent[:, i]) for i in range(len(names))]
    return json_response({"names": names, "step": steps.tolist(), "norms": rows})


@router.get("/api/runs/{run}/export.csv", dependencies=READ)
def export_csv(name: RunName, store: StoreDep) -> StreamingResponse:
    parts = store.reader.iter_steps(store.run_id(name))
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:100]
    return StreamingResponse(csv_lines(parts), media_type="text/csv; charset=utf-8",
                             headers={"Content-Disposition": f'attachment; filename="{safe}.csv"'})

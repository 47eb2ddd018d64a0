"""Statistics: percentiles, the recommended threshold, what-if, histogram (numbers in `stats`)."""
from __future__ import annotations

from typing import Literal

import numpy as np
from fastapi import APIRouter, Query
from fastapi.responses import Response

from gradwatch.server.analysis import diagnostics, stats
from gradwatch.server.app.routes.deps import READ, RunName, StoreDep, json_response
from gradwatch.server.wire import BatchError
from gradwatch.server.wire.responses import HistogramOut, RecommendationOut, StatsOut, WhatIfOut
from gradwatch.server.storage import RunArrays

router = APIRouter(tags=["statistics"], dependencies=READ)
Window = Query(None, ge=1, description="the last N steps; the whole run when left out")


def window_of(arrays: RunArrays, window: int | None) -> slice:
    return slice(max(len(arrays.steps) - window, 0), None) if window else slice(None)


@router.get("/api/runs/{run}/stats", response_model=StatsOut)
def run_stats(name: RunName, store: StoreDep, window: int | None = Window) -> Response:
    arrays = store.arrays(name, ("pre_norm", "clipped", "nonfinite"))
    part = window_of(arrays, window)
    result = stats.window_stats(arrays.values["pre_norm"][part], arrays.values["clipped"][part],
                                arrays.values["nonfinite"][part])
    steps = arrays.steps[part]
    result["first_step"] = int(steps[0]) if len(steps) else None
    result["last_step"] = int(steps[-1]) if len(steps) else None
    return json_response(result)


def recent_norms(store, name: str, window: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int | None]:
    """(steps, pre_norm, threshold, window) the recommendation needs: the window and the 400 steps
    before it (the robust rule's history), read from the newest chunks only. A million-step
    run's recommendation then reads ~20,000 steps, not the run. The whole run when it is
    short, or when the tail has no clip threshold to report (an older one may exist)."""
    run_id = store.run_id(name)
    count = store.reader.run_size(run_id)
    size = window if window is not None else diagnostics.default_window(count)
    if size >= diagnostics.MIN_WINDOW and count > size + diagnostics.HISTORY_BEFORE_WINDOW:
        need = size + diagnostics.HISTORY_BEFORE_WINDOW
        steps, values, _ = store.fetch_steps(run_id, newest=need)
        if len(steps) >= need and np.isfinite(values["threshold"][-need:]).any():
            return steps[-need:], values["pre_norm"][-need:], values["threshold"][-need:], size
    arrays = store.arrays(name, ("pre_norm", "threshold"))
    return arrays.steps, arrays.values["pre_norm"], arrays.values["threshold"], window


def optimizer_of(meta: dict) -> str | None:
    """The optimizer's name a run's meta holds: `optimizer` (what `GradWatch(optimizer=...)` sends),
    else `config.optimizer` (a user's config); a dict's `name` or `type`; None when neither."""
    config = meta.get("config")
    for value in (meta.get("optimizer"), config.get("optimizer") if isinstance(config, dict) else None):
        if isinstance(value, dict):
            value = value.get("name") or value.get("type")
        if isinstance(value, str) and value.strip():
            return value.strip()[:100]
    return None


@router.get("/api/runs/{run}/recommendation", response_model=RecommendationOut)
def recommendation(name: RunName, store: StoreDep,
                   window: int | None = Query(None, ge=100, description=(
                       "the last N steps, at least 100; default the last 10% of the run, at least 500 "
                       "and at most 20,000 steps (the whole run when shorter)")),
                   target_clip_rate: float | None = Query(None, ge=0.0, lt=1.0, description=(
                       "optional, in [0, 1): the threshold becomes the (1 - rate) quantile of the "
                       "clean window instead of the robust rule")),
                   optimizer: str | None = Query(None, min_length=1, max_length=100, description=(
                       "the run's optimizer by name (e.g. Lion); default: the run's meta `optimizer` "
                       "(GradWatch(optimizer=...)) or `config.optimizer`. A sign-based one (Lion, "
                       "signSGD) gets the clean window's 1st percentile (docs/diagnostics.md)"))) -> Response:
    """The clip threshold for the run: the robust rule on a recent window of clean steps
    (docs/diagnostics.md). 422 for a window below 100 or a rate outside [0, 1); a run with
    too few clean steps answers 200 with `threshold: null` and the `reason`."""
    steps, pre_norm, threshold, size = recent_norms(store, name, window)
    if optimizer is None:
        optimizer = optimizer_of(store.meta_of(name))
    try:
        answer = stats.recommend(steps, pre_norm, threshold, window=size, target_clip_rate=target_clip_rate,
                                 optimizer=optimizer)
    except ValueError as error:
        raise BatchError(str(error)) from None
    return json_response(answer)


@router.get("/api/runs/{run}/whatif", response_model=WhatIfOut)
def whatif(name: RunName, store: StoreDep,
           threshold: float = Query(..., gt=0, allow_inf_nan=False,
                                    description="the clip threshold to try, a finite number above 0"),
           over: Literal["window", "run", "last"] = Query("window", description=(
               "`window` (default): the recommendation's rate window, the steps its raw clip rates "
               "are over (from its window's start, or from the first clean step after a level "
               "shift); `run`: the whole run; `last`: the last `window` steps")),
           window: int | None = Query(None, ge=1, description=(
               "with over=window the recommendation's window (at least 100 steps; default as the "
               "recommendation's); with over=last the last N steps"))) -> Response:
    """The clip rate `threshold` would have had: the fraction of the finite pre-clip norms
    strictly above it, over the steps `window` names. The same threshold over the same steps
    gives the recommendation's `clip_rate_raw` / candidates' `clip_rate_raw` exactly."""
    if over == "window":
        if window is not None and window < diagnostics.MIN_WINDOW:
            raise BatchError(f"window must be at least {diagnostics.MIN_WINDOW} steps with over=window "
                             f"(the recommendation's minimum), got {window}; use over=last for fewer")
        steps, pre_norm, clip, size = recent_norms(store, name, window)
        try:
            result = stats.recommend(steps, pre_norm, clip, window=size)
        except ValueError as error:
            raise BatchError(str(error)) from None
        norms, span = stats.rate_span(steps, pre_norm, result)
        answer = stats.whatif(norms, threshold)
        answer["window"] = {key: span[key] for key in ("start", "end", "steps")}
    else:
        if over == "last" and window is None:
            raise BatchError("over=last needs window=N (the last N steps)")
        arrays = store.arrays(name, ("pre_norm",))
        part = window_of(arrays, window if over == "last" else None)
        answer = stats.whatif(arrays.values["pre_norm"][part], threshold)
        answer["window"] = stats.covered(arrays.steps[part])
    answer["over"] = over
    return json_response(answer)


@router.get("/api/runs/{run}/histogram", response_model=HistogramOut)
def histogram(name: RunName, store: StoreDep, window: int | None = Window,
              bins: int = Query(60, ge=1, le=1000)) -> Response:
    arrays = store.arrays(name, ("pre_norm",))
    part = window_of(arrays, window)
    answer = stats.histogram(arrays.values["pre_norm"][part], bins)
    answer["window"] = stats.covered(arrays.steps[part])
    return json_response(answer)

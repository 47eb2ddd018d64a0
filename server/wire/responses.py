"""The JSON shapes the API answers with (the response models).

They document the responses in OpenAPI (`/docs`); handlers build plain dicts. What
arrives is decoded and validated by the rest of this room (docs/wire.md).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


# ----- response shapes (documentation in OpenAPI; handlers return plain JSON) -----

JsonFloat = float | str | None


class IngestAnswer(BaseModel):
    accepted: int
    duplicates: int
    conflicts: int


class RunOut(BaseModel):
    name: str
    steps: int
    first_step: int | None
    last_step: int | None
    created: str
    updated: str
    clip_rate: float | None
    clips: int
    spikes: int
    nonfinite: int
    meta: dict[str, Any]


class EventOut(BaseModel):
    step: int | None
    kind: str
    value: JsonFloat
    threshold: JsonFloat
    message: str
    time: JsonFloat
    detail: dict[str, Any] | None = None
    threshold_kind: Literal["clip", "detector", "alert"] | None = None  # what `threshold` is


class StatsOut(BaseModel):
    count: int
    finite: int
    percentiles: dict[str, float | None]
    clip_rate: float | None
    nonfinite: int
    first_step: int | None
    last_step: int | None
    mean: float | None
    std: float | None
    min: float | None
    max: float | None


class Candidate(BaseModel):
    label: str
    threshold: float
    clip_rate: float | None = Field(description="fraction of the clean window's norms above it")
    clip_rate_raw: float | None = Field(None, description="fraction of the rate window's finite norms above it")
    over: str = "clean window"
    over_raw: str | None = Field(None, description="the steps `clip_rate_raw` is over (the rate window)")


class Drift(BaseModel):
    start_median: float | None
    recent_median: float | None
    window_median: float | None
    change: float | None
    warning: str | None


class StepSpan(BaseModel):
    """Which steps an answer covers."""
    start: int | None
    end: int | None
    steps: int


class RecommendationWindow(StepSpan):
    clean_steps: int
    clean_start: int | None


class RateWindow(StepSpan):
    """The steps every `*_raw` clip rate is over: from `window.start`, or from `clean_start`
    after a level shift; `finite` of them count."""
    finite: int
    after_level_shift: bool


class CleanWindow(BaseModel):
    start: int | None
    end: int | None
    steps: int
    excluded: int


class RecommendationOut(BaseModel):
    """The recommendation (docs/wire.md): `threshold` null with a `reason` when there are too
    few clean steps; percentiles and candidates are over the clean window."""
    threshold: float | None
    reason: str | None
    method: Literal["robust", "target_clip_rate", "sign-based"]
    optimizer: str | None = Field(None, description="the optimizer it assumed (the request's `optimizer`, else "
                                                    "the run's meta); a sign-based one changes the method")
    k: float
    target_clip_rate: float | None
    median: float | None
    ratio_to_median: float | None
    clip_rate_clean: float | None
    clip_rate_raw: float | None
    current_threshold: float | None
    current_clip_rate_clean: float | None
    current_clip_rate_raw: float | None
    clip_rate_at_1_clean: float | None
    clip_rate_at_1_raw: float | None
    spikes_left_out: int
    nonfinite_left_out: int
    transition_left_out: int
    backward_left_out: int = Field(0, description="steps the backward (burst-aware) pass left out")
    burst_count: int = 0
    burst_steps_left_out: int = 0
    bursts_left_out: list[StepSpan] = Field(default_factory=list, description="the newest bursts left out")
    level_shift: bool
    level_shift_steps: list[int]
    rationale: str
    window: RecommendationWindow
    rate_window: RateWindow | None = None
    percentiles_over: str
    percentiles: dict[str, float | None]
    candidates: list[Candidate]
    count: int
    clean_window: CleanWindow
    drift: Drift
    warnings: list[str]


class WhatIfOut(BaseModel):
    """`clipped` of the `count` finite norms in `window` lie above `threshold`; `over` says which
    steps: "window" (the recommendation's rate window) or "run" (the whole run)."""
    threshold: float
    count: int
    clipped: int
    clip_rate: float | None
    window: StepSpan
    over: Literal["window", "run", "last"] = "window"


class HistogramOut(BaseModel):
    edges: list[float]
    counts: list[int]
    log: bool
    count: int
    window: StepSpan


class TensorsOut(BaseModel):
    names: list[str]
    step: list[int]
    norms: list[list[JsonFloat]]


class DeletedOut(BaseModel):
    deleted: str
    steps: int
    tensor_norms: int
    events: int


class HealthOut(BaseModel):
    status: str
    database: str
    schema_version: int
    parse_budget: dict[str, int] | None = Field(
        None, description="ingest bodies being parsed: waiting, holders, bytes, capacity")


# A series: the columns asked for, equal-length lists (floats may be "NaN"/"Infinity"/"-Infinity").
SeriesOut = dict[str, list[int | float | str | bool | None]]

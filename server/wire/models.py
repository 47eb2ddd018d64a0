"""What a decoded ingest body becomes: the validated `Batch`, its `Column`s, an
`IngestMessage`, the `BatchError` every refusal is, and the wire's limits."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_STEP = 2**53 - 1   # the largest step: every step is exact as a float64 (JSON numbers, numpy reads)
MAX_RUN_NAME = 200
MAX_JSON_DEPTH = 32          # nesting of `meta` and an event's `detail`
MAX_META_BYTES = 64 * 1024   # one message's `meta`, as JSON
MAX_DETAIL_BYTES = 16 * 1024  # one event's `detail`, as JSON
MAX_EVENTS = 10_000          # events in one message
MAX_TENSOR_NAME = 1000       # characters in one tensor name
NORM_FIELDS = ("pre_norm", "post_norm")  # norms: >= 0, or NaN/+Infinity (data), never negative


class BatchError(ValueError):
    """A batch that can never be accepted; the message names the field. `seq`: the message's
    sequence number, when a WebSocket message is refused (for the error reply)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status
        self.seq: Any = None


@dataclass
class Column:
    """One validated value column.

    `values`: float64 from JSON (bool columns 0.0/1.0, NaN where null); from the binary
    encoding, the typed array as sent, a view of the body's bytes (float32 or float64 for a
    float column, bool for a bool column). `missing` marks nulls (None when there are none).
    """

    values: np.ndarray
    missing: np.ndarray | None = None
    raw: list | None = None   # the decoded JSON list, when it held only plain numbers/bools


@dataclass
class Batch:
    steps: np.ndarray                      # int64, unique, >= 0
    columns: dict[str, Column]             # only the columns sent
    tensor_names: list[str] | None = None
    tensor_norms: np.ndarray | None = None  # float32, (steps, names)

    def __len__(self) -> int:
        return len(self.steps)


@dataclass
class IngestMessage:
    """One validated `/ws/ingest` message."""

    seq: Any
    run: str
    batch: Batch | None
    meta: dict | None
    events: list[dict] | None

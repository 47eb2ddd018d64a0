"""The step columns and event kinds, declared once.

Everything on the server that lists step columns derives it from `STEP_COLUMNS`
here: the chunk codec's column spec (`storage/chunk_rows.SPEC`), batch
validation, series and live encoding, CSV. `tests/test_server_registry.py`
holds the agent's column list (`agent/wire.py`, which must not import the
server) and the dashboard's (`dashboard/columns.js`) to it.

Adding a step column:
1. append a `StepColumn` to `STEP_COLUMNS` (append only: `NAN_BITS`, a float
   column's position among the floats, is how schemas up to 4 told a NaN from a
   missing value; revision 0005 keeps its own copy);
2. nothing in the tables: a column is a row of `chunk_columns` per chunk, and
   chunks stored before it read it as all missing;
3. add the name to `agent/wire.py` and `dashboard/columns.js`.

Adding an event kind: append an `EventKind` to `EVENT_KINDS`.

Non-finite floats: on the wire and in CSV a float may be the string "NaN",
"Infinity" or "-Infinity" (`NONFINITE_SPELLING`); a chunk column keeps NaN and
±Inf as floats and missing values in a validity bitmap (`server/storage/chunks/codec.py`),
so a missing value stays apart from a NaN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

ColumnType = Literal["int", "float", "bool"]

# How the wire (and CSV) spells the values JSON has no number for.
NONFINITE_SPELLING = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
NONFINITE_STRINGS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


@dataclass(frozen=True)
class StepColumn:
    """One column of a step record.

    `optional`: a batch may leave it out, and a value may be null (missing).
    `nonfinite`: how NaN/Inf travel: "strings" (NONFINITE_SPELLING) for floats,
    None where the type has no non-finite values.
    `live`: sent to dashboards on `/ws/live` and in the default `series`.
    """

    name: str
    type: ColumnType
    optional: bool = True
    live: bool = False
    doc: str = ""

    @property
    def nonfinite(self) -> str | None:
        return "strings" if self.type == "float" else None


STEP_COLUMNS: tuple[StepColumn, ...] = (
    StepColumn("step", "int", optional=False, live=True, doc="training step, 0 to 2**53 - 1, unique per run"),
    StepColumn("pre_norm", "float", optional=False, live=True, doc="gradient norm before clipping"),
    StepColumn("post_norm", "float", live=True, doc="gradient norm after clipping"),
    StepColumn("scale", "float", doc="factor the gradients were multiplied by"),
    StepColumn("threshold", "float", live=True, doc="clip threshold in force"),
    StepColumn("clipped", "bool", live=True, doc="the clipper changed the gradients"),
    StepColumn("loss", "float", live=True, doc="training loss"),
    StepColumn("lr", "float", doc="learning rate"),
    StepColumn("z", "float", doc="spike detector score (z-score or ratio)"),
    StepColumn("ema", "float", doc="spike detector running mean"),
    StepColumn("spike", "bool", live=True, doc="the detector flagged a spike"),
    StepColumn("nonfinite", "bool", live=True, doc="a gradient was NaN or infinite"),
    StepColumn("time", "float", doc="wall-clock seconds since the epoch"),
    StepColumn("skipped", "bool", doc="the optimizer step was skipped"),
    StepColumn("robust_z", "float", doc="robust spike detector score (median/MAD of log norms)"),
    StepColumn("level_shift", "bool", doc="the robust detector declared a level shift at this step"),
)


@dataclass(frozen=True)
class EventKind:
    """A kind of event. `needs_step`: an event of this kind names its step.
    `derived`: made by the server from the step columns (never stored for `clip`)."""

    name: str
    needs_step: bool
    derived: bool = False
    doc: str = ""


EVENT_KINDS: tuple[EventKind, ...] = (
    EventKind("clip", True, derived=True, doc="a clipped step (read from the steps, not stored)"),
    EventKind("spike", True, derived=True, doc="a gradient-norm spike"),
    EventKind("nonfinite", True, derived=True, doc="a NaN or infinite gradient norm"),
    EventKind("conflict", False, derived=True, doc="a step re-sent with different values"),
    EventKind("drop", False, doc="the agent dropped records (detail: counts by reason)"),
    EventKind("level_shift", True, doc="the robust detector declared a new regime"),
    EventKind("skipped", True, doc="the optimizer step was skipped"),
    EventKind("loss_spike", True, doc="a spike in the loss"),
    EventKind("alert", False, doc="an alert was raised"),
)

# ----- derived views (use these; never write the lists out again) -----

COLUMNS: tuple[str, ...] = tuple(column.name for column in STEP_COLUMNS)
VALUE_COLUMNS: tuple[str, ...] = COLUMNS[1:]
COLUMN_TYPES: dict[str, ColumnType] = {column.name: column.type for column in STEP_COLUMNS}
FLOAT_FIELDS: tuple[str, ...] = tuple(c.name for c in STEP_COLUMNS if c.type == "float")
BOOL_FIELDS: tuple[str, ...] = tuple(c.name for c in STEP_COLUMNS if c.type == "bool")
REQUIRED_FIELDS: tuple[str, ...] = tuple(c.name for c in STEP_COLUMNS if not c.optional)
LIVE_FIELDS: tuple[str, ...] = tuple(c.name for c in STEP_COLUMNS if c.live)
NAN_BITS: dict[str, int] = {name: 1 << index for index, name in enumerate(FLOAT_FIELDS)}
EVENT_KIND_NAMES: tuple[str, ...] = tuple(kind.name for kind in EVENT_KINDS)
STEP_EVENT_KINDS: tuple[str, ...] = tuple(kind.name for kind in EVENT_KINDS if kind.needs_step)


def column(name: str) -> StepColumn:
    """The registry entry of `name`; KeyError when there is none."""
    for entry in STEP_COLUMNS:
        if entry.name == name:
            return entry
    raise KeyError(name)


def value_columns(names) -> tuple[str, ...]:
    """`names` (any iterable of value-column names) in registry order."""
    wanted = set(names)
    return tuple(name for name in VALUE_COLUMNS if name in wanted)

"""What the sender thread adds to a step record before it is encoded: the host half of a lean step.

The training graph of a lean step holds only what the step needs (`recorder.Lean`):
the pre-clip norm, the clip scale, the squared tensor norms, loss and learning
rate. Here, one step late and off the training thread, on numbers already read:

- the columns that are exact functions of those: `post_norm = pre_norm·scale`,
  `threshold` (the clipper's constant), `clipped = scale < 1`, `nonfinite`, and the
  tensor norms as the roots of their squares (float32 as the graph would give them:
  IEEE products and square roots are correctly rounded on both sides);
- the default spike detector, `gradwatch.clip.spike_rule.RobustRule` (the rule the
  server's diagnostics run; the in-graph `RobustDetector` is the same rule as MLX
  ops), with its wire columns `robust_z`, `level_shift` and `spike`.

Records whose layout is not lean (other clippers) keep their columns and get the
detector's columns added when the host detector is on.
"""
from __future__ import annotations

import struct
from typing import Any, Sequence

import numpy as np

from gradwatch.clip.spike_rule import RobustRule

from .recorder import Layout, StepRecord

DETECTOR_COLUMNS = ("robust_z", "level_shift", "spike")


def host_rule_config(rule: RobustRule) -> dict[str, Any]:
    """The host detector as the run's metadata names it (as `RobustDetector.config()`, plus where)."""
    return {"name": "robust", **rule.config(), "where": "host"}


def _columns(verdict) -> tuple[float, bool, bool]:
    """A verdict as the values of DETECTOR_COLUMNS."""
    return verdict.score, verdict.level_shift, verdict.spike


class HostStage:
    """Completes records in the sender thread: `complete(records)` returns records whose
    layouts are plain (no `lean`), with the host detector's columns when `rule` is set."""

    def __init__(self, rule: RobustRule | None = None):
        self.rule = rule
        self._layouts: dict[int, tuple[Layout, Layout]] = {}  # id(layout) -> (it, the full one)
        self._added: dict[int, tuple[int, ...]] = {}  # id(layout) -> which DETECTOR_COLUMNS it gets

    def needed(self, records: Sequence[StepRecord]) -> bool:
        return self.rule is not None or any(record.layout.lean is not None for record in records)

    def complete(self, records: Sequence[StepRecord]) -> list[StepRecord]:
        """`records` completed, in order; a record whose values do not fit its layout (a bug
        upstream, never the user's) is left out: the caller counts it as dropped."""
        if not records or not self.needed(records):
            return list(records)
        records = [record for record in records if len(record.values) == 4 * record.layout.width]
        verdicts = None
        if self.rule is not None:   # in step order, across layouts
            update = self.rule.update
            unpack = struct.unpack_from
            verdicts = np.array([_columns(update(unpack("<f", record.values, 0)[0])) for record in records],
                                dtype=np.float64).reshape(len(records), 3)
        out: list[StepRecord] = []
        start = 0
        while start < len(records):
            layout = records[start].layout
            stop = start + 1
            while stop < len(records) and records[stop].layout is layout:
                stop += 1
            part = records[start:stop]
            out.extend(self._complete_run(part, layout, None if verdicts is None else verdicts[start:stop]))
            start = stop
        return out

    def _full_layout(self, layout: Layout) -> Layout:
        known = self._layouts.get(id(layout))
        if known is not None and known[0] is layout:
            return known[1]
        columns = list(layout.columns)
        if layout.lean is not None:
            rest = columns[2:] if layout.lean.threshold is not None else columns[1:]
            columns = ["pre_norm", "post_norm", "scale"]
            if layout.lean.threshold is not None:
                columns.append("threshold")
            columns += ["clipped", "nonfinite"] + rest
        added: tuple[int, ...] = ()
        if self.rule is not None:   # (the host detector runs only where no detector in the graph named these)
            added = tuple(index for index, name in enumerate(DETECTOR_COLUMNS) if name not in columns)
            columns += [DETECTOR_COLUMNS[index] for index in added]
        full = Layout(tuple(columns), layout.tensor_names, layout.extra_columns)
        self._added[id(layout)] = added
        self._layouts[id(layout)] = (layout, full)
        return full

    def _complete_run(self, records: Sequence[StepRecord], layout: Layout,
                      verdicts: np.ndarray | None) -> list[StepRecord]:
        full = self._full_layout(layout)
        count, width = len(records), layout.width
        rows = np.frombuffer(b"".join(record.values for record in records), dtype="<f4").reshape(count, width)
        named = len(layout.columns)
        pieces: list[np.ndarray] = []
        lean = layout.lean
        if lean is not None:
            pre = rows[:, 0]
            if lean.threshold is not None:
                scale = rows[:, 1]
                with np.errstate(invalid="ignore", over="ignore"):
                    post = pre * scale
                clipped = scale < 1
                rest = rows[:, 2:named]
                derived = [pre, post, scale, np.full(count, lean.threshold, dtype=np.float32), clipped]
            else:
                rest = rows[:, 1:named]
                derived = [pre, pre, np.ones(count, np.float32), np.zeros(count, bool)]
            derived.append(~np.isfinite(pre))
            pieces.append(np.column_stack(derived).astype("<f4", copy=False))
            pieces.append(rest)
        else:
            pieces.append(rows[:, :named])
        added = self._added[id(layout)]
        if verdicts is not None and added:
            pieces.append(verdicts[:, list(added)].astype("<f4"))
        tensors = rows[:, named:]
        if lean is not None and tensors.shape[1]:
            tensors = np.sqrt(tensors)
        pieces.append(tensors)
        block = np.ascontiguousarray(np.hstack(pieces), dtype="<f4")
        data = block.tobytes()
        size = 4 * full.width
        return [StepRecord(record.step, record.time, full, data[index * size:(index + 1) * size], record.extras)
                for index, record in enumerate(records)]

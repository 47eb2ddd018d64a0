"""From lazy clip results to plain numbers, one step late.

`Recorder.build` is the pure, lazy part of a step: it runs the clipper and
the detectors and packs every scalar of the step (norms, scale, flags,
detector scores, loss, learning rate, per-tensor norms) into ONE float32
vector. The returned gradients are tied to that vector and to the new
clipper/detector state with `mx.depends`, so the user's own
`mx.eval(model.parameters(), ...)` computes them in the same graph
evaluation as the update: the agent adds no evaluation of its own.

`Recorder.take` runs on the next step (or at flush): the vector is already
computed, and one `memoryview` copy turns it into a `StepRecord` of bytes.

Which numbers a vector holds (its `Layout`) depends on the gradient tree
and on whether `loss`/`lr` were arrays. Under `mx.compile`, `build` runs as
Python only while tracing a new input shape, so the Python side cannot know
which trace produced a given vector. The vector says it itself: its last
value is the id of its layout, a constant baked into each trace.
"""
from __future__ import annotations

import struct
import time
from typing import Any, NamedTuple, Sequence

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from gradwatch.clip import norms_and_global


class Layout(NamedTuple):
    """What the numbers of a record are: `columns` (wire names of the first values),
    then one value per name in `tensor_names`; `extra_columns` name the Python
    values recorded beside the vector (a float learning rate, say)."""

    columns: tuple[str, ...]
    tensor_names: tuple[str, ...]
    extra_columns: tuple[str, ...] = ()

    @property
    def width(self) -> int:
        return len(self.columns) + len(self.tensor_names)


class StepRecord(NamedTuple):
    """One step as plain data: what the training thread hands to the sender."""

    step: int
    time: float
    layout: Layout
    values: bytes  # float32, little-endian, `layout.width` of them
    extras: tuple = ()

    def floats(self) -> tuple[float, ...]:
        return struct.unpack(f"<{self.layout.width}f", self.values)

    def value(self, column: str) -> float:
        if column in self.layout.extra_columns:
            return float(self.extras[self.layout.extra_columns.index(column)])
        return struct.unpack_from("<f", self.values, 4 * self.layout.columns.index(column))[0]


class RecordError(ValueError):
    """A record vector that matches no layout this recorder built (a bug, never user error)."""


class NonFiniteGradientError(FloatingPointError):
    """The pre-clip gradient norm was NaN or infinite and the clipper's policy is "raise"."""

    def __init__(self, step: int, pre_norm: float, run: str):
        self.step, self.pre_norm, self.run = step, pre_norm, run
        super().__init__(f"gradwatch: non-finite gradient norm ({pre_norm}) at step {step} of run "
                         f"{run!r} (clipper nonfinite='raise'); the step is recorded and was sent")


class _Pending(NamedTuple):
    step: int
    time: float
    vector: mx.array
    extras: dict[str, float]


class Recorder:
    """Builds a step's lazy vector, keeps it until the next step, converts it then."""

    def __init__(self, clipper: Any = None, detectors: Sequence[Any] = (), tensor_norms: bool = True,
                 skip_spikes: bool = False):
        self.clipper = clipper
        self.detectors = list(detectors)
        self.skip_spikes = skip_spikes
        self.skip_index: int | None = None  # where "skipped" sits in the record vector
        self.tensor_norms = tensor_norms
        self._layout_ids: dict[Layout, int] = {}
        self._layouts: list[Layout] = []  # by id
        self.last_layout: Layout | None = None
        self._with_extras: dict[tuple, Layout] = {}
        self._pending: _Pending | None = None
        self.shapes: dict[str, list[int]] = {}
        # The arrays a compiled step takes in and gives back (`inputs=`/`outputs=`).
        self.state = {"clipper": getattr(clipper, "state", {}) if clipper is not None else {},
                      "detectors": [detector.state for detector in self.detectors]}

    # -- the lazy part (may run inside mx.compile) --------------------------
    def build(self, grads: Any, arrays: dict[str, mx.array]) -> tuple[Any, mx.array]:
        """`(clipped grads, record vector)`; `arrays` may hold `params`, `loss`, `lr`."""
        params = arrays.get("params")
        if self.clipper is not None:
            clipped, info = self.clipper(grads, params=params)
            pre_norm, norms = info.pre_norm, info.tensor_norms
        else:
            clipped, info = grads, None
            norms, pre_norm = norms_and_global(grads)

        columns: list[str] = []
        values: list[mx.array] = []

        def add(name: str, value) -> None:
            columns.append(name)
            if not isinstance(value, mx.array):
                value = mx.array(value)
            values.append(value.astype(mx.float32).reshape(()))

        add("pre_norm", pre_norm)
        if info is not None:
            add("post_norm", info.post_norm)
            add("scale", info.scale)
            add("threshold", info.threshold)
            add("clipped", info.clipped)
            add("nonfinite", info.nonfinite)
        else:
            add("post_norm", pre_norm)
            add("scale", mx.array(1.0))
            add("clipped", mx.array(False))
            add("nonfinite", ~mx.isfinite(pre_norm))
        spike = None
        for detector in self.detectors:
            detected = detector(pre_norm)
            spike = detected.spike if spike is None else spike | detected.spike
            columns_of = getattr(detector, "columns", None)  # the first detector to name a column wins
            for name, value in (columns_of(detected) if columns_of is not None else {}).items():
                if name not in columns:
                    add(name, value)
        if spike is not None:
            add("spike", spike)
        # Skip-step: the flag GradWatch.update applies (at a fixed index: loss/lr come after).
        skip_nonfinite = info is not None and getattr(self.clipper, "nonfinite", None) == "skip"
        if (self.skip_spikes and spike is not None) or skip_nonfinite:
            skipped = spike if self.skip_spikes and spike is not None else mx.array(False)
            if skip_nonfinite:
                skipped = skipped | info.nonfinite
            self.skip_index = len(columns)
            add("skipped", skipped)
        for name in ("loss", "lr"):
            if name in arrays:
                add(name, arrays[name])
        names: tuple[str, ...] = ()
        if self.tensor_norms:
            names = tuple(norms)
            values.extend(norm.astype(mx.float32).reshape(()) for norm in norms.values())
        layout = self.last_layout = Layout(tuple(columns), names)
        layout_id = self._layout_ids.get(layout)
        if layout_id is None:
            layout_id = self._layout_ids[layout] = len(self._layouts)
            self._layouts.append(layout)
        # The layout id travels in the vector: a constant of this trace (exact in float32).
        values.append(mx.array(float(layout_id), dtype=mx.float32))
        vector = mx.stack(values)

        # Tie the vector and the new state to the gradients the user will evaluate.
        flat = tree_flatten(clipped)
        state_leaves = [leaf for _, leaf in tree_flatten(self.state)]
        tied = mx.depends([leaf for _, leaf in flat], [vector, *state_leaves])
        return tree_unflatten([(name, leaf) for (name, _), leaf in zip(flat, tied)]), vector

    # -- the Python part (training thread, outside any compile) --------------
    def hold(self, step: int, vector: mx.array, extras: dict[str, float]) -> None:
        """Keep this step's lazy vector until the next step."""
        self._pending = _Pending(step, time.time(), vector, extras)

    def take(self) -> StepRecord | None:
        """The held step as plain numbers (its vector was computed by the user's eval).
        Raises `RecordError` for a vector that does not match the layout it names."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        view = memoryview(pending.vector)
        size = len(view) if view.ndim == 1 else -1
        layout_id = view[-1] if size > 0 else -1.0
        layout = None
        if 0 <= layout_id < len(self._layouts) and layout_id == int(layout_id):  # False for NaN
            layout_id = int(layout_id)
            layout = self._layouts[layout_id]
        if layout is None or size != layout.width + 1:
            raise RecordError(f"gradwatch: the record of step {pending.step} ({size} values, layout id "
                              f"{layout_id}) matches no layout this watch built; the step is dropped")
        extras = pending.extras
        if extras:
            key = (layout_id, tuple(extras))
            with_extras = self._with_extras.get(key)
            if with_extras is None:  # one Layout object per shape of step, not one per step
                with_extras = self._with_extras[key] = layout._replace(extra_columns=key[1])
            layout = with_extras
        return StepRecord(pending.step, pending.time, layout, bytes(view[:-1]), tuple(extras.values()))

    def drop_pending(self) -> None:
        self._pending = None

    def note_shapes(self, grads: Any) -> None:
        self.shapes = {name: list(leaf.shape) for name, leaf in tree_flatten(grads)
                       if isinstance(leaf, mx.array)}

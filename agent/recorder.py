"""From lazy clip results to plain numbers, one step late.

`Recorder.build` is the pure, lazy part of a step: it runs the clipper and
the detectors and packs every scalar of the step (norms, scale, flags,
detector scores, loss, learning rate, per-tensor norms) into ONE float32
vector. The returned gradients are tied to that vector and to the new
clipper/detector state with `mx.depends`, so the user's own
`mx.eval(model.parameters(), ...)` computes them in the same graph
evaluation as the update: the agent adds no evaluation of its own. One
leaf carries the tie (the first gradient in tree order): any update that
uses the gradients evaluates it, and a `depends` per leaf cost ~50% of a
step with hundreds of small tensors.

The lean step (`Lean`, the default `GlobalNorm(ord=2)` or no clipper): the vector
holds only what the step computes anyway (pre-clip norm, scale, the per-tensor
sums of squares the global norm is built from, loss, lr); the sender thread
derives the other columns and runs the default spike detector (`agent/host.py`).

Under the compiled API (`compute()`/`record()`), the step number is state
(`state["step"]`, an int64 counter) and every vector carries the number it was
built for: a compiled step that runs without its Python (`record()` skipped,
called twice, called late) cannot renumber steps, and a counter that does not
advance shows that the state was left out of a compiled step's inputs.
`step()` runs its Python every step and counts in Python (`build_step`).

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
import sys
import time
from typing import Any, NamedTuple, Sequence

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from gradwatch.clip import GlobalNorm, norms_and_global
from gradwatch.clip.base import scale_tree
from gradwatch.clip.norms import floating_leaves, sum_in_order


def lean_plan(clipper: Any) -> Lean | None:
    """The lean plan for `clipper`, or None when its record is built in full in the graph:
    only for no clipper and `GlobalNorm(ord=2)` without the "skip" policy, whose derived
    columns are exact functions of `pre_norm` and `scale`."""
    if clipper is None:
        return Lean(None)
    if type(clipper) is GlobalNorm and clipper.ord == 2 and clipper.nonfinite != "skip":
        return Lean(float(clipper.max_norm))
    return None


def _squares(leaves: list[tuple[str, mx.array]]) -> list[mx.array]:
    """Each tensor's sum of squares as a shape-(1,) array (float32; half types summed in
    float32): the reduction MLX's `clip_grad_norm` makes, kept 1-D so it goes into the
    record vector as it is (no root, no expand per tensor)."""
    out = []
    for _, g in leaves:
        if g.dtype in (mx.float16, mx.bfloat16):
            g = g.astype(mx.float32)
        total = g.square().sum(keepdims=True)
        out.append(total if total.ndim == 1 else total.reshape(1))
    return out


class Lean(NamedTuple):
    """A lean record (the default clipper `GlobalNorm` with `ord=2`, or no clipper): the
    vector holds `pre_norm`, then `scale` (with a clipper), then the other columns as
    named, then the SQUARED tensor norms (the sums the global norm is built from: no
    root per tensor in the graph). The sender thread derives the rest (`agent/host.py`):
    `post_norm = pre_norm·scale`, `threshold`, `clipped = scale < 1`, `nonfinite`, the
    roots of the squares: the same float32 values the graph would have given."""

    threshold: float | None  # the clipper's max_norm; None: no clipper


class Layout(NamedTuple):
    """What the numbers of a record are: `columns` (wire names of the first values),
    then one value per name in `tensor_names`; `extra_columns` name the Python
    values recorded beside the vector (a float learning rate, say). `lean`: a lean
    record, to be completed in the sender thread before it is encoded.
    `step_in_vector`: the vector carries its step number (the compiled API)."""

    columns: tuple[str, ...]
    tensor_names: tuple[str, ...]
    extra_columns: tuple[str, ...] = ()
    lean: Lean | None = None
    step_in_vector: bool = True

    @property
    def width(self) -> int:
        return len(self.columns) + len(self.tensor_names)

    @property
    def trailer(self) -> int:
        """Values after the record's own: the step (the bytes of an int64, in two float32
        slots) when the vector carries it, then the layout id."""
        return 3 if self.step_in_vector else 1


#: The most values a vector has after `layout.width`: the step (an int64's 8 bytes) and the layout id.
TRAILER = 3


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


class CompiledStepError(RuntimeError):
    """gradwatch used the wrong way inside (or around) an `mx.compile`d step; the message says how."""


STEP_IN_COMPILE = (
    "gradwatch: GradWatch.step() (or record()) ran inside mx.compile, where it cannot hand records "
    "to Python. "
    "Inside the compiled function call `grads, record = watch.compute(grads, loss, lr)` and add "
    "`watch.state` to the compile's inputs AND outputs (e.g. `state = [model.state, optimizer.state, "
    "watch.state]`); after your mx.eval call `watch.record()`. For mlx_lm's trainer use "
    "gradwatch.agent.integrations.mlx_lm.train. See examples/train_compiled.py.")
STATE_NOT_OUTPUT = (
    "gradwatch: watch.state is not among the outputs of your mx.compile (its arrays are left-over "
    "tracers): pass `outputs=[..., watch.state]` (and `inputs=[..., watch.state]`) to mx.compile. "
    "See examples/train_compiled.py.")
STATE_NOT_INPUT = (
    "gradwatch: the record of step {got} follows step {last}: watch.state is not among the inputs of "
    "your mx.compile (the trace froze its first values): pass `inputs=[..., watch.state]` and "
    "`outputs=[..., watch.state]` to mx.compile. See examples/train_compiled.py.")


def compile_error(error: RuntimeError, source: str) -> CompiledStepError | None:
    """Our explanation of MLX's error when reading a record, or None for another error."""
    text = str(error)
    if "function transformations" in text:  # read while tracing: step() inside a compile
        return CompiledStepError(STEP_IN_COMPILE)
    if "without a primitive" in text:  # a tracer left over from a finished trace
        return CompiledStepError(STEP_IN_COMPILE if source == "step" else STATE_NOT_OUTPUT)
    return None


class ClipperDetection:
    """The default detector of a watch whose clipper has its own (`RecommendedClip`): that
    detector's verdict on this step's norm (`clipper.last_detection`), recorded as it is,
    instead of a second detector run on the same norm in the same graph."""

    name = "robust"

    def __init__(self, clipper: Any):
        self.clipper = clipper
        self.state: dict = {}

    def __call__(self, norm: mx.array) -> Any:
        return self.clipper.last_detection  # set by the clipper's call in this same build

    def columns(self, info: Any) -> dict[str, mx.array]:
        return self.clipper.detector.columns(info)

    def config(self) -> dict[str, Any]:
        return {**self.clipper.detector.config(), "where": "clipper"}


class _Pending(NamedTuple):
    step: int | None  # None: the number the vector carries
    time: float
    vector: mx.array
    extras: dict[str, Any]  # floats, or mx.arrays read one step late (never forced on the call)
    source: str = "step"  # "step" or "record"


class Recorder:
    """Builds a step's lazy vector, keeps it until the next step, converts it then."""

    def __init__(self, clipper: Any = None, detectors: Sequence[Any] = (), tensor_norms: bool = True,
                 skip_spikes: bool = False, start_step: int = 0):
        self.clipper = clipper
        self.detectors = list(detectors)
        self.skip_spikes = skip_spikes
        self.skip_index: int | None = None  # where "skipped" sits in the record vector
        self.tensor_norms = tensor_norms
        self.lean = lean_plan(clipper)
        self._python_step = int(start_step)
        self._layout_ids: dict[Layout, int] = {}
        self._layouts: list[Layout] = []  # by id
        self.last_layout: Layout | None = None
        self._with_extras: dict[tuple, Layout] = {}
        self._pending: _Pending | None = None
        self.shapes: dict[str, list[int]] = {}
        self.last_step: int | None = None  # the step of the last record taken
        # The arrays a compiled step takes in and gives back (`inputs=`/`outputs=`); "record"
        # is the last vector `compute()` built, so it rides out of the compiled step with them.
        self.state = {"clipper": getattr(clipper, "state", {}) if clipper is not None else {},
                      "detectors": [detector.state for detector in self.detectors],
                      "step": mx.array([int(start_step)], dtype=mx.int64),
                      "record": mx.zeros((0,), dtype=mx.float32)}

    # -- the lazy part (may run inside mx.compile) --------------------------
    def build(self, grads: Any, arrays: dict[str, mx.array], keep: bool = False,
              step_in_graph: bool = True) -> tuple[Any, mx.array]:
        """`(clipped grads, record vector)`; `arrays` may hold `params`, `loss`, `lr`;
        `keep` also stores the vector as `state["record"]` (the compiled API);
        `step_in_graph` counts steps in `state["step"]` and puts the number in the vector
        (the compiled API, where this Python runs only while tracing); `step()` counts in
        Python (`build_step`)."""
        params = arrays.get("params")
        flat_grads = tree_flatten(grads)
        self.shapes = {name: list(leaf.shape) for name, leaf in flat_grads if isinstance(leaf, mx.array)}
        columns: list[str] = []
        values: list[mx.array] = []

        def add(name: str, value) -> None:
            columns.append(name)
            if not isinstance(value, mx.array):
                value = mx.array(value)
            if value.dtype != mx.float32:
                value = value.astype(mx.float32)
            values.append(value if value.shape == (1,) else value.reshape(1))

        lean, info, factor = self.lean, None, None
        if lean is not None:
            leaves = floating_leaves(grads)
            squares = _squares(leaves)
            total = sum_in_order(squares)
            group = getattr(self.clipper, "group", None)
            if group is not None:
                total = mx.distributed.all_sum(total, group=group)
            pre_norm = mx.sqrt(total)  # shape (1,)
            add("pre_norm", pre_norm)
            if self.clipper is None:
                clipped = grads
            else:  # GlobalNorm's (and clip_grad_norm's) expression, so the result is identical
                scale = mx.minimum(self.clipper.max_norm / (pre_norm + 1e-6), 1.0)
                factor = scale.reshape(())   # the gradients are scaled below, by the tied factor
                clipped = None
                add("scale", scale)
            names = tuple(name for name, _ in leaves)
            tensor_values = squares
            nonfinite = None
        else:
            if self.clipper is not None:
                clipped, info = self.clipper(grads, params=params)
                pre_norm, norms = info.pre_norm, info.tensor_norms
            else:
                clipped, info = grads, None
                norms, pre_norm = norms_and_global(grads)
            add("pre_norm", pre_norm)
            nonfinite = ~mx.isfinite(pre_norm) if info is None else info.nonfinite
            if info is not None:
                add("post_norm", info.post_norm)
                add("scale", info.scale)
                add("threshold", info.threshold)
                add("clipped", info.clipped)
            else:
                add("post_norm", pre_norm)
                add("scale", mx.array(1.0))
                add("clipped", mx.array(False))
            add("nonfinite", nonfinite)
            names = tuple(norms)
            tensor_values = list(norms.values())
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
                skipped = skipped | nonfinite
            self.skip_index = len(columns)
            add("skipped", skipped)
        for name in ("loss", "lr"):
            if name in arrays:
                add(name, arrays[name])
        if not self.tensor_norms:
            names, tensor_values = (), []
        for value in tensor_values:
            values.append(value if value.shape == (1,) else value.astype(mx.float32).reshape(1))
        layout = self.last_layout = Layout(tuple(columns), names, lean=lean, step_in_vector=step_in_graph)
        layout_id = self._layout_ids.get(layout)
        if layout_id is None:
            layout_id = self._layout_ids[layout] = len(self._layouts)
            self._layouts.append(layout)
        if step_in_graph:
            step = self.state["step"]
            values.append(step.view(mx.float32))  # its 8 bytes as two float32 slots: one operation
            self.state["step"] = step + 1
        # The layout id travels in the vector: a constant of this trace (exact in float32).
        values.append(mx.array([float(layout_id)], dtype=mx.float32))
        vector = mx.concatenate(values)
        if keep:
            self.state["record"] = vector

        state_leaves = [leaf for name, leaf in tree_flatten(self.state)
                        if name != "record" and (step_in_graph or name != "step")]
        if factor is not None:
            # Lean clipping: the vector and the new state tied to the one factor every gradient
            # is scaled by (no gradient's own update kernel is split off by the tie).
            (factor,) = mx.depends([factor], [vector, *state_leaves])
            return scale_tree(grads, factor), vector
        # Tie the vector and the new state to ONE gradient the user will evaluate.
        flat = tree_flatten(clipped)
        if not flat:
            return clipped, vector
        (tied,) = mx.depends([flat[0][1]], [vector, *state_leaves])
        flat[0] = (flat[0][0], tied)
        return tree_unflatten(flat), vector

    def build_step(self, grads: Any, arrays: dict[str, mx.array]) -> tuple[Any, mx.array]:
        """`build` for `GradWatch.step()`: the step number is counted in Python."""
        return self.build(grads, arrays, step_in_graph=False)

    def next_step(self) -> int:
        """The number of the step `step()` records now (counted in Python)."""
        step, self._python_step = self._python_step, self._python_step + 1
        return step

    # -- the Python part (training thread, outside any compile) --------------
    def hold(self, step: int | None, vector: mx.array, extras: dict[str, Any], source: str = "step") -> None:
        """Keep this step's lazy vector until the next step (`step` None: the vector's own)."""
        self._pending = _Pending(step, time.time(), vector, extras, source)

    def take(self) -> StepRecord | None:
        """The held step as plain numbers (its vector was computed by the user's eval).
        Raises `RecordError` for a vector that does not match the layout it names and
        `CompiledStepError` for gradwatch misused around `mx.compile`."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        try:
            view = memoryview(pending.vector)
        except RuntimeError as error:
            explained = compile_error(error, pending.source)
            if explained is None:
                raise
            raise explained from None
        size = len(view) if view.ndim == 1 else -1
        layout_id = view[-1] if size > 0 else -1.0
        layout = None
        if 0 <= layout_id < len(self._layouts) and layout_id == int(layout_id):  # False for NaN
            layout_id = int(layout_id)
            layout = self._layouts[layout_id]
        if layout is None or size != layout.width + layout.trailer:
            raise RecordError(f"gradwatch: the record of step {pending.step} ({size} values, layout id "
                              f"{layout_id}) matches no layout this watch built; the step is dropped")
        step = pending.step
        if step is None and layout.step_in_vector:
            step = int.from_bytes(view[-3:-1].tobytes(), sys.byteorder, signed=True)
            if self.last_step is not None and step <= self.last_step:
                last, self.last_step = self.last_step, None
                raise CompiledStepError(STATE_NOT_INPUT.format(got=step, last=last))
        self.last_step = step
        extras = pending.extras
        if extras:
            extras = {name: float(value.item() if isinstance(value, mx.array) else value)
                      for name, value in extras.items()}
            key = (layout_id, tuple(extras))
            with_extras = self._with_extras.get(key)
            if with_extras is None:  # one Layout object per shape of step, not one per step
                with_extras = self._with_extras[key] = layout._replace(extra_columns=key[1])
            layout = with_extras
        return StepRecord(step, pending.time, layout, bytes(view[:-layout.trailer]), tuple(extras.values()))

    def drop_pending(self) -> None:
        self._pending = None

"""The default spike detector as MLX ops: the shared robust rule, for steps that must act on it.

The rule is ``gradwatch.clip.spike_rule`` (docs/diagnostics.md): in log space,
the median and MAD of the last ``history`` unflagged log norms, a bound
``median + k·1.4826·MAD`` whose k adapts to the tail of that history, and a
level shift only for a new level that persists. The agent runs it on the host
(one step late) by default; this in-graph copy is for ``skip_spikes=True``,
``RecommendedClip`` and detectors passed in ``detectors=``, where the same step
must know the verdict. Tests hold its flags equal to the NumPy rule's.

Why not a mean and standard deviation: gradient norms are heavy-tailed and
drift by orders of magnitude over a run; a linear-space EMA z-score is pulled
around by the very spikes it should see. The log turns "x times larger" into a
distance that means the same early and late in a run; the median/MAD ignore up
to half of the history being outliers (a Hampel filter; RNMT+, Chen et al.
2018, tracks the log norm the same way; lingvo's ``GradNormTracker``).

Per step: one sort of the history (the median), one sort of its deviations (the
MAD and the tail quantile), and on the
``shift_window`` ring a comparison and two sums; the refill after a level shift
(a median and MAD of 16 values and a stable compaction) is computed every step
and selected by ``mx.where`` (a compiled graph has no branches).
"""
from __future__ import annotations

from typing import Any

import mlx.core as mx

from .base import check_bound, check_count
from .detectors import SpikeDetector
from .info import DetectorInfo
from . import spike_rule as rule
from .stats import as_norm

MAD_TO_SIGMA = 1.4826  # 1 / Φ⁻¹(3/4): the MAD of a normal sample times this is its σ
TINY = 1e-30  # log floor: a zero norm is low, never a spike, and never -inf in the history


_MIDDLE = mx.array([-1, 0], dtype=mx.int32)  # (n + these) // 2: the two middle ranks of n values


def masked_median(values: mx.array, n: mx.array, index: mx.array | None = None) -> mx.array:
    """The median of ``values[:n]`` as NumPy computes it (mean of the two middle values).

    Entries at and past ``n`` are masked with ``+inf`` so a sort puts them last.
    ``inf`` when ``n`` is 0. ``index`` is ``mx.arange(len(values))``, computed once by a
    caller that calls this every step (an array held outside the step is a constant of
    a compiled graph, not an operation of every step).
    """
    size = values.shape[0]
    if index is None:
        index = mx.arange(size)
    ordered = mx.sort(mx.where(index < n, values, mx.inf))
    middle = mx.take(ordered, mx.clip((n + _MIDDLE) // 2, 0, size - 1))  # one gather for both
    return middle.sum() / 2


class RobustDetector(SpikeDetector):
    """Spike when log(norm) > median + k·1.4826·MAD of the last ``history`` unflagged log norms.

    ``k=None`` (default): k adapts to the history's tail as
    :func:`gradwatch.clip.spike_rule.adaptive_k` says; a number fixes it. The
    level-shift rule and every default are the shared rule's
    (``gradwatch.clip.spike_rule``). ``info.score`` is the robust z-score
    ``(log x - median) / (1.4826·MAD)`` (0 during warm-up, NaN/inf for a
    non-finite norm), ``info.baseline`` the median norm (``exp`` of the log
    median), ``info.level_shift`` True on the one step that starts a new regime.

    State (a dict of arrays, for ``mx.compile(inputs=..., outputs=...)``):
    ``history`` (ring of unflagged log norms), ``filled`` (values written since the
    last refill), ``seen`` (finite norms ever), ``recent`` (ring of the last
    ``shift_window`` finite raw log norms), ``recent_count``, ``run`` (consecutive
    finite steps with the recent median above the bound).
    """

    name = "robust"

    def __init__(self, k: float | None = rule.K, history: int = rule.HISTORY, warmup_steps: int = rule.WARMUP,
                 shift_window: int = rule.SHIFT_WINDOW, shift_span: int = rule.SHIFT_SPAN,
                 min_scale: float = rule.MIN_SCALE, k_gauss: float = rule.K_GAUSS, k_min: float = rule.K_MIN,
                 k_max: float = rule.K_MAX, tail_quantile: float = rule.TAIL_QUANTILE,
                 tail_power: float = rule.TAIL_POWER, tail_min: int = rule.TAIL_MIN):
        super().__init__()
        self.k = None if k is None else check_bound("k", k, positive=True)
        self.history = check_count("history", history, minimum=3)
        self.warmup_steps = check_count("warmup_steps", warmup_steps, minimum=1)
        self.shift_window = check_count("shift_window", shift_window, minimum=2)
        self.shift_span = check_count("shift_span", shift_span, minimum=1)
        self.min_scale = check_bound("min_scale", min_scale)
        self.k_gauss = check_bound("k_gauss", k_gauss, positive=True)
        self.k_min = check_bound("k_min", k_min, positive=True)
        self.k_max = check_bound("k_max", k_max, positive=True)
        self.tail_quantile = check_bound("tail_quantile", tail_quantile, positive=True)
        self.tail_power = check_bound("tail_power", tail_power)
        self.tail_min = check_count("tail_min", tail_min, minimum=3)
        if not 0.5 < self.tail_quantile < 1:
            raise ValueError(f"tail_quantile must be in (0.5, 1), got {tail_quantile!r}")
        if self.k_min > self.k_max:
            raise ValueError(f"k_min ({k_min}) must be <= k_max ({k_max})")
        if self.shift_window > self.history:
            raise ValueError(f"shift_window ({shift_window}) must be <= history ({history})")
        self.state.update(
            history=mx.zeros((self.history,), mx.float32), filled=mx.array(0, mx.int32),
            seen=mx.array(0, mx.int32), recent=mx.zeros((self.shift_window,), mx.float32),
            recent_count=mx.array(0, mx.int32), run=mx.array(0, mx.int32))
        self._tail_num, self._tail_den = rule.quantile_fraction(self.tail_quantile)
        self._tail_gauss = rule.tail_gauss(self.tail_quantile)
        # Index vectors, made once: constants of the step's graph, not operations of every step.
        self._slots = mx.arange(self.history)
        self._window_slots = mx.arange(self.shift_window)
        mx.eval(self._slots, self._window_slots)

    def params(self) -> dict[str, Any]:
        return {"k": self.k, "history": self.history, "warmup_steps": self.warmup_steps,
                "shift_window": self.shift_window, "shift_span": self.shift_span,
                "min_scale": self.min_scale, "k_gauss": self.k_gauss, "k_min": self.k_min, "k_max": self.k_max,
                "tail_quantile": self.tail_quantile, "tail_power": self.tail_power, "tail_min": self.tail_min}

    def columns(self, info: DetectorInfo) -> dict[str, mx.array]:
        return {"robust_z": info.score, "level_shift": info.level_shift}

    def _k(self, ordered: mx.array, n: mx.array, median: mx.array, mad: mx.array) -> mx.array:
        """k for this step: fixed, or from the mean of the history's top values (sorted, the
        n valid ones first) above its median, in MADs."""
        if self.k is not None:
            return mx.array(self.k, mx.float32)
        count = n - n * self._tail_num // self._tail_den
        top = mx.where((self._slots >= n - count) & (self._slots < n), ordered, 0.0).sum() / mx.maximum(count, 1)
        tail = (top - median) / mx.where(mad > 0, mad, 1.0)
        adaptive = mx.clip(self.k_gauss * (tail / self._tail_gauss) ** self.tail_power, self.k_min, self.k_max)
        return mx.where((n >= self.tail_min) & (mad > 0), adaptive, self.k_max)

    def __call__(self, norm) -> DetectorInfo:
        x = as_norm(norm)
        st = self.state
        history, filled, seen = st["history"], st["filled"], st["seen"]
        recent, recent_count, run = st["recent"], st["recent_count"], st["run"]
        size, window = self.history, self.shift_window
        slots, window_slots = self._slots, self._window_slots

        finite = mx.isfinite(x)
        log_x = mx.log(mx.maximum(x, TINY))
        log_safe = mx.where(finite, log_x, 0.0)
        n = mx.minimum(filled, size)
        valid = slots < n
        ordered = mx.sort(mx.where(valid, history, mx.inf))
        middle = (n + _MIDDLE) // 2
        median = mx.take(ordered, mx.clip(middle, 0, size - 1)).sum() / 2
        ordered_dev = mx.sort(mx.where(valid, mx.abs(history - median), mx.inf))
        mad = mx.take(ordered_dev, mx.clip(middle, 0, size - 1)).sum() / 2
        scale = mx.maximum(MAD_TO_SIGMA * mad, self.min_scale)
        k = self._k(ordered, n, median, mad)
        ready = seen >= self.warmup_steps
        z = (log_x - median) / scale
        flagged = ready & finite & (z > k)
        bound = median + k * scale

        write = finite & ~flagged   # a flagged value never enters the history
        history = mx.where((slots == (filled % size)) & write, log_safe, history)
        filled = mx.where(write, filled + 1, filled)
        recent_slot = window_slots == (recent_count % window)
        recent = mx.where(recent_slot & finite, log_safe, recent)
        recent_count = mx.where(finite, recent_count + 1, recent_count)

        # The level-shift test: more than half of the recent window, and of its newest half,
        # above this step's bound, for `shift_span` consecutive finite steps.
        count = mx.minimum(recent_count, window)
        age = (recent_count - 1 - window_slots) % window          # 0 = this step's value
        present = age < count
        above = present & (recent > bound)
        half = window // 2
        persists = (above.astype(mx.int32).sum() > half) & \
            ((above & (age < half)).astype(mx.int32).sum() > half // 2)
        run = mx.where(finite, mx.where(ready & persists, run + 1, 0), run)
        shift = flagged & (run >= self.shift_span)

        # A new regime: the history becomes the recent raw values within their own median ± k·scale,
        # oldest first (ring order: slot 0 is the oldest once the window was filled).
        start = mx.where(recent_count >= window, recent_count % window, 0)
        in_order = mx.take(recent, (window_slots + start) % window)
        in_order_present = window_slots < count
        recent_sorted = mx.sort(mx.where(in_order_present, in_order, mx.inf))
        w_middle = mx.clip((count + _MIDDLE) // 2, 0, window - 1)
        new_median = mx.take(recent_sorted, w_middle).sum() / 2
        new_dev = mx.abs(in_order - new_median)
        new_mad = mx.take(mx.sort(mx.where(in_order_present, new_dev, mx.inf)), w_middle).sum() / 2
        new_scale = mx.maximum(MAD_TO_SIGMA * new_mad, self.min_scale)
        keep = in_order_present & (new_dev <= k * new_scale)
        order = mx.argsort(mx.where(keep, window_slots, window_slots + window))   # kept first, in time order
        kept = mx.take(in_order, order)
        refill = mx.concatenate([kept, history[window:]]) if size > window else kept
        st["history"] = mx.where(shift, refill, history)
        st["filled"] = mx.where(shift, keep.astype(mx.int32).sum(), filled)
        st["recent"] = recent
        st["recent_count"] = recent_count
        st["run"] = mx.where(shift, 0, run)
        st["seen"] = mx.where(finite, seen + 1, seen)
        return DetectorInfo(score=mx.where(ready, z, mx.where(finite, 0.0, z)),
                            spike=(flagged & ~shift) | ~finite, baseline=mx.exp(median),
                            ready=ready, level_shift=shift)

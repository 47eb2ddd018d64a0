"""The default spike detector: rolling median and MAD of the log norm, with a level-shift rule.

Why not a mean and standard deviation: gradient norms are heavy-tailed and
drift by orders of magnitude over a run. A linear-space EMA z-score is pulled
around by the very spikes it should see, and flags 1-2.5% of clean steps on
drifting or heavy-tailed sequences (``benchmarks/tau_quality.py``). The log
turns "x times larger" into a distance that means the same early and late in
a run, and the median/MAD of the last ``history`` norms ignore up to half of
them being outliers (a Hampel filter; RNMT+, Chen et al. 2018, tracks the log
norm the same way; lingvo's ``GradNormTracker``).

The rule, for each finite norm x (``l = log x``), over the history ``h`` of
earlier log norms::

    m = median(h);  s = max(1.4826·median(|h - m|), min_scale)
    score = (l - m) / s;   spike = score > k        (one-sided: small norms are fine)
    h ← h + [min(l, m + k·s)]                       (a spike does not move the baseline)

Nothing is decided before ``warmup_steps`` finite norms were seen. Non-finite
norms are spikes and never enter any statistic.

Level shift: when more than ``shift_count`` of the last ``shift_window``
finite steps were flagged, that is a new regime, not a run of spikes (a
learning-rate change, unfreezing layers, a new data mix). The step that
tips it reports ``level_shift`` (and is not a spike), the history is
replaced by those ``shift_window`` recent *raw* log norms, and the flag
count starts again: the detector follows the new level after at most
``shift_count + 1`` flags, and reports it once.

Defaults, measured by ``benchmarks/tau_quality.py`` (docs/diagnostics.md):
``k = 5`` keeps false positives under 0.5% of clean steps on Student-t(4)
noise in log space (the heaviest tail we test: k = 4 flags about 0.6% there),
while corrupted batches (10-100× the norm) stay far above the bound.
``history = 200`` follows a drifting norm (the median lags by about 100 steps
of drift) and sorting 200 values per step is cheap. ``warmup_steps = 25`` is
enough for a median and MAD that do not flag the next normal step.
``shift_window = 20, shift_count = 10``: a run of spikes at 2% of steps almost
never fills half of 20 steps, a real shift does within 11 steps.
``min_scale = 0.01`` (1% in the norm): a perfectly constant norm has MAD 0,
and a 1.001× wobble should not be a spike.
"""
from __future__ import annotations

from typing import Any

import mlx.core as mx

from .base import check_bound, check_count
from .detectors import SpikeDetector
from .info import DetectorInfo
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
    """Spike when log(norm) > median + k·1.4826·MAD of the last ``history`` log norms.

    See the module docstring for the rule, the level-shift rule and why the
    defaults are what they are. ``info.score`` is the robust z-score
    ``(log x - median) / (1.4826·MAD)`` (0 during warm-up, NaN/inf for a
    non-finite norm), ``info.baseline`` the median norm (``exp`` of the log
    median), ``info.level_shift`` True on the one step that starts a new regime.

    State (a dict of arrays, for ``mx.compile(inputs=..., outputs=...)``):
    ``history`` (ring of log norms), ``filled`` (values written since the last
    refill), ``seen`` (finite norms ever), ``recent``/``flags`` (ring of the
    last ``shift_window`` finite raw log norms and their flags), ``recent_count``.
    """

    name = "robust"

    def __init__(self, k: float = 5.0, history: int = 200, warmup_steps: int = 25,
                 shift_window: int = 20, shift_count: int = 10, min_scale: float = 0.01):
        super().__init__()
        self.k = check_bound("k", k, positive=True)
        self.history = check_count("history", history, minimum=3)
        self.warmup_steps = check_count("warmup_steps", warmup_steps, minimum=1)
        self.shift_window = check_count("shift_window", shift_window, minimum=1)
        self.shift_count = check_count("shift_count", shift_count, minimum=0)
        self.min_scale = check_bound("min_scale", min_scale)
        if self.shift_window > self.history:
            raise ValueError(f"shift_window ({shift_window}) must be <= history ({history})")
        if self.shift_count >= self.shift_window:
            raise ValueError(f"shift_count ({shift_count}) must be < shift_window ({shift_window})")
        self.state.update(
            history=mx.zeros((self.history,), mx.float32), filled=mx.array(0, mx.int32),
            seen=mx.array(0, mx.int32), recent=mx.zeros((self.shift_window,), mx.float32),
            flags=mx.zeros((self.shift_window,), mx.bool_), recent_count=mx.array(0, mx.int32))
        # Index vectors, made once: constants of the step's graph, not operations of every step.
        self._slots = mx.arange(self.history)
        self._window_slots = mx.arange(self.shift_window)
        mx.eval(self._slots, self._window_slots)

    def params(self) -> dict[str, Any]:
        return {"k": self.k, "history": self.history, "warmup_steps": self.warmup_steps,
                "shift_window": self.shift_window, "shift_count": self.shift_count,
                "min_scale": self.min_scale}

    def columns(self, info: DetectorInfo) -> dict[str, mx.array]:
        return {"robust_z": info.score, "level_shift": info.level_shift}

    def __call__(self, norm) -> DetectorInfo:
        x = as_norm(norm)
        st = self.state
        history, filled, seen = st["history"], st["filled"], st["seen"]
        recent, flags, recent_count = st["recent"], st["flags"], st["recent_count"]
        size, window = self.history, self.shift_window

        finite = mx.isfinite(x)
        log_x = mx.log(mx.maximum(x, TINY))
        log_safe = mx.where(finite, log_x, 0.0)
        n = mx.minimum(filled, size)
        slots, window_slots = self._slots, self._window_slots
        median = masked_median(history, n, slots)
        mad = masked_median(mx.abs(history - median), n, slots)
        scale = mx.maximum(MAD_TO_SIGMA * mad, self.min_scale)
        ready = seen >= self.warmup_steps
        z = (log_x - median) / scale
        flagged = ready & finite & (z > self.k)
        fed = mx.where(ready, mx.minimum(log_safe, median + self.k * scale), log_safe)

        write = finite
        slot = slots == (filled % size)
        history = mx.where(slot & write, fed, history)
        filled = mx.where(write, filled + 1, filled)
        recent_slot = window_slots == (recent_count % window)
        recent = mx.where(recent_slot & write, log_safe, recent)
        flags = mx.where(recent_slot & write, flagged, flags)
        recent_count = mx.where(write, recent_count + 1, recent_count)

        shift = flagged & (flags.astype(mx.int32).sum() > self.shift_count)
        # A new regime: the history becomes the recent raw values, oldest first
        # (so the ring overwrites them in the order they came; when fewer than
        # `window` were ever written, they are the first slots already).
        start = mx.where(recent_count >= window, recent_count % window, 0)
        ordered = mx.take(recent, (window_slots + start) % window)
        refill = mx.concatenate([ordered, history[window:]]) if size > window else ordered
        st["history"] = mx.where(shift, refill, history)
        st["filled"] = mx.where(shift, mx.minimum(recent_count, window), filled)
        st["flags"] = mx.where(shift, mx.zeros_like(flags), flags)
        st["recent"] = recent
        st["recent_count"] = recent_count
        st["seen"] = mx.where(finite, seen + 1, seen)
        return DetectorInfo(score=mx.where(ready, z, mx.where(finite, 0.0, z)),
                            spike=(flagged & ~shift) | ~finite, baseline=mx.exp(median),
                            ready=ready, level_shift=shift)

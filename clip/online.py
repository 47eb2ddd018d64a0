"""The server's recommendation rule, applied online: a clipper whose τ follows the run.

Why: ``gradwatch recommend`` (``server/analysis/diagnostics.recommend``) computes a τ
from a run's stored norms, but the clipper that trains keeps a fixed τ until
someone reads it and restarts. :class:`RecommendedClip` applies the same rule
at every step over a fixed window of the last ``window`` *clean* norms (not
flagged by its own :class:`RobustDetector`, the agent's and the server's
detector), so the threshold follows a drifting norm while spikes never raise it.

The rule (as ``recommend`` with ``target_clip_rate=None``), over the clean
window ``h`` of log norms::

    τ = exp(median(h) + k·1.4826·MAD(h)),  clamped to [median, 10·median]

where the clamp's median is the median of the clean norms themselves. The τ
of a step comes from the steps before it (the step it judges is not in it).
Until ``warmup`` clean norms were seen nothing is clipped, or the fixed
``fallback`` τ applies when one is given.

State (for ``mx.compile(inputs=clipper.state, outputs=clipper.state)``):
``ring`` (the last ``window`` clean log norms, float32), ``count`` (clean
norms ever seen), and the detector's arrays under ``detector_*``.
"""
from __future__ import annotations

import math
from typing import Any

import mlx.core as mx

from .base import Clipper, check_bound, check_count
from .info import ClipInfo, DetectorInfo
from .norms import _norms_from_leaves, floating_leaves
from .robust import MAD_TO_SIGMA, TINY, RobustDetector, masked_median

PREFIX = "detector_"


class RecommendedClip(Clipper):
    """Clip to the server's recommended τ, computed online over the last ``window`` clean norms.

    Args:
        window: clean norms the rule looks at (a ring buffer), >= 3.
        k: τ = exp(median + k·1.4826·MAD) of the clean log norms (the server's ``k``).
        warmup: clean norms needed before τ applies (<= ``window``).
        fallback: τ during warm-up; None clips nothing until then.
        detector: what decides that a norm is clean (default ``RobustDetector()``,
            the shared rule, adaptive k, as the server's ``robust_spikes``); its state lives in this
            clipper's state.
        nonfinite: see :class:`~gradwatch.clip.base.Clipper`.

    ``last_detection``: the :class:`DetectorInfo` its detector gave for the last call's
    norm (lazy arrays of that call; the agent records it instead of running a second
    detector on the same norm).

    Info: ``threshold`` = the τ applied (``inf`` during a warm-up without
    fallback), ``clipped = scale < 1``; as :class:`GlobalNorm` otherwise.

    Example:
        >>> clip = RecommendedClip(window=4, warmup=3)
        >>> for n in (1.0, 1.1, 0.9):
        ...     _, info = clip({"w": mx.array([n])})
        >>> _, info = clip({"w": mx.array([100.0])})
        >>> bool(info.clipped.item()), round(info.threshold.item(), 3)
        (True, 1.528)
    """

    name = "recommended"

    def __init__(self, window: int = 500, k: float = 3.0, warmup: int = 100, fallback: float | None = None,
                 detector: RobustDetector | None = None, nonfinite: str = "propagate"):
        super().__init__(nonfinite)
        self.window = check_count("window", window, minimum=3)
        self.k = check_bound("k", k, positive=True)
        self.warmup = check_count("warmup", warmup, minimum=1)
        if self.warmup > self.window:
            raise ValueError(f"warmup ({warmup}) must be <= window ({window})")
        self.fallback = check_bound("fallback", fallback, optional=True)
        self.detector = detector if detector is not None else RobustDetector()
        self.state.update(ring=mx.zeros((self.window,), mx.float32), count=mx.array(0, mx.int32))
        self.last_detection: DetectorInfo | None = None
        self._slots = mx.arange(self.window)  # made once: a constant of the step's graph
        mx.eval(self._slots)
        self.state.update({PREFIX + key: value for key, value in self.detector.state.items()})

    def params(self) -> dict[str, Any]:
        return {"window": self.window, "k": self.k, "warmup": self.warmup, "fallback": self.fallback,
                "detector": self.detector.config() if hasattr(self.detector, "config") else self.detector.name}

    def tau(self) -> mx.array:
        """τ from the clean window as it is now (lazy; ``inf`` when it is empty)."""
        ring, count = self.state["ring"], self.state["count"]
        n = mx.minimum(count, self.window)
        slots = self._slots
        median_log = masked_median(ring, n, slots)
        mad = masked_median(mx.abs(ring - median_log), n, slots)
        median = masked_median(mx.exp(ring), n, slots)
        tau = mx.exp(median_log + self.k * MAD_TO_SIGMA * mad)
        return mx.minimum(mx.maximum(tau, median), 10 * median)

    def __call__(self, grads: Any, params: Any = None) -> tuple[Any, ClipInfo]:
        norms, x = _norms_from_leaves(floating_leaves(grads), None)
        ready = self.state["count"] >= self.warmup
        fallback = math.inf if self.fallback is None else self.fallback
        threshold = mx.where(ready, self.tau(), fallback).astype(mx.float32)
        scale = mx.minimum(threshold / (x + 1e-6), 1.0)

        # Then learn from this step: the detector sees every norm, the window only clean ones.
        self.detector.state = {key[len(PREFIX):]: value for key, value in self.state.items()
                               if key.startswith(PREFIX)}
        found = self.detector(x)
        self.last_detection = found  # what its detector said of this step (lazy; read in the same trace)
        self.state.update({PREFIX + key: value for key, value in self.detector.state.items()})
        clean = mx.isfinite(x) & ~found.spike & ~found.level_shift
        count = self.state["count"]
        slot = self._slots == (count % self.window)
        self.state["ring"] = mx.where(slot & clean, mx.log(mx.maximum(x, TINY)), self.state["ring"])
        self.state["count"] = mx.where(clean, count + 1, count)
        return self._scaled_result(grads, x, scale, threshold, norms)

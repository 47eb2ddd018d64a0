"""Spike detectors on the pre-clip gradient norm: pure state + update, lazy.

``info = detector(norm)`` returns a :class:`~gradwatch.clip.info.DetectorInfo`
(``score``, ``spike``, ``baseline``, ``ready``) and replaces entries of
``detector.state``, so a detector compiles with
``mx.compile(f, inputs=detector.state, outputs=detector.state)`` like a
clipper. A detector never clips anything.

The default detector, :class:`~gradwatch.clip.robust.RobustDetector`
(median/MAD of the log norm), lives in ``robust.py``; the two here are the
linear-space EMA detectors (ZClip's statistics; the EMA ratio makes a good
severity label). Every detector names its per-step wire columns with
``columns(info)``.

Both detectors here learn their baseline from the first ``warmup_steps`` finite
norms (mean, and population variance for the z-score), then follow it with an
exponential moving average fed a *capped* value, so a spike does not raise the
baseline it is measured against. Non-finite norms never enter the statistics;
they are reported as spikes.
"""
from __future__ import annotations

from typing import Any

import mlx.core as mx

from .base import check_bound, check_count, check_fraction
from .info import DetectorInfo
from .stats import as_norm, ema_mean_var, warmup_update


class SpikeDetector:
    """Base class: ``state`` dict of arrays, ``name``, ``config()``."""

    name = "detector"

    def __init__(self):
        self.state: dict[str, mx.array] = {}

    def params(self) -> dict[str, Any]:
        return {}

    def config(self) -> dict[str, Any]:
        """``{"name": ..., <constructor arguments>...}``: plain JSON values."""
        return {"name": self.name, **self.params()}

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.params().items())
        return f"{type(self).__name__}({args})"

    def columns(self, info: DetectorInfo) -> dict[str, mx.array]:
        """This detector's per-step wire columns (``{wire name: lazy array}``) from its
        ``info``; the agent records the first detector's column of each name."""
        return {}

    def __call__(self, norm) -> DetectorInfo:
        raise NotImplementedError


class ZScoreDetector(SpikeDetector):
    """Spike when the norm is more than ``z_thresh`` EMA standard deviations above the EMA mean.

    Warm-up: the first ``warmup_steps`` finite norms give the initial mean μ
    and population variance σ². Then, for each norm x::

        z = (x - μ) / (σ + eps)          spike = z > z_thresh
        x̂ = min(x, μ + z_thresh·σ) if spike else x
        μ ← α·μ + (1-α)·x̂;  σ² ← α·σ² + (1-α)·(x̂ - μ)²

    (the statistics of ZClip, Kumar et al. 2025, without the clipping).
    ``score`` is z (0 during warm-up), ``baseline`` is μ before the update.

    References:
        Kumar, Owen, Roy Chowdhury, Güra, "ZClip: Adaptive Spike Mitigation
        for LLM Pre-Training", arXiv:2504.02507, 2025.
    """

    name = "zscore"

    def columns(self, info: DetectorInfo) -> dict[str, mx.array]:
        return {"z": info.score}

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, warmup_steps: int = 25,
                 eps: float = 1e-6):
        super().__init__()
        self.alpha = check_fraction("alpha", alpha)
        self.z_thresh = check_bound("z_thresh", z_thresh, positive=True)
        self.warmup_steps = check_count("warmup_steps", warmup_steps, minimum=1)
        self.eps = check_bound("eps", eps)
        self.state.update(count=mx.array(0, mx.int32), mean=mx.array(0.0, mx.float32),
                          var=mx.array(0.0, mx.float32), m2=mx.array(0.0, mx.float32))

    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "z_thresh": self.z_thresh,
                "warmup_steps": self.warmup_steps, "eps": self.eps}

    def __call__(self, norm) -> DetectorInfo:
        x = as_norm(norm)
        count, mean, var, m2 = (self.state[k] for k in ("count", "mean", "var", "m2"))
        finite = mx.isfinite(x)
        warming = count < self.warmup_steps
        ready = ~warming

        take = warming & finite
        count_w, mean_w, m2_w = warmup_update(count, mean, m2, x, take)
        init_now = take & (count_w >= self.warmup_steps)

        std = mx.sqrt(var)
        z = (x - mean) / (std + self.eps)
        outlier = ready & (z > self.z_thresh)
        fed = mx.where(outlier, mean + self.z_thresh * std, x)
        ema_mean, ema_var = ema_mean_var(mean, var, fed, self.alpha)
        update = ready & finite

        self.state["count"] = count_w
        self.state["m2"] = m2_w
        self.state["mean"] = mx.where(update, ema_mean, mean_w)
        self.state["var"] = mx.where(init_now, m2_w / count_w, mx.where(update, ema_var, var))
        return DetectorInfo(score=mx.where(ready, z, 0.0), spike=outlier | ~finite,
                            baseline=mean, ready=ready)


class EMADetector(SpikeDetector):
    """Spike when the norm exceeds ``ratio`` times the EMA of earlier norms.

    Warm-up: the EMA starts at the mean of the first ``warmup_steps`` finite
    norms. Then, for each norm x::

        spike = x > ratio·m;   m ← β·m + (1-β)·min(x, ratio·m)

    ``score`` is ``x / m`` (0 during warm-up), ``baseline`` is m before the update.
    """

    name = "ema"

    def columns(self, info: DetectorInfo) -> dict[str, mx.array]:
        return {"ema": info.score}

    def __init__(self, beta: float = 0.98, ratio: float = 2.0, warmup_steps: int = 25):
        super().__init__()
        self.beta = check_fraction("beta", beta)
        self.ratio = check_bound("ratio", ratio, positive=True)
        self.warmup_steps = check_count("warmup_steps", warmup_steps, minimum=1)
        self.state.update(count=mx.array(0, mx.int32), ema=mx.array(0.0, mx.float32))

    def params(self) -> dict[str, Any]:
        return {"beta": self.beta, "ratio": self.ratio, "warmup_steps": self.warmup_steps}

    def __call__(self, norm) -> DetectorInfo:
        x = as_norm(norm)
        count, ema = self.state["count"], self.state["ema"]
        finite = mx.isfinite(x)
        warming = count < self.warmup_steps
        ready = ~warming

        take = warming & finite
        count_w, mean_w, _ = warmup_update(count, ema, mx.array(0.0), x, take)

        bound = self.ratio * ema
        outlier = ready & (x > bound)
        followed = self.beta * ema + (1 - self.beta) * mx.minimum(x, bound)
        update = ready & finite

        self.state["count"] = count_w
        self.state["ema"] = mx.where(update, followed, mean_w)
        score = mx.where(ema > 0, x / ema, mx.where(x > 0, mx.inf, 1.0))
        return DetectorInfo(score=mx.where(ready, score, 0.0), spike=outlier | ~finite,
                            baseline=ema, ready=ready)

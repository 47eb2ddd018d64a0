"""ZClip: z-score clipping against EMA statistics of the gradient norm (Kumar et al., 2025)."""
from __future__ import annotations

import math
from typing import Any, Optional

import mlx.core as mx

from .base import Clipper, check_bound, check_count, check_fraction
from .info import ClipInfo
from .norms import _norms_from_leaves, floating_leaves
from .stats import ema_mean_var, warmup_update

MODES = ("zscore", "percentile")
CLIP_OPTIONS = ("adaptive_scaling", "mean")


class ZClip(Clipper):
    """Clip the global norm when it is an outlier of its own recent history.

    The reference code (``zclip.py``, bluorion-com/ZClip, release 1.0.0),
    step by step, with x the global L2 norm:

    1. Warm-up, the first ``max(warmup_steps, 1)`` steps: the norms are
       collected; the gradients are clipped to ``max_grad_norm`` (if not
       None) with ``min(max_grad_norm / (x + 1e-6), 1)``. At the last warm-up
       step the mean μ and the population variance σ² of the collected norms
       initialise the statistics.
    2. Then, with ``σ = √σ²``:

       - ``mode="zscore"``: ``z = (x - μ) / (σ + eps)``; if ``z > z_thresh``
         the clip value is, for ``clip_option="adaptive_scaling"``,
         ``(μ + z_thresh·σ / (z / z_thresh)) · clip_factor`` and for
         ``clip_option="mean"``, μ.
       - ``mode="percentile"``: if ``x > μ + z_thresh·σ``, the clip value is
         ``μ + z_thresh·σ``.

       The gradients are clipped to ``c = min(clip value or x, max_grad_norm)``:
       multiplied by ``c / (x + 1e-6)`` when ``x > c``.
    3. The statistics are fed the clip value when there was one, else x
       (skipped on an outlier when ``skip_update_on_spike``):
       ``μ ← α·μ + (1-α)·v``, then ``σ² ← α·σ² + (1-α)·(v - μ)²`` with the
       new μ.

    Differences from the reference, all on the way it is computed, not on
    what it computes: everything is a lazy array (``mx.where`` for every
    branch), the warm-up keeps Welford's running mean and squared deviations
    instead of a list, and a non-finite norm is not collected nor fed to the
    statistics (the reference would make them NaN for good).

    Info: ``threshold`` is the smallest norm this step would clip:
    ``min(μ + z_thresh·(σ + eps), max_grad_norm)`` in ``zscore`` mode,
    ``min(μ + z_thresh·σ, max_grad_norm)`` in ``percentile`` mode,
    ``max_grad_norm`` (or ``inf``) during warm-up; the norm it clipped to is
    ``post_norm = pre_norm · scale``.

    References:
        Kumar, Owen, Roy Chowdhury, Güra, "ZClip: Adaptive Spike Mitigation
        for LLM Pre-Training", arXiv:2504.02507, 2025.
    """

    name = "zclip"

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, warmup_steps: int = 25,
                 mode: str = "zscore", clip_option: str = "adaptive_scaling",
                 clip_factor: float = 1.0, max_grad_norm: Optional[float] = 1.0,
                 skip_update_on_spike: bool = False, eps: float = 1e-6,
                 nonfinite: str = "propagate", group: Optional[mx.distributed.Group] = None):
        super().__init__(nonfinite)
        self.alpha = check_fraction("alpha", alpha)
        self.z_thresh = check_bound("z_thresh", z_thresh, positive=True)
        self.warmup_steps = check_count("warmup_steps", warmup_steps)
        self.mode = str(mode).lower()
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.clip_option = str(clip_option).lower()
        if self.clip_option not in CLIP_OPTIONS:
            raise ValueError(f"clip_option must be one of {CLIP_OPTIONS}, got {clip_option!r}")
        self.clip_factor = check_bound("clip_factor", clip_factor, positive=True)
        self.max_grad_norm = check_bound("max_grad_norm", max_grad_norm, optional=True)
        self.skip_update_on_spike = bool(skip_update_on_spike)
        self.eps = check_bound("eps", eps)
        self.group = group
        self.state.update(count=mx.array(0, mx.int32), mean=mx.array(0.0, mx.float32),
                          var=mx.array(0.0, mx.float32), m2=mx.array(0.0, mx.float32))

    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "z_thresh": self.z_thresh, "warmup_steps": self.warmup_steps,
                "mode": self.mode, "clip_option": self.clip_option,
                "clip_factor": self.clip_factor, "max_grad_norm": self.max_grad_norm,
                "skip_update_on_spike": self.skip_update_on_spike, "eps": self.eps,
                "group_size": None if self.group is None else self.group.size()}

    def __call__(self, grads: Any, params: Any = None) -> tuple[Any, ClipInfo]:
        norms, x = _norms_from_leaves(floating_leaves(grads), self.group)
        count, mean, var, m2 = (self.state[k] for k in ("count", "mean", "var", "m2"))
        cap = math.inf if self.max_grad_norm is None else self.max_grad_norm
        warmup = max(self.warmup_steps, 1)
        finite = mx.isfinite(x)
        warming = count < warmup

        # 1. Warm-up: collect, clip to max_grad_norm as torch.nn.utils.clip_grad_norm_ does.
        take = warming & finite
        count_w, mean_w, m2_w = warmup_update(count, mean, m2, x, take)
        init_now = take & (count_w >= warmup)
        warm_scale = mx.minimum(cap / (x + 1e-6), 1.0)

        # 2. After warm-up: is x an outlier, and what would it be clipped to?
        std = mx.sqrt(var)
        if self.mode == "percentile":
            detect = mean + self.z_thresh * std
            outlier = x > detect
            clip_value = detect
        else:
            detect = mean + self.z_thresh * (std + self.eps)
            z = (x - mean) / (std + self.eps)
            outlier = z > self.z_thresh
            if self.clip_option == "adaptive_scaling":
                eta = z / self.z_thresh  # a larger outlier is clipped harder
                clip_value = (mean + self.z_thresh * std / eta) * self.clip_factor
            else:
                clip_value = mean
        effective = mx.minimum(mx.where(outlier, clip_value, x), cap)
        post_scale = mx.where(x > effective, effective / (x + 1e-6), 1.0)

        # 3. Statistics follow the clip value, not the spike.
        fed = mx.where(outlier, clip_value, x)
        ema_mean, ema_var = ema_mean_var(mean, var, fed, self.alpha)
        update = ~warming & finite
        if self.skip_update_on_spike:
            update = update & ~outlier

        self.state["count"] = count_w
        self.state["m2"] = m2_w
        self.state["mean"] = mx.where(update, ema_mean, mean_w)
        self.state["var"] = mx.where(init_now, m2_w / count_w, mx.where(update, ema_var, var))

        threshold = mx.where(warming, cap, mx.minimum(detect, cap)).astype(mx.float32)
        return self._scaled_result(grads, x, mx.where(warming, warm_scale, post_scale),
                                   threshold, norms)

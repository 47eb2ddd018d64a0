"""The records a clipper or a spike detector returns: lazy arrays only.

Both are ``NamedTuple``s so they pass through :func:`mlx.core.compile`
unchanged (a compiled step may return them) and their fields can be read by
name. Nothing here is evaluated: the caller decides when to ``mx.eval``.
"""
from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx


class ClipInfo(NamedTuple):
    """What one clipping step did. Every field is a lazy ``mx.array``.

    Attributes:
        pre_norm: global L2 norm of the gradients before clipping (for
            ``GlobalNorm(ord=p)`` the global p-norm), float32 scalar.
        post_norm: global norm of the gradients after clipping, same ``ord``.
            For clippers that apply one factor to every tensor it is
            ``pre_norm * scale``; for per-tensor/unit/element clippers it is
            the norm of what they return. 0 when a non-finite step was skipped.
        scale: the factor applied to the whole gradient (``post_norm /
            pre_norm`` for clippers that do not apply one factor; 1 when
            ``pre_norm`` is 0; 0 when a non-finite step was skipped).
        threshold: in the units of ``pre_norm``. For clippers that apply one
            factor (GlobalNorm, ZClip, AutoClip): the smallest ``pre_norm``
            this step would clip (ZClip: its detection bound; the norm it
            clipped to is ``post_norm``); ``inf`` when nothing would be
            clipped (AutoClip's first step, ZClip's warm-up without
            ``max_grad_norm``). For per-tensor/unit/element clippers: the
            global norm of a gradient whose every piece sits exactly at its
            bound, an upper bound of ``post_norm``.
        clipped: bool scalar, True when anything was scaled down this step.
        nonfinite: bool scalar, True when ``pre_norm`` is NaN or infinite.
        tensor_norms: ``{flat name: L2 norm}`` of every floating-point tensor
            before clipping, names as :func:`mlx.utils.tree_flatten` spells
            them (``"layers.0.weight"``); computed on the way to the global
            L2 norm, so free for ``ord=2`` clippers (a p-norm or inf-norm
            clipper pays one extra pass for them).
    """

    pre_norm: mx.array
    post_norm: mx.array
    scale: mx.array
    threshold: mx.array
    clipped: mx.array
    nonfinite: mx.array
    tensor_norms: dict


class DetectorInfo(NamedTuple):
    """What a spike detector concluded about one norm. Lazy ``mx.array`` scalars.

    Attributes:
        score: the detector's statistic: the z-score for ``ZScoreDetector``,
            ``norm / ema`` for ``EMADetector``; 0 while warming up.
        spike: bool, True when the norm is a spike (after warm-up) or not finite.
        baseline: the running mean (or EMA) of earlier norms the score compares
            against; the running mean of the warm-up norms seen so far while
            warming up.
        ready: bool, True once warm-up is over (the score is meaningful).
        level_shift: bool, True on the one step where ``RobustDetector`` decided
            that the norm moved to a new level (a new regime, not a spike);
            always False for the other detectors.
    """

    score: mx.array
    spike: mx.array
    baseline: mx.array
    ready: mx.array
    level_shift: mx.array = mx.array(False)

"""Clip every gradient entry to ``[-clip_value, clip_value]`` (``optax.clip``)."""
from __future__ import annotations

import math
from typing import Any

import mlx.core as mx

from .base import Clipper, check_bound
from .info import ClipInfo
from .norms import _norms_from_leaves, floating_leaves, squared_norm, sum_in_order


class ValueClip(Clipper):
    """Element-wise clipping: ``g_i ← max(-c, min(c, g_i))``.

    Changes the direction of the gradient when it acts (each entry is cut on
    its own).

    Info: ``pre_norm``/``post_norm`` are the global L2 norms before/after
    (``post_norm`` costs a second pass over the gradients, only when it is
    evaluated); ``scale = post_norm / pre_norm`` (1 when ``pre_norm`` is 0);
    ``threshold = c·√N`` for N floating-point entries (the largest
    ``post_norm`` possible); ``clipped`` is True when some ``|g_i| > c``.

    Example:
        >>> clipped, info = ValueClip(1.0)({"w": mx.array([0.5, -3.0])})
        >>> clipped["w"].tolist(), info.clipped.item()
        ([0.5, -1.0], True)

    References:
        Mikolov, "Statistical Language Models Based on Neural Networks",
        PhD thesis, Brno University of Technology, 2012.
    """

    name = "value"

    def __init__(self, clip_value: float, nonfinite: str = "propagate"):
        super().__init__(nonfinite)
        self.clip_value = check_bound("clip_value", clip_value)

    def params(self) -> dict[str, Any]:
        return {"clip_value": self.clip_value}

    def __call__(self, grads: Any, params: Any = None) -> tuple[Any, ClipInfo]:
        c = self.clip_value
        leaves = floating_leaves(grads)
        norms, pre_norm = _norms_from_leaves(leaves, None)
        new = {name: mx.clip(g, -c, c) for name, g in leaves}
        post_norm = mx.sqrt(sum_in_order([squared_norm(g) for g in new.values()]))
        any_cut = mx.array(False)
        for _, g in leaves:
            any_cut = any_cut | (mx.abs(g).max() > c)
        size = sum(g.size for _, g in leaves)
        return self._per_piece_result(grads, new, norms, pre_norm, post_norm,
                      mx.array(c * math.sqrt(size), mx.float32), any_cut)

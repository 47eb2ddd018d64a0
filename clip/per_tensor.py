"""Clip each tensor's L2 norm on its own (``tf.clip_by_norm`` per tensor)."""
from __future__ import annotations

import math
from typing import Any

import mlx.core as mx

from .base import Clipper, check_bound
from .info import ClipInfo
from .norms import _norms_from_leaves, floating_leaves, sum_in_order


class PerTensorNorm(Clipper):
    """Scale each tensor so its own norm stays under ``max_norm``.

    ``s_t = min(max_norm / (‖g_t‖ + 1e-6), 1)``, ``g_t ← (g_t · s_t)`` cast
    back to its dtype (the global-norm rule applied tensor by tensor).

    Info: ``pre_norm``/``post_norm`` are the global L2 norms before/after
    (``post_norm = √Σ (s_t‖g_t‖)²``, no second pass);
    ``scale = post_norm / pre_norm``; ``threshold = max_norm·√T`` for T
    tensors (the largest ``post_norm`` possible); ``clipped`` when some
    ``s_t < 1``.
    """

    name = "per_tensor_norm"

    def __init__(self, max_norm: float, nonfinite: str = "propagate"):
        super().__init__(nonfinite)
        self.max_norm = check_bound("max_norm", max_norm)

    def params(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm}

    def __call__(self, grads: Any, params: Any = None) -> tuple[Any, ClipInfo]:
        leaves = floating_leaves(grads)
        norms, pre_norm = _norms_from_leaves(leaves, None)
        new, post_squares, any_cut = {}, [], mx.array(False)
        for name, g in leaves:
            s = mx.minimum(self.max_norm / (norms[name] + 1e-6), 1.0)
            new[name] = (g * s).astype(g.dtype)
            post_squares.append((norms[name] * s) ** 2)
            any_cut = any_cut | (s < 1)
        post_norm = mx.sqrt(sum_in_order(post_squares))
        threshold = mx.array(self.max_norm * math.sqrt(len(leaves)), mx.float32)
        return self._per_piece_result(grads, new, norms, pre_norm, post_norm, threshold, any_cut)

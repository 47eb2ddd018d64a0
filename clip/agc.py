"""Adaptive gradient clipping, unit-wise (Brock et al., 2021; ``optax.adaptive_grad_clip``)."""
from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from .base import Clipper, check_bound
from .info import ClipInfo
from .norms import floating_leaves, sum_in_order


def unitwise_squared_norm(x: mx.array) -> mx.array:
    """Squared L2 norm of each output unit, float32, with ``keepdims``.

    MLX stores a Linear weight as ``(out, in)`` (a conv weight as
    ``(out, ..., in)``), so a unit is a slice along axis 0 and the sum runs
    over every other axis. Scalars and vectors (biases, norm gains) are one
    unit. (optax's JAX layout is ``(in, out)``, hence its sum over axis 0.)
    """
    x = x.astype(mx.float32) if x.dtype in (mx.float16, mx.bfloat16) else x
    if x.ndim <= 1:
        return x.square().sum(keepdims=True)
    return x.square().sum(axis=tuple(range(1, x.ndim)), keepdims=True)


class AGC(Clipper):
    """Clip each unit's gradient to a fraction of that unit's weight norm.

    For each output unit u of each tensor (see :func:`unitwise_squared_norm`)::

        bound_u = clipping · max(‖W_u‖, eps)
        G_u ← G_u                               if ‖G_u‖ < bound_u
        G_u ← G_u · bound_u / max(‖G_u‖, 1e-6)  otherwise

    Needs the parameters: ``clipper(grads, params=model.parameters())``.

    Info: ``pre_norm``/``post_norm`` are the global L2 norms before/after
    (from the unit norms, no second pass); ``scale = post_norm / pre_norm``;
    ``threshold = √Σ_u bound_u²`` (the global norm of a gradient with every
    unit at its bound, an upper bound of ``post_norm``); ``clipped`` when
    some unit was scaled down.

    References:
        Brock, De, Smith, Simonyan, "High-Performance Large-Scale Image
        Recognition Without Normalization", ICML 2021.
    """

    name = "agc"

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3, nonfinite: str = "propagate"):
        super().__init__(nonfinite)
        self.clipping = check_bound("clipping", clipping)
        self.eps = check_bound("eps", eps)

    def params(self) -> dict[str, Any]:
        return {"clipping": self.clipping, "eps": self.eps}

    def __call__(self, grads: Any, params: Any = None) -> tuple[Any, ClipInfo]:
        leaves = floating_leaves(grads)
        if params is None:
            raise ValueError("AGC needs the parameters: call it as clipper(grads, params=...) "
                             "with a tree shaped like grads (e.g. model.parameters())")
        weights = dict(tree_flatten(params))
        new, norms, pre_squares, post_squares, bound_squares = {}, {}, [], [], []
        any_cut = mx.array(False)
        for name, g in leaves:
            w = weights.get(name)
            if not isinstance(w, mx.array):
                raise ValueError(f"AGC: params has no array named {name!r} to match the gradient")
            if w.shape != g.shape:
                raise ValueError(f"AGC: params[{name!r}] has shape {tuple(w.shape)}, "
                                 f"the gradient has {tuple(g.shape)}")
            g_units = unitwise_squared_norm(g)
            g_norm = mx.sqrt(g_units)
            bound = mx.maximum(mx.sqrt(unitwise_squared_norm(w)), self.eps) * self.clipping
            keep = g_norm < bound
            factor = mx.where(keep, 1.0, bound / mx.maximum(g_norm, 1e-6))
            new[name] = mx.where(keep, g, (g * factor).astype(g.dtype))
            tensor_square = g_units.sum()
            norms[name] = mx.sqrt(tensor_square)
            pre_squares.append(tensor_square)
            post_squares.append((g_norm * factor).square().sum())
            bound_squares.append(bound.square().sum())
            any_cut = any_cut | mx.any(~keep)
        pre_norm = mx.sqrt(sum_in_order(pre_squares))
        post_norm = mx.sqrt(sum_in_order(post_squares))
        threshold = mx.sqrt(sum_in_order(bound_squares)).astype(mx.float32)
        return self._per_piece_result(grads, new, norms, pre_norm, post_norm, threshold, any_cut)

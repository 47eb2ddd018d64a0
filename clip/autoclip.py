"""AutoClip: clip to a quantile of the gradient norms seen so far (Seetharaman et al., 2020)."""
from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx

from .base import Clipper, check_count, check_fraction
from .info import ClipInfo
from .norms import _norms_from_leaves, floating_leaves


def quantile_of_first(values: mx.array, count: mx.array, q: float) -> mx.array:
    """The ``q`` quantile of ``values[:count]`` with linear interpolation (NumPy's default).

    Lazy: entries at and past ``count`` are masked with ``+inf`` so a sort
    puts them last, and the two order statistics around ``q·(count-1)`` are
    picked with ``take``. ``inf`` when ``count`` is 0.
    """
    size = values.shape[0]
    n = mx.minimum(count, size)
    valid = mx.arange(size) < n
    ordered = mx.sort(mx.where(valid, values, mx.inf))
    position = q * (n - 1).astype(mx.float32)
    low = mx.maximum(mx.floor(position), 0.0)
    high = mx.minimum(low + 1, mx.maximum(n - 1, 0))
    a = mx.take(ordered, low.astype(mx.int32))
    b = mx.take(ordered, high.astype(mx.int32))
    return mx.where(n > 0, a + (b - a) * (position - low), mx.inf)


class AutoClip(Clipper):
    """Clip the global norm to the ``quantile`` of the earlier pre-clip norms.

    ``threshold_t = quantile({‖g_s‖ : s < t, last `history` steps})``, then
    the global-norm rule: ``g ← g · min(threshold_t / (‖g_t‖ + 1e-6), 1)``.
    The first step is not clipped (no history: ``threshold = inf``). The
    norms live in a ring buffer of ``history`` entries (``state["norms"]``,
    with ``state["count"]`` the number of norms ever written); non-finite
    norms are not written. Unlike the paper's code, the current norm is not
    part of its own threshold's history.

    Info: ``threshold`` is the quantile, ``post_norm = pre_norm · scale``.

    References:
        Seetharaman, Wichern, Pardo, Le Roux, "AutoClip: Adaptive Gradient
        Clipping for Source Separation Networks", MLSP 2020.
    """

    name = "autoclip"

    def __init__(self, quantile: float = 0.9, history: int = 1000, nonfinite: str = "propagate",
                 group: Optional[mx.distributed.Group] = None):
        super().__init__(nonfinite)
        self.quantile = check_fraction("quantile", quantile, closed_high=True)
        self.history = check_count("history", history, minimum=1)
        self.group = group
        self.state.update(norms=mx.full((self.history,), mx.inf, mx.float32),
                          count=mx.array(0, mx.int32))

    def params(self) -> dict[str, Any]:
        return {"quantile": self.quantile, "history": self.history,
                "group_size": None if self.group is None else self.group.size()}

    def __call__(self, grads: Any, params: Any = None) -> tuple[Any, ClipInfo]:
        norms, pre_norm = _norms_from_leaves(floating_leaves(grads), self.group)
        history, count = self.state["norms"], self.state["count"]
        threshold = quantile_of_first(history, count, self.quantile)
        scale = mx.minimum(threshold / (pre_norm + 1e-6), 1.0)
        finite = mx.isfinite(pre_norm)
        slot = mx.arange(self.history) == (count % self.history)
        self.state["norms"] = mx.where(slot & finite, pre_norm, history)
        self.state["count"] = mx.where(finite, count + 1, count)

        return self._scaled_result(grads, pre_norm, scale, threshold, norms)

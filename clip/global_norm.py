"""Clip by global norm (Pascanu et al., 2013), exactly as MLX does it."""
from __future__ import annotations

import math
from typing import Any, Optional

import mlx.core as mx

from .base import Clipper, check_bound
from .info import ClipInfo
from .norms import _global_from_leaves, _norms_from_leaves, check_ord, floating_leaves


class GlobalNorm(Clipper):
    """Scale every gradient by one factor so the global norm stays under ``max_norm``.

    ``scale = min(max_norm / (‖g‖_p + 1e-6), 1)``, ``g ← (g · scale)`` cast back
    to ``g``'s dtype. For ``ord=2`` this is :func:`mlx.optimizers.clip_grad_norm`
    bit for bit on float32 and float16 gradients; bfloat16 squares are summed
    in float32 here (MLX sums them in bfloat16), so on bfloat16 trees the norm
    is more accurate than MLX's and the result may differ from MLX's by a
    bfloat16 rounding. Other orders follow ``torch.nn.utils.clip_grad_norm_``
    with ``norm_type=ord``.

    Args:
        max_norm: the largest global norm let through, finite and ``>= 0``.
        ord: the norm, ``p >= 1`` or ``float("inf")``.
        nonfinite: ``"propagate"``, ``"skip"`` or ``"raise"`` (see
            :class:`~gradwatch.clip.base.Clipper`).
        group: ``mx.distributed`` group over which the gradients are sharded;
            local sums of ``|g|^p`` are added with ``all_sum`` before the root
            (as ``mlx.nn.utils.clip_grad_norm_sharded``).

    Info: ``threshold = max_norm``, ``post_norm = pre_norm · scale``,
    ``clipped = scale < 1``.

    Example:
        >>> clipped, info = GlobalNorm(1.0)({"w": mx.array([3.0, 4.0])})
        >>> info.pre_norm.item(), round(info.scale.item(), 6)
        (5.0, 0.2)

    References:
        Pascanu, Mikolov, Bengio, "On the difficulty of training recurrent
        neural networks", ICML 2013.
    """

    name = "global_norm"

    def __init__(self, max_norm: float, ord: float = 2, nonfinite: str = "propagate",
                 group: Optional[mx.distributed.Group] = None):
        super().__init__(nonfinite)
        self.max_norm = check_bound("max_norm", max_norm)
        self.ord = check_ord(ord)
        self.group = group

    def params(self) -> dict[str, Any]:
        ord_value = "inf" if math.isinf(self.ord) else self.ord
        return {"max_norm": self.max_norm, "ord": ord_value,
                "group_size": None if self.group is None else self.group.size()}

    def __call__(self, grads: Any, params: Any = None) -> tuple[Any, ClipInfo]:
        leaves = floating_leaves(grads)
        norms, l2_norm = _norms_from_leaves(leaves, self.group)
        pre_norm = l2_norm if self.ord == 2 else _global_from_leaves(leaves, self.ord, self.group)
        # The expression of mlx.optimizers.clip_grad_norm, so the result is identical.
        scale = mx.minimum(self.max_norm / (pre_norm + 1e-6), 1.0)
        return self._scaled_result(grads, pre_norm, scale,
                                   mx.array(self.max_norm, mx.float32), norms)

"""Gradient norms as lazy MLX ops: per tensor, global, and both at once.

Squares of float16/bfloat16 gradients are summed in float32 so they neither
overflow nor lose the small entries. The global L2 norm is built from the
per-tensor squared norms, added one tensor after the other in the order
:func:`mlx.utils.tree_flatten` visits them (the order
:func:`mlx.optimizers.clip_grad_norm` uses), so asking for the per-tensor norms
as well costs no second pass over the gradients and the float32/float16 global
norm is bit-identical to MLX's.

Leaves must be ``mx.array``; integer and bool leaves are not gradients and are
left out of every norm (a tree with no floating-point leaf is refused).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import mlx.core as mx
from mlx.utils import tree_flatten

_HALF = (mx.float16, mx.bfloat16)


def floating_leaves(grads: Any, what: str = "grads") -> list[tuple[str, mx.array]]:
    """``[(flat name, array)]`` for the floating-point leaves of ``grads``.

    Raises:
        ValueError: the tree is empty or holds no floating-point array.
        TypeError: a leaf is not an ``mx.array`` (the message names its path).
    """
    flat = tree_flatten(grads)
    if not flat:
        raise ValueError(f"{what} is an empty tree: expected at least one mx.array leaf")
    for name, leaf in flat:
        if not isinstance(leaf, mx.array):
            where = f"leaf {name!r}" if name else "the top-level value"
            raise TypeError(f"{what}: {where} is a {type(leaf).__name__}, expected mx.array")
    floating = [(name, leaf) for name, leaf in flat if mx.issubdtype(leaf.dtype, mx.floating)]
    if not floating:
        dtypes = sorted({str(leaf.dtype) for _, leaf in flat})
        raise ValueError(f"{what} has no floating-point array (dtypes found: {', '.join(dtypes)}); "
                         "gradients must be float16, bfloat16 or float32")
    return floating


def squared_norm(g: mx.array) -> mx.array:
    """Sum of squares of ``g`` as a scalar; float16/bfloat16 are summed in float32."""
    if g.dtype in _HALF:
        g = g.astype(mx.float32)
    return g.square().sum()


def sum_in_order(values: list[mx.array]) -> mx.array:
    """``((0.0 + v0) + v1) + ...``: the order and rounding of ``tree_reduce``."""
    total = 0.0
    for value in values:
        total = total + value
    return total


def check_ord(ord: Any) -> float:
    """Validate a norm order: a real ``p >= 1`` or ``inf``; returns it as a float."""
    try:
        p = float(ord)
    except (TypeError, ValueError):
        raise ValueError(f"ord must be a number >= 1 or inf, got {ord!r}") from None
    if math.isnan(p) or p < 1:
        raise ValueError(f"ord must be a number >= 1 or inf, got {ord!r}")
    return p


def _global_from_leaves(leaves: list[tuple[str, mx.array]], p: float,
                        group: Optional[mx.distributed.Group]) -> mx.array:
    if p == 2:
        total = sum_in_order([squared_norm(g) for _, g in leaves])
        if group is not None:
            total = mx.distributed.all_sum(total, group=group)
        return mx.sqrt(total)
    if math.isinf(p):
        largest = mx.array(0.0, mx.float32)
        for _, g in leaves:
            largest = mx.maximum(largest, mx.abs(g).max().astype(mx.float32))
        if group is not None:
            largest = mx.distributed.all_max(largest, group=group)
        return largest
    total = sum_in_order([mx.power(mx.abs(g.astype(mx.float32)), p).sum() for _, g in leaves])
    if group is not None:
        total = mx.distributed.all_sum(total, group=group)
    return mx.power(total, 1.0 / p)


def global_norm(grads: Any, ord: float = 2, group: Optional[mx.distributed.Group] = None
                ) -> mx.array:
    """Norm of all gradients taken together as one vector (lazy float32 scalar).

    ``‖g‖_p = (Σ_tensors Σ_i |g_i|^p)^(1/p)``, ``‖g‖_∞ = max_i |g_i|``
    (as ``torch.nn.utils.clip_grad_norm_`` with ``norm_type=p``).

    Args:
        grads: any MLX tree (dicts, lists, tuples) of arrays.
        ord: ``p >= 1`` or ``float("inf")``.
        group: an ``mx.distributed`` group over which the gradients are
            sharded: the local sums ``Σ|g|^p`` are added across ranks with
            ``mx.distributed.all_sum`` (``all_max`` for ``inf``) before the root,
            as ``mlx.nn.utils.clip_grad_norm_sharded`` does.

    Example:
        >>> grads = {"w": mx.array([3.0, -4.0]), "b": [mx.array([12.0])]}
        >>> global_norm(grads).item(), global_norm(grads, ord=1).item()
        (13.0, 19.0)
        >>> global_norm(grads, ord=float("inf")).item()
        12.0
    """
    return _global_from_leaves(floating_leaves(grads), check_ord(ord), group)


def tensor_norms(grads: Any) -> dict[str, mx.array]:
    """``{flat name: L2 norm}`` for each floating-point tensor (lazy float32 scalars).

    Names are spelled as :func:`mlx.utils.tree_flatten` spells them,
    e.g. ``{"layers.0.weight": ...}``.

    Example:
        >>> norms = tensor_norms({"layers": [{"weight": mx.array([3.0, 4.0])}]})
        >>> {name: norm.item() for name, norm in norms.items()}
        {'layers.0.weight': 5.0}
    """
    return {name: mx.sqrt(squared_norm(g)) for name, g in floating_leaves(grads)}


def norms_and_global(grads: Any, group: Optional[mx.distributed.Group] = None
                     ) -> tuple[dict[str, mx.array], mx.array]:
    """Per-tensor L2 norms and the global L2 norm from one pass over the gradients.

    Returns ``(tensor_norms, global_norm)``; the global norm is the root of the
    per-tensor squared norms added in tree order (with ``group``, summed across
    ranks first; the per-tensor norms are then those of the local shards).

    Example:
        >>> norms, total = norms_and_global({"a": mx.array([3.0]), "b": mx.array([4.0])})
        >>> norms["a"].item(), norms["b"].item(), total.item()
        (3.0, 4.0, 5.0)
    """
    return _norms_from_leaves(floating_leaves(grads), group)


def _norms_from_leaves(leaves: list[tuple[str, mx.array]],
                       group: Optional[mx.distributed.Group]
                       ) -> tuple[dict[str, mx.array], mx.array]:
    squares = [squared_norm(g) for _, g in leaves]
    total = sum_in_order(squares)
    if group is not None:
        total = mx.distributed.all_sum(total, group=group)
    norms = {name: mx.sqrt(sq) for (name, _), sq in zip(leaves, squares)}
    return norms, mx.sqrt(total)

"""What every clipper shares: argument checks, the non-finite policy, scaling.

A clipper is a small stateful object, shaped like an MLX optimizer::

    clipped, info = clipper(grads, params=None)

``info`` is a :class:`~gradwatch.clip.info.ClipInfo` of lazy arrays and
``clipper.state`` is a dict of ``mx.array`` that the call replaces entries of
(never the dict itself), so a training step compiles with
``mx.compile(step, inputs=clipper.state, outputs=clipper.state)``.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import mlx.core as mx
from mlx.utils import tree_map, tree_map_with_path

from .info import ClipInfo

NONFINITE_POLICIES = ("propagate", "skip", "raise")


def check_bound(name: str, value: Any, *, positive: bool = False, optional: bool = False
                ) -> Optional[float]:
    """A finite real number ``>= 0`` (``> 0`` with ``positive``), as a float.

    Raises ``ValueError`` naming the argument and the value otherwise.
    """
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if number < 0 or (positive and number == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return number


def check_fraction(name: str, value: Any, *, closed_low: bool = True, closed_high: bool = False
                   ) -> float:
    """A real number in ``[0, 1)`` (bounds as asked), as a float."""
    number = check_bound(name, value)
    low_ok = number >= 0 if closed_low else number > 0
    high_ok = number <= 1 if closed_high else number < 1
    if not (low_ok and high_ok):
        interval = ("[" if closed_low else "(") + "0, 1" + ("]" if closed_high else ")")
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return number


def check_count(name: str, value: Any, minimum: int = 0) -> int:
    """An ``int >= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def scale_tree(grads: Any, factor: mx.array) -> Any:
    """Multiply every floating-point leaf by ``factor``, cast back to its dtype.

    Casting after the product (not the factor before it) is what
    ``mlx.optimizers.clip_grad_norm`` does: a small factor does not underflow
    in float16. Non-floating leaves pass through untouched.
    """
    def scale(g):
        if mx.issubdtype(g.dtype, mx.floating):
            return (g * factor).astype(g.dtype)
        return g
    return tree_map(scale, grads)


def replace_leaves(grads: Any, new_by_name: dict[str, mx.array]) -> Any:
    """``grads`` with the leaves named in ``new_by_name`` replaced (structure kept)."""
    return tree_map_with_path(lambda path, g: new_by_name.get(path or "", g), grads)


def zero_if(condition: mx.array, grads: Any) -> Any:
    """Every floating-point leaf replaced by zeros where ``condition`` holds."""
    def zero(g):
        if mx.issubdtype(g.dtype, mx.floating):
            return mx.where(condition, mx.zeros_like(g), g)
        return g
    return tree_map(zero, grads)


class Clipper:
    """Base class: holds ``state``, the non-finite policy, and ``config()``.

    ``nonfinite`` says what happens when the pre-clip norm is NaN or infinite:

    - ``"propagate"``: nothing special, as ``mlx.optimizers.clip_grad_norm``
      (non-finite values flow on to the optimizer);
    - ``"skip"``: the returned gradients are all zeros and the clipper's
      state is left as it was. Zero gradients do NOT skip a stateful
      optimizer's step (AdamW's moments keep moving the weights, weight decay
      applies, the step count advances): apply the update with
      :func:`gradwatch.clip.apply_update` and ``skip=info.nonfinite`` (or
      ``GradWatch.update``), which keeps parameters and optimizer state
      bit-unchanged on such a step;
    - ``"raise"``: like ``propagate`` inside the (lazy) call; whoever reads
      ``info.nonfinite`` (the gradwatch agent) raises when it is True.

    Whatever the policy, a non-finite norm never enters a clipper's running
    statistics.
    """

    name = "clipper"

    def __init__(self, nonfinite: str = "propagate"):
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        self.nonfinite = nonfinite
        self.state: dict[str, mx.array] = {}

    def params(self) -> dict[str, Any]:
        """The constructor arguments, JSON-serialisable (override)."""
        return {}

    def config(self) -> dict[str, Any]:
        """``{"name": ..., <constructor arguments>..., "nonfinite": ...}``: plain JSON values."""
        return {"name": self.name, **self.params(), "nonfinite": self.nonfinite}

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.config().items() if key != "name")
        return f"{type(self).__name__}({args})"

    def _apply_policy(self, clipped: Any, nonfinite: mx.array) -> Any:
        if self.nonfinite == "skip":
            return zero_if(nonfinite, clipped)
        return clipped

    def _result(self, clipped: Any, pre_norm: mx.array, post_norm: mx.array, scale: mx.array,
                threshold: mx.array, was_clipped: mx.array, norms: dict[str, mx.array]):
        """Apply the non-finite policy and assemble ``(clipped_grads, ClipInfo)``."""
        nonfinite = ~mx.isfinite(pre_norm)
        clipped = self._apply_policy(clipped, nonfinite)
        if self.nonfinite == "skip":
            scale = mx.where(nonfinite, 0.0, scale)
            post_norm = mx.where(nonfinite, 0.0, post_norm)
        return clipped, ClipInfo(pre_norm=pre_norm, post_norm=post_norm, scale=scale,
                                 threshold=threshold, clipped=was_clipped, nonfinite=nonfinite,
                                 tensor_norms=norms)

    def _scaled_result(self, grads: Any, pre_norm: mx.array, scale: mx.array,
                       threshold: mx.array, norms: dict[str, mx.array]):
        """Result of a clipper that multiplies the whole tree by one factor."""
        return self._result(scale_tree(grads, scale), pre_norm, pre_norm * scale, scale, threshold,
                            scale < 1, norms)

    def _per_piece_result(self, grads: Any, new: dict[str, mx.array], norms: dict[str, mx.array],
                          pre_norm: mx.array, post_norm: mx.array, threshold: mx.array,
                          was_clipped: mx.array):
        """Result of a clipper that cuts tensors, units or elements on their own:
        ``new`` holds the clipped floating leaves by name; ``scale = post/pre``."""
        scale = mx.where(pre_norm > 0, post_norm / pre_norm, 1.0)
        return self._result(replace_leaves(grads, new), pre_norm, post_norm, scale, threshold,
                            was_clipped, norms)

    def __call__(self, grads: Any, params: Any = None):
        raise NotImplementedError

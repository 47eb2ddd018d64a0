"""AdaGC: per-tensor clipping relative to an EMA of each tensor's own norm (Wang et al., 2025)."""
from __future__ import annotations

from typing import Any

import mlx.core as mx

from .base import Clipper, check_bound, check_count, check_fraction
from .norms import _norms_from_leaves, floating_leaves, sum_in_order


class AdaGC(Clipper):
    """Clip each tensor against ``lambda_rel`` times the EMA of its clipped norms.

    For tensor i with gradient g_i at step t (Algorithm 1 of the paper)::

        t < warmup_steps:  ĝ_i = g_i · min(lambda_abs / (‖g‖ + 1e-6), 1)     (global clip)
                           γ_i = min(γ_i, ‖ĝ_i‖)                          (γ_i starts at ‖ĝ_i‖)
        afterwards:        ĝ_i = g_i · min(lambda_rel · γ_i / ‖g_i‖, 1)
                           γ_i ← β·γ_i + (1-β)·‖ĝ_i‖

    ``state``: ``{"count": steps taken (capped at warmup_steps), "gamma":
    {flat tensor name: γ_i}}``, created at the first call or by
    :meth:`init` (call ``init(grads)`` before ``mx.compile`` so the state
    tree exists when the compiled step is built). A step whose global norm
    is not finite leaves the state alone. A tensor whose gradient is zero
    through the whole warm-up gets γ_i = 0 and stays clipped to zero, as in
    the paper's algorithm.

    Info: ``pre_norm``/``post_norm`` are the global L2 norms before/after
    (``post_norm = √Σ ‖ĝ_i‖²``, no second pass); ``scale = post_norm /
    pre_norm``; ``threshold`` is ``lambda_abs`` during warm-up, then
    ``√Σ (lambda_rel·γ_i)²`` (an upper bound of ``post_norm``); ``clipped``
    when some tensor was scaled down.

    References:
        Wang et al., "AdaGC: Improving Training Stability for Large Language
        Model Pretraining", arXiv:2502.11034, 2025.
    """

    name = "adagc"

    def __init__(self, beta: float = 0.98, lambda_rel: float = 1.05, lambda_abs: float = 1.0,
                 warmup_steps: int = 100, nonfinite: str = "propagate"):
        super().__init__(nonfinite)
        self.beta = check_fraction("beta", beta)
        self.lambda_rel = check_bound("lambda_rel", lambda_rel, positive=True)
        self.lambda_abs = check_bound("lambda_abs", lambda_abs)
        self.warmup_steps = check_count("warmup_steps", warmup_steps, minimum=1)

    def params(self) -> dict[str, Any]:
        return {"beta": self.beta, "lambda_rel": self.lambda_rel, "lambda_abs": self.lambda_abs,
                "warmup_steps": self.warmup_steps}

    def init(self, grads: Any) -> None:
        """Create the state for a gradient tree shaped like ``grads`` (no-op if present)."""
        if "gamma" in self.state:
            return
        names = [name for name, _ in floating_leaves(grads)]
        self.state["count"] = mx.array(0, mx.int32)
        self.state["gamma"] = {name: mx.array(mx.inf, mx.float32) for name in names}

    def __call__(self, grads: Any, params: Any = None):
        self.init(grads)
        leaves = floating_leaves(grads)
        gamma = self.state["gamma"]
        missing = [name for name, _ in leaves if name not in gamma]
        if missing:
            raise ValueError(f"AdaGC: no state for tensors {missing[:5]}; the gradient tree "
                             "changed since the first call")
        norms, pre_norm = _norms_from_leaves(leaves, None)
        count = self.state["count"]
        warming = count < self.warmup_steps
        finite = mx.isfinite(pre_norm)
        global_scale = mx.minimum(self.lambda_abs / (pre_norm + 1e-6), 1.0)

        new, new_gamma, post_squares, bound_squares = {}, {}, [], []
        any_cut = mx.array(False)
        for name, g in leaves:
            norm, old = norms[name], gamma[name]
            bound = self.lambda_rel * old
            # where(), not min(bound / norm, 1): a zero gradient must not give 0/0.
            relative = mx.where(bound < norm, bound / norm, 1.0)
            s = mx.where(warming, global_scale, relative)
            new[name] = (g * s).astype(g.dtype)
            clipped_norm = norm * s
            followed = mx.where(warming, mx.minimum(old, clipped_norm),
                                self.beta * old + (1 - self.beta) * clipped_norm)
            new_gamma[name] = mx.where(finite, followed, old)
            post_squares.append(clipped_norm ** 2)
            bound_squares.append(bound ** 2)
            any_cut = any_cut | (s < 1)
        self.state["gamma"] = new_gamma
        self.state["count"] = mx.where(finite & warming, count + 1, count)

        post_norm = mx.sqrt(sum_in_order(post_squares))
        threshold = mx.where(warming, self.lambda_abs, mx.sqrt(sum_in_order(bound_squares)))
        return self._per_piece_result(grads, new, norms, pre_norm, post_norm,
                      threshold.astype(mx.float32), any_cut)

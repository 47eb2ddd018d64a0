"""Skip a whole optimizer step on a lazy flag: parameters AND optimizer state kept bit for bit.

Zeroing the gradients does not skip an AdamW step: the moments decay and
keep moving the weights, weight decay still shrinks them, the step count
(and with it the bias correction and a learning-rate schedule) advances.
A skipped step must leave everything as it was. OLMo-core's
``SkipStepAdamW`` and Levanter's ``skipstep`` do this on a spike; here the
update is computed as usual and both trees are selected with ``mx.where``,
so ``skip`` stays a lazy array: no host sync, and it compiles.

    clipped, info = GlobalNorm(1.0, nonfinite="skip")(grads)
    apply_update(optimizer, model, clipped, info.nonfinite)
    mx.eval(model.parameters(), optimizer.state)
"""
from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx.utils import tree_map


def skip_where(skip: mx.array, new: Any, old: Any) -> Any:
    """``old`` where ``skip`` holds, else ``new``, leaf by leaf (same tree structure).

    Non-array leaves (Python numbers in a state) are taken from ``new``.
    """
    def pick(new_leaf, old_leaf):
        if isinstance(new_leaf, mx.array) and isinstance(old_leaf, mx.array):
            return mx.where(skip, old_leaf, new_leaf)
        return new_leaf
    return tree_map(pick, new, old)


def apply_update(optimizer: Any, model: Any, grads: Any, skip: Any = None) -> None:
    """``optimizer.update(model, grads)``, undone (lazily) where ``skip`` is True.

    Args:
        optimizer: an ``mlx.optimizers.Optimizer``.
        model: the ``mlx.nn.Module`` it updates.
        grads: the (clipped) gradients.
        skip: a bool ``mx.array`` scalar (lazy is fine), a Python bool, or
            None (never skip). When True, ``model.parameters()`` and every
            array of ``optimizer.state`` (moments, step count, learning rate)
            are exactly what they were before the call.

    The optimizer is initialised first when it has not been, so a skipped
    first step keeps the (freshly initialised) state structure. Works inside
    ``mx.compile(step, inputs=[model.state, optimizer.state], outputs=...)``.
    """
    if skip is None:
        optimizer.update(model, grads)
        return
    skip = mx.array(skip) if not isinstance(skip, mx.array) else skip
    skip = skip.reshape(()).astype(mx.bool_)
    if not getattr(optimizer, "_initialized", True):
        optimizer.init(grads)
    params_before = model.parameters()
    # The optimizer replaces arrays inside its nested state dicts: copy the tree
    # (not the arrays, which are immutable) so the old ones are kept.
    state_before = tree_map(lambda leaf: leaf, optimizer.state)
    optimizer.update(model, grads)
    model.update(skip_where(skip, model.parameters(), params_before))
    kept = skip_where(skip, dict(optimizer.state), state_before)
    optimizer.state.update(kept)  # in place: the state setter would re-initialise

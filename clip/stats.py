"""Running statistics of a scalar stream, as lazy masked updates.

Shared by ZClip and the spike detectors. Each function takes the current
state arrays and returns the next ones; ``take`` (a bool array) says whether
the new value is used at all, so a caller never branches in Python.
"""
from __future__ import annotations

import mlx.core as mx


def warmup_update(count: mx.array, mean: mx.array, m2: mx.array, x: mx.array, take: mx.array
                  ) -> tuple[mx.array, mx.array, mx.array]:
    """Welford's running mean and sum of squared deviations, updated where ``take``.

    After n values, ``mean = Σx/n`` and ``m2 / n`` is the population variance
    ``Σ(x - mean)²/n``, what a list of the values would give, without keeping
    the list and without the cancellation of ``Σx²/n - mean²``.
    """
    n = count + 1
    delta = x - mean
    new_mean = mean + delta / n
    new_m2 = m2 + delta * (x - new_mean)
    return (mx.where(take, n, count), mx.where(take, new_mean, mean),
            mx.where(take, new_m2, m2))


def ema_mean_var(mean: mx.array, var: mx.array, x: mx.array, alpha: float
                 ) -> tuple[mx.array, mx.array]:
    """ZClip's update: the mean first, then the variance around the new mean.

    ``μ ← α·μ + (1-α)·x``;  ``σ² ← α·σ² + (1-α)·(x - μ)²``.
    """
    new_mean = alpha * mean + (1 - alpha) * x
    new_var = alpha * var + (1 - alpha) * (x - new_mean) ** 2
    return new_mean, new_var


def as_norm(norm) -> mx.array:
    """A norm given as an ``mx.array`` or a Python number, as a float32 scalar array."""
    if not isinstance(norm, mx.array):
        norm = mx.array(norm)
    if norm.size != 1:
        raise ValueError(f"expected a scalar norm, got an array of shape {tuple(norm.shape)}")
    return norm.reshape(()).astype(mx.float32)

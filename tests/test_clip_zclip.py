"""ZClip against a plain-Python port of the reference code (bluorion-com/ZClip, zclip.py 1.0.0).

`ReferenceZClip` below follows the reference line by line on Python floats,
with the gradient tree replaced by its norm: the reference returns after the
warm-up branch, clips with `clip_coef = max_global / (global + 1e-6)` only
when `global > max_global`, and feeds `clip_val` (not the spike) to the EMA.
"""
from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from gradwatch.clip import ZClip


class ReferenceZClip:
    def __init__(self, alpha=0.97, z_thresh=2.5, max_grad_norm=1.0, eps=1e-6, warmup_steps=25,
                 mode="zscore", clip_option="adaptive_scaling", clip_factor=1.0,
                 skip_update_on_spike=False):
        self.alpha, self.z_thresh, self.max_grad_norm, self.eps = alpha, z_thresh, max_grad_norm, eps
        self.warmup_steps, self.mode, self.clip_option = warmup_steps, mode, clip_option
        self.clip_factor, self.skip_update_on_spike = clip_factor, skip_update_on_spike
        self.buffer, self.initialized, self.mean, self.var = [], False, None, None

    def _initialize_ema(self):
        self.mean = sum(self.buffer) / len(self.buffer)
        self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
        self.initialized = True
        self.buffer = []

    def _update_ema(self, grad_norm):
        self.mean = self.alpha * self.mean + (1 - self.alpha) * grad_norm
        self.var = self.alpha * self.var + (1 - self.alpha) * (grad_norm - self.mean) ** 2

    def _compute_clip_val(self, grad_norm):
        std = self.var ** 0.5
        if self.mode == "percentile":
            threshold = self.mean + self.z_thresh * std
            if grad_norm > threshold:
                return threshold
        elif self.mode == "zscore":
            z = (grad_norm - self.mean) / (std + self.eps)
            if z > self.z_thresh:
                if self.clip_option == "adaptive_scaling":
                    eta = z / self.z_thresh
                    threshold = self.mean + (self.z_thresh * std) / eta
                    threshold = threshold * self.clip_factor
                elif self.clip_option == "mean":
                    threshold = self.mean
                return threshold
        return None

    def step(self, total_norm: float) -> float:
        """Returns the factor the reference multiplies the gradients by."""
        if not self.initialized:
            self.buffer.append(total_norm)
            if len(self.buffer) >= self.warmup_steps:
                self._initialize_ema()
            if self.max_grad_norm is not None:  # torch.nn.utils.clip_grad_norm_
                return min(self.max_grad_norm / (total_norm + 1e-6), 1.0)
            return 1.0
        clip_val = self._compute_clip_val(total_norm)
        adaptive_clip = clip_val if clip_val is not None else total_norm
        if self.max_grad_norm is not None:
            effective_clip = min(adaptive_clip, self.max_grad_norm)
        else:
            effective_clip = adaptive_clip
        coef = (effective_clip / (total_norm + 1e-6)) if total_norm > effective_clip else 1.0
        if clip_val is not None and self.skip_update_on_spike:
            return coef
        self._update_ema(clip_val if clip_val is not None else total_norm)
        return coef


def norm_sequence():
    rng = np.random.default_rng(5)
    norms = list(0.5 + 0.05 * rng.standard_normal(40))
    norms[3] = 1.4     # above max_grad_norm during warm-up
    norms[15] = 5.0    # a big spike
    norms[16] = 0.62   # a mild outlier in zscore terms
    norms[25] = 3.0    # another spike
    norms[26] = 0.9
    return norms


def grads_with_norm(direction: np.ndarray, norm: float):
    w = (direction * norm).astype(np.float32)
    return {"layer": {"w": mx.array(w[:12].reshape(3, 4))}, "bias": [mx.array(w[12:])]}


def run_both(kwargs, norms, compiled=False):
    direction = np.random.default_rng(9).standard_normal(20)
    direction /= np.linalg.norm(direction)
    reference = ReferenceZClip(**kwargs)
    clipper = ZClip(**kwargs)
    step = clipper
    if compiled:
        step = mx.compile(lambda g: clipper(g), inputs=clipper.state, outputs=clipper.state)
    coefs = []
    for i, target in enumerate(norms):
        grads = grads_with_norm(direction, target)
        flat = np.concatenate([np.array(grads["layer"]["w"]).ravel(), np.array(grads["bias"][0])])
        total_norm = float(np.linalg.norm(flat.astype(np.float64)))
        coef = reference.step(total_norm)
        coefs.append(coef)
        clipped, info = step(grads)
        mx.eval(clipped, info, clipper.state)
        assert info.pre_norm.item() == pytest.approx(total_norm, rel=1e-6), f"step {i}"
        assert info.scale.item() == pytest.approx(coef, rel=1e-5), f"step {i}"
        assert info.clipped.item() == (coef < 1.0), f"step {i}"
        np.testing.assert_allclose(np.array(clipped["layer"]["w"]),
                                   np.array(grads["layer"]["w"]) * coef, rtol=1e-5, atol=1e-9)
        if reference.initialized:
            assert clipper.state["mean"].item() == pytest.approx(reference.mean, rel=1e-5)
            assert clipper.state["var"].item() == pytest.approx(reference.var, rel=1e-4, abs=1e-9)
    return coefs


CASES = {
    "zscore-adaptive": dict(warmup_steps=10),
    "zscore-adaptive-factor": dict(warmup_steps=10, clip_factor=0.8),
    "zscore-mean": dict(warmup_steps=10, clip_option="mean"),
    "percentile": dict(warmup_steps=10, mode="percentile"),
    "no-max-norm": dict(warmup_steps=10, max_grad_norm=None, alpha=0.9, z_thresh=2.0),
    "skip-update-on-spike": dict(warmup_steps=10, skip_update_on_spike=True),
    "tight-max-norm": dict(warmup_steps=5, max_grad_norm=0.55),
}


@pytest.mark.parametrize("case", list(CASES))
def test_zclip_matches_reference_port(case):
    coefs = run_both(CASES[case], norm_sequence())
    assert coefs[15] < 0.5 and coefs[25] < 0.5   # the spikes were clipped
    assert coefs[3] < 1.0 or CASES[case].get("max_grad_norm", 1.0) is None  # warm-up clip


@pytest.mark.parametrize("case", ["zscore-adaptive", "percentile"])
def test_compiled_zclip_matches_reference_port(case):
    run_both(CASES[case], norm_sequence(), compiled=True)


def test_zclip_hand_traced_numbers():
    # Warm-up on norms 1 and 3: mean 2, population variance 1.
    clipper = ZClip(warmup_steps=2, max_grad_norm=None)
    for norm in (1.0, 3.0):
        _, info = clipper({"w": mx.array([norm])})
        assert info.scale.item() == 1.0
    assert clipper.state["mean"].item() == 2.0 and clipper.state["var"].item() == 1.0
    # Norm 10: z = 8 / (1 + 1e-6); eta = z / 2.5; clip to 2 + 2.5 / eta ≈ 2.78125.
    _, info = clipper({"w": mx.array([10.0])})
    z = 8.0 / (1.0 + 1e-6)
    clip_to = 2.0 + 2.5 * 1.0 / (z / 2.5)
    assert clip_to == pytest.approx(2.78125, rel=1e-6)
    assert info.scale.item() == pytest.approx(clip_to / (10.0 + 1e-6), rel=1e-6)
    assert info.post_norm.item() == pytest.approx(clip_to, rel=1e-6)
    assert info.threshold.item() == pytest.approx(2.0 + 2.5 * (1.0 + 1e-6), rel=1e-6)
    # The EMA is fed 2.78125, not 10: mean first, then the variance about the new mean.
    mean = 0.97 * 2.0 + 0.03 * clip_to
    var = 0.97 * 1.0 + 0.03 * (clip_to - mean) ** 2
    assert clipper.state["mean"].item() == pytest.approx(mean, rel=1e-6)
    assert clipper.state["var"].item() == pytest.approx(var, rel=1e-6)


def test_zclip_warmup_ignores_nonfinite_norms():
    clipper = ZClip(warmup_steps=2, max_grad_norm=None, nonfinite="skip")
    for norm in (1.0, float("nan"), 3.0):
        clipped, info = clipper({"w": mx.array([norm])})
    assert clipper.state["mean"].item() == 2.0 and clipper.state["var"].item() == 1.0
    _, info = clipper({"w": mx.array([math.inf])})
    assert info.nonfinite.item() and info.scale.item() == 0.0
    assert clipper.state["mean"].item() == 2.0 and clipper.state["var"].item() == 1.0


def test_zclip_refuses_unknown_mode_and_option():
    with pytest.raises(ValueError, match="mode"):
        ZClip(mode="median")
    with pytest.raises(ValueError, match="clip_option"):
        ZClip(clip_option="zero")
    with pytest.raises(ValueError, match="max_grad_norm"):
        ZClip(max_grad_norm=-1.0)
    assert ZClip().config()["name"] == "zclip"

"""Every clipper and detector under mx.compile (state as inputs/outputs) equals the eager run."""
from __future__ import annotations

from functools import partial

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from gradwatch.clip import (AGC, AdaGC, AutoClip, ClipInfo, EMADetector, GlobalNorm,
                            PerTensorNorm, ValueClip, ZClip, ZScoreDetector)

FACTORIES = {
    "global_norm": lambda: GlobalNorm(1.0),
    "global_norm_inf": lambda: GlobalNorm(0.3, ord=float("inf")),
    "global_norm_skip": lambda: GlobalNorm(1.0, nonfinite="skip"),
    "value": lambda: ValueClip(0.4),
    "per_tensor_norm": lambda: PerTensorNorm(0.7),
    "agc": lambda: AGC(clipping=0.05),
    "zclip": lambda: ZClip(warmup_steps=3, max_grad_norm=2.0),
    "zclip_percentile": lambda: ZClip(warmup_steps=3, mode="percentile", max_grad_norm=None),
    "adagc": lambda: AdaGC(warmup_steps=3, beta=0.8),
    "autoclip": lambda: AutoClip(quantile=0.5, history=4),
}


def sequence(steps=9):
    rng = np.random.default_rng(11)
    out = []
    for t in range(steps):
        scale = 8.0 if t in (5, 7) else 1.0
        out.append({"w": [mx.array((rng.standard_normal((5, 3)) * scale).astype(np.float32))],
                    "b": {"x": mx.array(rng.standard_normal(5).astype(np.float32)).astype(mx.float16)}})
    return out


def assert_close(a, b, what):
    fa, fb = tree_flatten(a), tree_flatten(b)
    assert [n for n, _ in fa] == [n for n, _ in fb], what
    for (name, x), (_, y) in zip(fa, fb):
        assert x.dtype == y.dtype, f"{what} {name}"
        np.testing.assert_allclose(np.array(x.astype(mx.float32)), np.array(y.astype(mx.float32)),
                                   rtol=2e-6, atol=1e-7, err_msg=f"{what} {name}")


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_compiled_step_equals_eager(kind):
    eager, compiled_clipper = FACTORIES[kind](), FACTORIES[kind]()
    params = {"w": [mx.ones((5, 3))], "b": {"x": mx.ones(5)}}

    def step(grads):
        return compiled_clipper(grads, params=params)

    compiled = mx.compile(step, inputs=compiled_clipper.state, outputs=compiled_clipper.state)
    for t, grads in enumerate(sequence()):
        want, want_info = eager(grads, params=params)
        got, got_info = compiled(grads)
        assert isinstance(got_info, ClipInfo)
        mx.eval(want, want_info, got, got_info, eager.state, compiled_clipper.state)
        assert_close(got, want, f"{kind} step {t} grads")
        assert_close(got_info._asdict(), want_info._asdict(), f"{kind} step {t} info")
        assert_close(compiled_clipper.state, eager.state, f"{kind} step {t} state")


@pytest.mark.parametrize("make", [ZScoreDetector, EMADetector])
def test_compiled_detector_equals_eager(make):
    eager, other = make(warmup_steps=3), make(warmup_steps=3)
    compiled = mx.compile(lambda n: other(n), inputs=other.state, outputs=other.state)
    for norm in [1.0, 1.1, 0.9, 1.05, 6.0, float("nan"), 1.0, 0.95, 4.0]:
        want, got = eager(mx.array(norm)), compiled(mx.array(norm))
        mx.eval(want, got, eager.state, other.state)
        assert_close(got._asdict(), want._asdict(), f"{make.name} norm {norm}")
        assert_close(other.state, eager.state, f"{make.name} state")


def test_clip_and_detect_in_one_compiled_step():
    clipper, detector = ZClip(warmup_steps=2), ZScoreDetector(warmup_steps=2)
    state = [clipper.state, detector.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(grads):
        clipped, info = clipper(grads)
        return clipped, info, detector(info.pre_norm)

    for grads in sequence(5):
        clipped, info, spike = step(grads)
        mx.eval(clipped, info, spike)
    assert int(clipper.state["count"].item()) == 2 and int(detector.state["count"].item()) == 2

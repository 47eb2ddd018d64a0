"""Spike detectors against straightforward pure-Python loops."""
from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest

from gradwatch.clip import DetectorInfo, EMADetector, ZScoreDetector


def norm_sequence():
    rng = np.random.default_rng(0)
    norms = list(1.0 + 0.1 * rng.standard_normal(60))
    norms[30] = 8.0        # a spike
    norms[31] = 7.5        # and another right after
    norms[40] = float("nan")
    norms[45] = float("inf")
    norms[10] = float("nan")  # inside warm-up: skipped, warm-up lasts one more step
    return norms


def python_zscore(norms, alpha, z_thresh, warmup, eps=1e-6):
    """Reference: a list for the warm-up, then the EMA mean/variance z-score, capped feed."""
    buffer, mean, var, out = [], None, None, []
    for x in norms:
        finite = math.isfinite(x)
        if mean is None:
            out.append((0.0, not finite))
            if finite:
                buffer.append(x)
                if len(buffer) >= warmup:
                    mean = sum(buffer) / len(buffer)
                    var = sum((b - mean) ** 2 for b in buffer) / len(buffer)
            continue
        std = var ** 0.5
        z = (x - mean) / (std + eps) if finite else float("nan")
        spike = (not finite) or z > z_thresh
        out.append((z, spike))
        if finite:
            fed = mean + z_thresh * std if spike else x
            mean = alpha * mean + (1 - alpha) * fed
            var = alpha * var + (1 - alpha) * (fed - mean) ** 2
    return out


def python_ema(norms, beta, ratio, warmup):
    buffer, ema, out = [], None, []
    for x in norms:
        finite = math.isfinite(x)
        if ema is None:
            out.append((0.0, not finite))
            if finite:
                buffer.append(x)
                if len(buffer) >= warmup:
                    ema = sum(buffer) / len(buffer)
            continue
        spike = (not finite) or x > ratio * ema
        out.append((x / ema, spike))
        if finite:
            ema = beta * ema + (1 - beta) * min(x, ratio * ema)
    return out


def check_against(detector, reference, norms, compiled=False):
    step = detector
    if compiled:
        step = mx.compile(lambda n: detector(n), inputs=detector.state, outputs=detector.state)
    for i, (x, (score, spike)) in enumerate(zip(norms, reference)):
        info = step(mx.array(x, mx.float32))
        assert isinstance(info, DetectorInfo)
        mx.eval(info, detector.state)
        assert info.spike.item() == spike, f"step {i}"
        if math.isfinite(score):
            assert info.score.item() == pytest.approx(score, rel=1e-4, abs=1e-4), f"step {i}"
        else:
            assert not math.isfinite(info.score.item()), f"step {i}"
        # Non-finite norms never poison the statistics.
        assert all(np.isfinite(np.array(v)).all() for v in detector.state.values()), f"step {i}"


@pytest.mark.parametrize("compiled", [False, True])
def test_zscore_detector_matches_python_loop(compiled):
    norms = norm_sequence()
    reference = python_zscore(norms, 0.97, 2.5, 25)
    assert reference[30][1] and reference[31][1] and not reference[35][1]
    check_against(ZScoreDetector(), reference, norms, compiled)


@pytest.mark.parametrize("compiled", [False, True])
def test_ema_detector_matches_python_loop(compiled):
    norms = norm_sequence()
    reference = python_ema(norms, 0.98, 2.0, 25)
    assert reference[30][1] and reference[31][1] and not reference[35][1]
    check_against(EMADetector(), reference, norms, compiled)


def test_detectors_with_other_parameters():
    norms = [0.5, 0.6, 0.55, 0.58, 2.0, 0.6, 0.57, 1.2, 0.59]
    check_against(ZScoreDetector(alpha=0.5, z_thresh=1.5, warmup_steps=3), 
                  python_zscore(norms, 0.5, 1.5, 3), norms)
    check_against(EMADetector(beta=0.5, ratio=1.5, warmup_steps=2),
                  python_ema(norms, 0.5, 1.5, 2), norms)


def test_spike_does_not_move_the_baseline_much():
    detector = EMADetector(beta=0.9, ratio=2.0, warmup_steps=3)
    for x in (1.0, 1.0, 1.0):
        detector(x)
    info = detector(1000.0)
    assert info.spike.item()
    assert detector.state["ema"].item() == pytest.approx(0.9 + 0.1 * 2.0)
    assert info.baseline.item() == pytest.approx(1.0)


def test_detector_accepts_python_floats_and_has_config():
    detector = ZScoreDetector(warmup_steps=2)
    detector(1.0)
    info = detector(2.0)
    assert info.ready.item() is False
    assert detector(1.5).ready.item() is True
    assert detector.name == "zscore" and EMADetector().name == "ema"
    assert ZScoreDetector().config() == {"name": "zscore", "alpha": 0.97, "z_thresh": 2.5,
                                         "warmup_steps": 25, "eps": 1e-6}
    assert EMADetector().config() == {"name": "ema", "beta": 0.98, "ratio": 2.0,
                                      "warmup_steps": 25}
    json.dumps(EMADetector().config(), allow_nan=False)


@pytest.mark.parametrize("make", [
    lambda: ZScoreDetector(alpha=1.0), lambda: ZScoreDetector(z_thresh=-1.0),
    lambda: ZScoreDetector(z_thresh=float("nan")), lambda: ZScoreDetector(warmup_steps=0),
    lambda: EMADetector(beta=-0.1), lambda: EMADetector(ratio=float("inf")),
    lambda: EMADetector(warmup_steps=2.5),
])
def test_bad_detector_arguments_are_refused(make):
    with pytest.raises(ValueError):
        make()


def test_detector_refuses_a_vector():
    with pytest.raises(ValueError, match="scalar"):
        ZScoreDetector()(mx.array([1.0, 2.0]))

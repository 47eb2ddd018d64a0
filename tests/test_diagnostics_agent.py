"""The agent's side of the diagnostics: default detector columns, skip_spikes, watch.update."""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from gradwatch.agent import GradWatch
from gradwatch.agent.wire import BOOL_COLUMNS, FLOAT_COLUMNS
from gradwatch.clip import EMADetector, GlobalNorm, RobustDetector, ZScoreDetector
from tests.test_agent_unit import spooled_steps


def flat(tree):
    return {k: np.array(v) for k, v in tree_flatten(tree)}


def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_wire_lists_the_new_columns():
    assert "robust_z" in FLOAT_COLUMNS
    assert {"skipped", "level_shift"} <= set(BOOL_COLUMNS)


def test_default_detector_is_robust_and_records_its_columns(tmp_path):
    """The default: the robust rule on the host (nothing in the graph), its columns equal to
    the in-graph RobustDetector's on the same norms (scores to float32 rounding)."""
    rng = np.random.default_rng(0)
    ref = RobustDetector()
    norms = np.exp(0.1 * rng.standard_normal(40)).astype(np.float32)
    norms[30] *= 50
    expected = []
    with GradWatch("robust", spool_dir=tmp_path, tensor_norms=False) as watch:
        assert watch.detectors == [] and watch.host_detector is not None
        for x in norms:
            out = watch.step({"w": mx.array([float(x)])})
            mx.eval(out)
            info = ref(mx.array(x))
            mx.eval(info)
            expected.append(info)
    steps = spooled_steps(tmp_path)
    for step, info in enumerate(expected):
        got = steps[step]
        assert got["robust_z"] == pytest.approx(info.score.item(), rel=1e-5, abs=1e-5)
        assert got["spike"] == info.spike.item() and got["level_shift"] is False
        assert "z" not in got and "ema" not in got and "skipped" not in got
    assert steps[30]["spike"] is True and sum(s["spike"] for s in steps.values()) == 1


def test_first_detector_to_declare_a_column_wins(tmp_path):
    a, b = ZScoreDetector(warmup_steps=2, z_thresh=100.0), ZScoreDetector(warmup_steps=2, z_thresh=0.1)
    ra, rb, rema = ZScoreDetector(warmup_steps=2, z_thresh=100.0), ZScoreDetector(warmup_steps=2, z_thresh=0.1), \
        EMADetector(warmup_steps=2)
    values = [1.0, 1.2, 0.9, 3.0, 1.0]
    with GradWatch("cols", spool_dir=tmp_path, tensor_norms=False,
                   detectors=[a, b, EMADetector(warmup_steps=2)]) as watch:
        for x in values:
            mx.eval(watch.step({"w": mx.array([x])}))
    steps = spooled_steps(tmp_path)
    for step, x in enumerate(values):
        za, zb, e = ra(x), rb(x), rema(x)
        assert np.float32(steps[step]["z"]) == np.float32(za.score.item())
        assert np.float32(steps[step]["ema"]) == np.float32(e.score.item())
        assert steps[step]["spike"] == (za.spike.item() or zb.spike.item() or e.spike.item())


def _model():
    mx.random.seed(0)
    model = nn.Linear(4, 2)
    optimizer = optim.AdamW(learning_rate=1e-2, weight_decay=0.1)
    x, y = mx.random.normal((8, 4)), mx.random.normal((8, 2))
    return model, optimizer, nn.value_and_grad(model, lambda m: ((m(x) - y) ** 2).mean())


@pytest.mark.parametrize("compile", [True, False])
def test_skip_spikes_keeps_params_and_state_on_a_spike(tmp_path, compile):
    model, optimizer, loss_and_grad = _model()
    spike_at, nan_at = 12, 15
    kept = []
    with GradWatch("skip", spool_dir=tmp_path, tensor_norms=False, compile=compile, skip_spikes=True,
                   clipper=GlobalNorm(10.0), detectors=[RobustDetector(warmup_steps=5)]) as watch:
        for step in range(18):
            _, grads = loss_and_grad(model)
            if step == spike_at:
                grads = tree_map(lambda g: g * 1000.0, grads)
            if step == nan_at:
                grads = tree_map(lambda g: g * float("nan"), grads)
            before = (flat(model.parameters()), flat(optimizer.state))
            grads = watch.step(grads)
            watch.update(optimizer, model, grads)
            mx.eval(model.parameters(), optimizer.state)
            after = (flat(model.parameters()), flat(optimizer.state))
            kept.append(same(before[0], after[0]) and (step == 0 or same(before[1], after[1])))
    steps = spooled_steps(tmp_path)
    assert [s for s in range(18) if steps[s]["skipped"]] == [spike_at, nan_at]
    assert [s for s in range(18) if kept[s]] == [spike_at, nan_at]
    assert all(np.isfinite(v).all() for v in flat(model.parameters()).values())


def test_nonfinite_skip_policy_records_skipped_without_skip_spikes(tmp_path):
    model, optimizer, loss_and_grad = _model()
    with GradWatch("nf", spool_dir=tmp_path, tensor_norms=False, detectors=[],
                   clipper=GlobalNorm(1.0, nonfinite="skip")) as watch:
        for step in range(4):
            _, grads = loss_and_grad(model)
            if step == 2:
                grads = tree_map(lambda g: g * float("inf"), grads)
            before = flat(optimizer.state)
            grads = watch.step(grads)
            watch.update(optimizer, model, grads)
            mx.eval(model.parameters(), optimizer.state)
            if step == 2:
                assert same(before, flat(optimizer.state))
    steps = spooled_steps(tmp_path)
    assert [steps[s]["skipped"] for s in range(4)] == [False, False, True, False]


def test_update_without_skipping_is_a_plain_update(tmp_path):
    a, opt_a, lg_a = _model()
    b, opt_b, lg_b = _model()
    with GradWatch("plain", spool_dir=tmp_path, tensor_norms=False) as watch:
        for _ in range(3):
            _, grads = lg_a(a)
            watch.update(opt_a, a, watch.step(grads))
            mx.eval(a.parameters(), opt_a.state)
            _, grads = lg_b(b)
            opt_b.update(b, grads)
            mx.eval(b.parameters(), opt_b.state)
    assert same(flat(a.parameters()), flat(b.parameters()))

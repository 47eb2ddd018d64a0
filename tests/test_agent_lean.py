"""The lean step: a small graph, the rest on the host, the same numbers on the wire.

References: `GlobalNorm`'s own `ClipInfo` and `tensor_norms` (the full in-graph record of
before), MLX's `clip_grad_norm` for the clipped gradients, and the in-graph
`RobustDetector` for the host detector's flags on long sequences with spikes, non-finite
norms and a level shift.
"""
from __future__ import annotations

import math

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from gradwatch.agent import GradWatch
from gradwatch.agent.host import HostStage
from gradwatch.agent.recorder import Recorder
from gradwatch.clip import GlobalNorm, RecommendedClip, RobustDetector
from gradwatch.clip.spike_rule import RobustRule
from tests.test_agent_unit import spooled_steps


def grads_tree(seed: int, dtype=mx.float32) -> dict:
    keys = mx.random.split(mx.random.key(seed), 3)
    tree = {"layers": [{"weight": mx.random.normal((8, 16), key=keys[0]).astype(dtype)},
                       {"weight": mx.random.normal((16,), key=keys[1]).astype(dtype)}],
            "bias": (3.0 * mx.random.normal((1,), key=keys[2])).astype(dtype)}
    mx.eval(tree)
    return tree


def norms_sequence(n: int = 900, seed: int = 3) -> list[float]:
    """Drifting log-normal norms with spikes, non-finite values and a permanent 5x shift."""
    rng = np.random.default_rng(seed)
    x = np.exp(np.linspace(0.5, -0.5, n) + 0.2 * rng.standard_normal(n))
    x[500:] *= 5.0
    x[[40, 41, 150, 300, 620, 800]] *= 40.0
    x[[12, 200, 510]] = [np.nan, np.inf, np.nan]
    return [float(np.float32(v)) for v in x]


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
@pytest.mark.parametrize("max_norm", [None, 0.5, 1e6])
def test_lean_record_completed_on_the_host_equals_the_full_record(max_norm, dtype):
    """pre_norm, post_norm, scale, threshold, clipped, nonfinite and the tensor norms of a
    lean record, completed by the sender's HostStage, are bit for bit the full graph's."""
    clipper = None if max_norm is None else GlobalNorm(max_norm)
    lean = Recorder(clipper, detectors=[])
    full = Recorder(clipper, detectors=[])
    full.lean = None   # the record built in full in the graph, as before the lean step
    for seed in range(3):
        grads = grads_tree(seed, dtype)
        clipped_lean, vector_lean = lean.build_step(grads, {"loss": mx.array(0.25)})
        clipped_full, vector_full = full.build_step(grads, {"loss": mx.array(0.25)})
        mx.eval(clipped_lean, vector_lean, clipped_full, vector_full)
        lean.hold(seed, vector_lean, {})
        full.hold(seed, vector_full, {})
        (got,) = HostStage().complete([lean.take()])
        want = full.take()
        assert got.layout.lean is None and set(got.layout.columns) == set(want.layout.columns)
        assert got.layout.tensor_names == want.layout.tensor_names
        for column in want.layout.columns:
            assert np.float32(got.value(column)) == np.float32(want.value(column)), column
        assert got.values[4 * len(got.layout.columns):] == want.values[4 * len(want.layout.columns):]
        for (_, a), (_, b) in zip(tree_flatten(clipped_lean), tree_flatten(clipped_full)):
            assert np.array_equal(np.array(a), np.array(b))
        if clipper is not None and dtype == mx.float32:
            reference, norm = optim.clip_grad_norm(grads, max_norm)
            assert np.float32(got.value("pre_norm")) == np.float32(norm.item())
            for (_, a), (_, b) in zip(tree_flatten(clipped_lean), tree_flatten(reference)):
                assert np.array_equal(np.array(a), np.array(b))


def test_the_lean_graph_is_small():
    """The default watch adds a few operations to the step, none per tensor beyond what
    clip_grad_norm itself does (the graph is counted, not timed)."""
    import io
    import re

    def operations(*outputs) -> int:
        text = io.StringIO()
        mx.export_to_dot(text, *outputs)
        return len(re.findall(r'shape=rectangle', text.getvalue()))

    def extra(tensors: int) -> int:
        keys = mx.random.split(mx.random.key(0), tensors)
        grads = {"layers": [{"weight": mx.random.normal((4, 4), key=key)} for key in keys]}
        mx.eval(grads)
        bare, _ = optim.clip_grad_norm(grads, 1.0)
        recorder = Recorder(GlobalNorm(1.0), detectors=[])
        clipped, vector = recorder.build_step(grads, {"loss": mx.array(1.0)})
        return operations(clipped, vector) - operations(bare)

    assert extra(10) == extra(40) <= 10


def test_host_detector_flags_equal_the_in_graph_detector_on_a_long_sequence():
    """The NumPy rule in the sender thread and RobustDetector in the graph: the same spikes,
    the same level shift, scores equal to float32 rounding."""
    norms = norms_sequence()
    detector = RobustDetector()
    step = mx.compile(lambda n: detector(n), inputs=detector.state, outputs=detector.state)
    rule = RobustRule()
    for i, x in enumerate(norms):
        info = step(mx.array(x, mx.float32))
        mx.eval(info, detector.state)
        verdict = rule.update(x)
        assert verdict.spike == info.spike.item(), i
        assert verdict.level_shift == info.level_shift.item(), i
        if math.isfinite(x):
            assert verdict.score == pytest.approx(info.score.item(), rel=1e-4, abs=1e-4), i
    assert rule.seen == sum(math.isfinite(x) for x in norms)


def test_default_watch_sends_the_host_detectors_columns(tmp_path):
    """End to end through the sender thread and the spool: the default watch's robust_z,
    spike and level_shift columns are the in-graph detector's on the same norms."""
    norms = norms_sequence(900, seed=7)
    detector = RobustDetector()
    expected = []
    with GradWatch("lean", url=None, spool_dir=tmp_path, clipper=GlobalNorm(1.0), handle_signals=False,
                   batch_steps=64) as watch:
        assert watch.detectors == []
        for x in norms:
            mx.eval(watch.step({"w": mx.array([x])}, loss=mx.array(0.5)))
            info = detector(mx.array(x, mx.float32))
            mx.eval(info)
            expected.append((info.spike.item(), info.level_shift.item()))
    steps = spooled_steps(tmp_path)
    assert sorted(steps) == list(range(len(norms)))
    assert [(steps[i]["spike"], steps[i]["level_shift"]) for i in range(len(norms))] == expected
    assert sum(level for _, level in expected) == 1
    for i, x in enumerate(norms):
        assert np.float32(steps[i]["pre_norm"]) == np.float32(x) or not math.isfinite(x)
        assert steps[i]["nonfinite"] == (not math.isfinite(x))
        assert steps[i]["threshold"] == 1.0 and steps[i]["loss"] == 0.5


def test_recommended_clip_records_its_own_detectors_verdict(tmp_path):
    """With RecommendedClip the default detector is the clipper's own, read in the same graph
    (not a second detector on the same norm): flags equal a separate RobustDetector's."""
    rng = np.random.default_rng(0)
    norms = np.exp(0.1 * rng.standard_normal(80)).astype(np.float32)
    norms[50] *= 40
    reference = RobustDetector()
    expected = []
    with GradWatch("rc", url=None, spool_dir=tmp_path, clipper=RecommendedClip(window=50, warmup=20),
                   tensor_norms=False, handle_signals=False) as watch:
        assert watch.host_detector is None and len(watch.detectors) == 1
        for x in norms:
            mx.eval(watch.step({"w": mx.array([float(x)])}))
            info = reference(mx.array(x))
            mx.eval(info)
            expected.append(info)
    steps = spooled_steps(tmp_path)
    assert [steps[i]["spike"] for i in range(80)] == [info.spike.item() for info in expected]
    assert [np.float32(steps[i]["robust_z"]) for i in range(80)] == [np.float32(info.score.item())
                                                                      for info in expected]
    assert steps[50]["spike"] is True


def test_explicit_detectors_and_skip_spikes_stay_in_the_graph(tmp_path):
    with GradWatch("a", url=None, spool_dir=tmp_path / "a", detectors=[RobustDetector(k=4.0)],
                   handle_signals=False) as watch:
        assert watch.host_detector is None and watch.detectors[0].k == 4.0
    with GradWatch("b", url=None, spool_dir=tmp_path / "b", skip_spikes=True, handle_signals=False) as watch:
        assert watch.host_detector is None and isinstance(watch.detectors[0], RobustDetector)


def test_the_host_detector_is_described_as_the_in_graph_one_is():
    """The run's metadata names the host rule with the same parameters `RobustDetector` reports."""
    from gradwatch.agent.host import host_rule_config
    from gradwatch.clip import RobustDetector
    from gradwatch.clip.spike_rule import RobustRule

    assert host_rule_config(RobustRule()) == {**RobustDetector().config(), "where": "host"}

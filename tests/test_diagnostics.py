"""server/analysis/diagnostics.py against plain Python/NumPy references and hand-made sequences."""
from __future__ import annotations

import ast
import math
import statistics

import numpy as np
import pytest

from gradwatch.server.analysis import diagnostics
from gradwatch.server.analysis.diagnostics import RECOMMENDATION_KEYS, loss_spikes, recommend, robust_spikes
from tests.test_clip_robust import python_robust, sequence


def test_module_is_pure_numpy():
    tree = ast.parse(open(diagnostics.__file__).read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    # the one piece of gradwatch.clip the server shares: the spike rule in plain NumPy (no MLX)
    assert imported <= {"__future__", "math", "dataclasses", "typing", "numpy", "gradwatch.clip.spike_rule"}, \
        imported


def test_robust_spikes_matches_the_python_loop_in_log_space():
    norms = sequence()
    ref = python_robust(norms)
    found = robust_spikes(norms)
    # The server moves the flags that led up to a level shift from "spike" to "transition".
    assert list(found.spike | found.transition) == [r[1] for r in ref]
    assert list(found.level_shift) == [r[2] for r in ref]
    shift = found.level_shift_index[0]
    assert set(np.flatnonzero(found.transition)) <= set(range(shift - 16, shift))
    assert 10 <= found.transition.sum() <= 15   # at most 15 flags before the 16th declares the shift
    for i, r in enumerate(ref):
        if r[0] is not None:
            assert found.score[i] == pytest.approx(r[0], rel=1e-9, abs=1e-9)


def test_robust_spikes_other_parameters():
    rng = np.random.default_rng(5)
    norms = list(np.exp(0.3 * rng.standard_normal(400)))
    norms[200:] = [3 * v for v in norms[200:]]
    norms[77] = 40.0
    ref = python_robust(norms, k=3.0, history=50, warmup=10, window=8, span=3, min_scale=0.05)
    found = robust_spikes(norms, k=3.0, history=50, warmup=10, shift_window=8, shift_span=3, min_scale=0.05)
    assert list(found.spike | found.transition) == [r[1] for r in ref]
    assert list(found.level_shift) == [r[2] for r in ref]


@pytest.mark.parametrize("case", ["spiky", "drift", "student_t", "level_shift", "losses"])
def test_the_rule_equals_the_python_reference_on_long_series(case):
    """Long series: the answer must be the independent step-by-step reference's, flag for flag
    and score for score."""
    rng = np.random.default_rng(["spiky", "drift", "student_t", "level_shift", "losses"].index(case))
    n = 3000
    if case == "losses":
        values = list(2.0 - np.arange(n) / n + 0.05 * rng.standard_normal(n))
        values[1500] = 9.0
    else:
        values = np.exp(0.25 * rng.standard_normal(n))
        if case == "drift":
            values *= np.exp(np.linspace(0, -1.5, n))
        if case == "student_t":
            values = np.exp(0.2 * rng.standard_t(4, n))
        if case == "level_shift":
            values[2000:] *= 6.0
        values[rng.choice(n, 12, replace=False)] *= 30.0
        values[[100, 900]] = [math.nan, math.inf]
        values = list(values)
    log = case != "losses"
    found = robust_spikes(values, log=log)
    if log:
        ref = python_robust(values)
        assert list(found.spike | found.transition) == [r[1] for r in ref]
        assert list(found.level_shift) == [r[2] for r in ref]
        for i, r in enumerate(ref):
            if r[0] is not None:
                assert found.score[i] == pytest.approx(r[0], rel=1e-9, abs=1e-9)
    assert found.spike.sum() >= (1 if case == "losses" else 12)
    loop = diagnostics._robust_loop(np.asarray(values, dtype=float), log=log)
    assert np.array_equal(found.spike, loop.spike) and np.array_equal(found.ready, loop.ready)
    assert np.array_equal(found.score, loop.score, equal_nan=True)


def test_linear_space_for_losses_that_go_negative():
    loss = [-1.0 + 0.01 * ((i * 5) % 7 - 3) for i in range(60)]
    loss[40] = 0.5       # far above the median -1.0 in linear units
    loss[45] = -3.0      # far below: one-sided, not a spike
    loss[50] = float("nan")
    found = robust_spikes(loss, log=False)
    assert list(np.flatnonzero(found.spike)) == [40, 50]
    # Reference for step 40: median and MAD of the 40 earlier values, by hand.
    med = statistics.median(loss[:40])
    mad = statistics.median(abs(v - med) for v in loss[:40])
    assert found.score[40] == pytest.approx((0.5 - med) / max(1.4826 * mad, 0.01 * abs(med)))


# ---------------------------------------------------------------- recommend

def lognormal_run(n, seed=0, spikes=(), scale=1.0):
    rng = np.random.default_rng(seed)
    norms = scale * np.exp(0.25 * rng.standard_normal(n))
    for i in spikes:
        norms[i] *= 50.0
    return np.arange(n) * 10, norms


def reference_tau(clean, k=3.0):
    logs = np.log(np.asarray(clean, np.float64))
    med = np.median(logs)
    mad = np.median(np.abs(logs - med))
    median = float(np.median(clean))
    return min(max(math.exp(med + k * 1.4826 * mad), median), 10 * median), median


def test_recommendation_on_the_clean_window_matches_numpy():
    n = 8000
    spikes = list(range(7300, 8000, 37))  # about 2.6% of the window: a raw p99 would land on them
    steps, norms = lognormal_run(n, spikes=spikes)
    norms[7500] = np.nan
    answer = recommend(steps, norms, current_threshold=1.0)
    assert set(answer) == set(RECOMMENDATION_KEYS)
    window = slice(n - 800, n)  # default: 10% of the run (>= 500)
    assert answer["window"] == {"start": int(steps[7200]), "end": int(steps[-1]), "steps": 800,
                                "clean_steps": 800 - len([s for s in spikes if s >= 7200]) - 1,
                                "clean_start": int(steps[7200])}
    mask = np.ones(n, bool)
    mask[spikes] = False
    mask[7500] = False
    clean = norms[window][mask[window]]
    tau, median = reference_tau(clean)
    assert answer["threshold"] == pytest.approx(tau) and answer["median"] == pytest.approx(median)
    assert answer["ratio_to_median"] == pytest.approx(tau / median)
    assert answer["spikes_left_out"] == len([s for s in spikes if s >= 7200])
    assert answer["nonfinite_left_out"] == 1 and answer["level_shift"] is False
    raw = norms[window][np.isfinite(norms[window])]
    assert answer["clip_rate_clean"] == pytest.approx(np.mean(clean > tau))
    assert answer["clip_rate_raw"] == pytest.approx(np.mean(raw > tau))
    assert answer["current_clip_rate_clean"] == pytest.approx(np.mean(clean > 1.0))
    assert answer["clip_rate_at_1_raw"] == pytest.approx(np.mean(raw > 1.0))
    assert answer["percentiles"]["p99"] == pytest.approx(np.percentile(clean, 99))
    assert answer["percentiles_over"] == "clean window"
    assert tau < np.percentile(raw, 99) / 5  # the raw p99 sits on the spikes; tau does not
    # Every spike in the window is above tau: the threshold clips what clipping is for.
    assert all(norms[s] > tau for s in spikes if s >= 7200)
    labels = [c["label"] for c in answer["candidates"]]
    assert labels[:6] == ["recommended", "p50", "p90", "p95", "p99", "p99.9"] and "current" in labels
    for candidate in answer["candidates"]:
        assert candidate["over"] == "clean window"
        assert candidate["clip_rate"] == pytest.approx(np.mean(clean > candidate["threshold"]))
    assert "clean steps" in answer["rationale"] and answer["rationale"].endswith(".")


def test_target_clip_rate_is_the_quantile_of_the_clean_window():
    steps, norms = lognormal_run(1000, spikes=[900, 950])
    answer = recommend(steps, norms, target_clip_rate=0.05, window=400)
    mask = np.ones(1000, bool)
    mask[[900, 950]] = False
    clean = norms[600:][mask[600:]]
    assert answer["threshold"] == pytest.approx(np.quantile(clean, 0.95))
    assert answer["method"] == "target_clip_rate" and answer["window"]["steps"] == 400
    assert recommend(steps, norms, target_clip_rate=0.0, window=400)["threshold"] == pytest.approx(clean.max())


def test_default_window_sizes():
    assert diagnostics.default_window(300) == 300
    assert diagnostics.default_window(3000) == 500
    assert diagnostics.default_window(20000) == 2000


def test_clamped_to_median_and_ten_times_median():
    steps = np.arange(300)
    flat = np.full(300, 2.0)
    assert recommend(steps, flat)["threshold"] == pytest.approx(2.0)  # MAD 0: the median, not below
    rng = np.random.default_rng(1)
    wide = np.exp(2.0 * rng.standard_normal(300))  # k*1.4826*MAD ~ 9 in log: clamp at 10x median
    answer = recommend(steps, wide)
    assert answer["threshold"] == pytest.approx(10 * answer["median"])


def test_too_few_clean_steps_is_an_answer_not_a_guess():
    steps, norms = lognormal_run(80)
    answer = recommend(steps, norms)
    assert answer["threshold"] is None and "only 80 clean steps" in answer["reason"]
    assert answer["candidates"] == [] and answer["rationale"].startswith("No recommendation yet")
    steps, norms = lognormal_run(150)
    norms[:60] = np.nan
    assert recommend(steps, norms)["threshold"] is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(target_clip_rate=1.0), "target_clip_rate"), (dict(target_clip_rate=-0.1), "target_clip_rate"),
    (dict(target_clip_rate=float("nan")), "target_clip_rate"), (dict(window=99), "window"),
    (dict(window=150.5), "window"),
])
def test_bad_arguments_raise_value_error(kwargs, message):
    steps, norms = lognormal_run(300)
    with pytest.raises(ValueError, match=message):
        recommend(steps, norms, **kwargs)


def test_level_shift_in_the_window_uses_the_new_regime():
    steps, norms = lognormal_run(1200, seed=2)
    norms[700:] *= 5.0
    answer = recommend(steps, norms, window=1000)
    assert answer["level_shift"] is True and len(answer["level_shift_steps"]) == 1
    shift_step = answer["level_shift_steps"][0]
    assert 700 * 10 <= shift_step <= 730 * 10
    assert answer["window"]["clean_start"] == shift_step and answer["transition_left_out"] >= 5
    clean = norms[shift_step // 10:]
    tau, median = reference_tau(clean)
    # The rule may call a few of the new regime's own extremes spikes (k about 3.25 on normal noise:
    # a false-positive rate of about 0.1-0.2%); leaving 1-3 of 480 values out moves τ well under 1%.
    left_out = answer["spikes_left_out"] + answer["backward_left_out"]
    assert left_out <= 4 and answer["window"]["clean_steps"] >= len(clean) - left_out
    assert answer["threshold"] == pytest.approx(tau, rel=0.01) and "level shift" in answer["rationale"]


def test_loss_spikes_name_the_gradient_spikes_before_them():
    steps = list(range(1700, 1900))
    loss = [2.0 + 0.01 * ((s * 3) % 5 - 2) for s in steps]
    loss[steps.index(1810)] = 6.0
    loss[steps.index(1850)] = 5.0
    loss[steps.index(1860)] = None  # not recorded: left out
    events = loss_spikes(steps, loss, [1807, 1700, 1845, 1849])
    assert [e["step"] for e in events] == [1810, 1850]
    assert events[0] == {"kind": "loss_spike", "step": 1810,
                         "message": "loss spike at 1,810 followed the gradient spike at 1,807",
                         "detail": {"grad_steps": [1807], "loss": 6.0, "score": events[0]["detail"]["score"]}}
    assert events[1]["message"] == "loss spike at 1,850 followed the gradient spikes at 1,845 and 1,849"
    alone = loss_spikes(steps, loss, [])
    assert alone[0]["message"] == "loss spike at 1,810" and alone[0]["detail"]["grad_steps"] == []
    assert loss_spikes([], [], [1]) == []


# ------------------------------------------------------------ bursts (issue 21)

def test_bursts_with_aftermath_stay_out_of_the_clean_window_and_are_listed():
    """A burst of 3 corrupted batches, 8 steps of aftermath, then a 60x burst: the old rule took the
    first for a level shift and kept the second in the clean window; now all are left out."""
    rng = np.random.default_rng(11)
    n = 1500
    norms = np.exp(0.1 * rng.standard_normal(n))
    bad = []
    for start in (900, 1100, 1300):
        norms[start:start + 3] *= 20.0
        norms[start + 3:start + 11] *= 3.0            # aftermath
        norms[start + 30:start + 34] *= 60.0          # the burst after the burst
        bad += list(range(start, start + 11)) + list(range(start + 30, start + 34))
    steps = np.arange(n) * 10
    answer = recommend(steps, norms, window=1000)
    assert answer["level_shift"] is False and answer["transition_left_out"] == 0
    window = np.arange(n - 1000, n)
    clean = np.setdiff1d(window, bad)
    assert answer["window"]["clean_steps"] == len(clean)
    tau, _ = reference_tau(norms[clean])
    assert answer["threshold"] == pytest.approx(tau)
    assert answer["burst_count"] == 6 and answer["burst_steps_left_out"] == len(bad)
    assert [b["steps"] for b in answer["bursts_left_out"]] == [11, 4] * 3
    assert answer["bursts_left_out"][0] == {"start": 9000, "end": 9100, "steps": 11}
    assert "in 6 bursts" in answer["rationale"]
    assert set(answer) == set(RECOMMENDATION_KEYS)


def test_the_backward_pass_leaves_out_a_burst_the_forward_pass_could_not_judge():
    """A burst inside the forward pass's warm-up (the first 25 steps of a short run) is
    judged by the backward pass, whose history is the steps after it."""
    steps, norms = lognormal_run(600, seed=4)
    norms[5:10] *= 50.0
    answer = recommend(steps, norms, window=600)
    assert answer["spikes_left_out"] == 0 and answer["backward_left_out"] == 5
    assert answer["bursts_left_out"] == [{"start": 50, "end": 90, "steps": 5}]
    clean = np.delete(norms, range(5, 10))
    tau, _ = reference_tau(clean)
    assert answer["threshold"] == pytest.approx(tau)


@pytest.mark.parametrize("name, sign", [("Lion", True), ("optim.Lion", True), ("lion8bit", True), ("SignSGD", True),
                                        ("Signum", True), ("AdamW", False), ("SGD", False), ("", False),
                                        (None, False), ("Adafactor", False)])
def test_sign_based_optimizers_are_known_by_name(name, sign):
    assert diagnostics.is_sign_based(name) is sign

"""The fast path of ``robust_spikes`` (blocks judged at once with NumPy) against the step-by-step
loop (``robust_loop``, ``fast=False``): the same flags, level shifts, transitions and scores, bit for bit,
on many kinds of series and parameters; and the rule's state after a fast stream is the loop's state."""
from __future__ import annotations

import math

import numpy as np
import pytest

from gradwatch.clip import spike_rule
from gradwatch.clip.spike_rule import RobustRule, robust_loop, robust_spikes


def assert_same(values, **params):
    fast = robust_spikes(values, **params)
    loop = robust_loop(values, **params)
    for name in ("spike", "level_shift", "transition", "ready"):
        got, want = getattr(fast, name), getattr(loop, name)
        assert got.dtype == want.dtype == bool
        assert np.array_equal(got, want), (name, np.flatnonzero(got != want)[:10])
    assert fast.score.dtype == loop.score.dtype == np.float64
    # bit for bit: the same float64 values (NaN where the loop has NaN, the same signed infinities)
    assert np.array_equal(fast.score, loop.score, equal_nan=True), np.flatnonzero(fast.score != loop.score)[:10]
    assert np.array_equal(np.signbit(fast.score), np.signbit(loop.score))
    return loop


def series(kind: str, seed: int, n: int = 2500) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "lognormal":
        x = np.exp(0.3 * rng.standard_normal(n))
    elif kind == "student_t":
        x = np.exp(0.25 * rng.standard_t(3, n))
    elif kind == "drift":
        x = np.exp(0.2 * rng.standard_normal(n) + np.linspace(0.0, -2.0, n))
    elif kind == "bursts":
        x = np.exp(0.2 * rng.standard_normal(n))
        for start in rng.choice(n - 20, 8, replace=False):
            x[start:start + rng.integers(2, 15)] *= rng.uniform(5, 40)
    elif kind == "level_shifts":
        x = np.exp(0.2 * rng.standard_normal(n))
        x[n // 3:] *= 5.0
        x[2 * n // 3:] /= 25.0
    elif kind == "nonfinite_zeros":
        x = np.exp(0.3 * rng.standard_normal(n))
        x[rng.choice(n, 40, replace=False)] = np.nan
        x[rng.choice(n, 10, replace=False)] = np.inf
        x[rng.choice(n, 10, replace=False)] = -np.inf
        x[rng.choice(n, 60, replace=False)] = 0.0
    elif kind == "quantized":   # many ties: the median and the MAD fall on repeated values
        x = np.round(np.exp(0.2 * rng.standard_normal(n)), 1) + 0.1
    else:
        raise AssertionError(kind)
    spikes = rng.choice(n, n // 100, replace=False)
    x[spikes] *= rng.uniform(3, 50, len(spikes))
    return x


KINDS = ["lognormal", "student_t", "drift", "bursts", "level_shifts", "nonfinite_zeros", "quantized"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_fast_equals_loop_default_rule(kind, seed):
    loop = assert_same(series(kind, seed))
    assert loop.spike.sum() >= 10   # the series do have flags for the blocks to stop at
    if kind == "level_shifts":
        assert loop.level_shift.sum() >= 1 and loop.transition.sum() >= 1


@pytest.mark.parametrize("kind", KINDS)
def test_fast_equals_loop_fixed_k_and_other_windows(kind):
    x = series(kind, 7, 1500)
    assert_same(x, k=3.0)
    assert_same(x, k=4.5, history=120, warmup=40, shift_window=12, shift_span=4)
    assert_same(x, history=50, warmup=10, shift_window=8, shift_span=3, min_scale=0.05)   # k at k_max: < tail_min
    assert_same(x, history=150, shift_window=7, shift_span=2, tail_quantile=0.9, tail_power=2.0, k_min=2.5)
    assert_same(x, history=16, warmup=3, shift_window=16, shift_span=1)   # the window as long as the history
    assert_same(x, history=101, warmup=101, shift_window=5)               # odd history: one middle value


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_equals_loop_linear_space_with_negative_values(seed):
    rng = np.random.default_rng(seed)
    n = 2000
    loss = 0.5 - np.arange(n) / n + 0.05 * rng.standard_normal(n)   # crosses zero: the floor min_scale·|m| -> 0
    loss[rng.choice(n, 25, replace=False)] += rng.uniform(0.5, 5.0, 25)
    loss[[300, 1300]] = [np.nan, -np.inf]
    loss[1500:] += 2.0   # a level shift in linear space
    assert_same(loss, log=False)
    assert_same(loss, log=False, k=3.5, history=80, warmup=20)
    assert_same(-loss, log=False)


def test_fast_equals_loop_degenerate_series():
    assert_same(np.zeros(600), log=False)               # scale 0 everywhere: scores 0
    steps = np.zeros(600)
    steps[400:] = 1.0                                   # then a jump from a zero scale: +inf scores
    steps[450] = -1.0                                   # and a step below it: -inf
    assert_same(steps, log=False)
    assert_same(np.ones(600))                           # log space, MAD 0: the floor min_scale
    assert_same(np.zeros(600))                          # log of zeros: TINY
    big = np.full(600, 1.7e308)
    big[::3] = 1.0e308                                  # linear space: medians that overflow to inf
    assert_same(big, log=False)
    for n in (0, 1, 24, 25, 26, 199, 200, 201, 230):   # short series, around warm-up and a full history
        x = series("student_t", n, max(n, 1))[:n]
        assert_same(x)
        assert_same(x, log=False)
    assert_same([1.0, None, 2.0, float("nan")] * 100)   # None is NaN


def test_fast_equals_loop_long_series_with_everything():
    x = series("student_t", 11, 21_000)
    x[8000:] *= 6.0                     # a level shift
    x[15000:15010] *= 30.0              # a burst
    x[rng_positions(21_000, 30)] = np.nan
    loop = assert_same(x)
    assert loop.level_shift.sum() >= 1


def rng_positions(n: int, count: int) -> np.ndarray:
    return np.random.default_rng(n).choice(n, count, replace=False)


def rule_state(rule: RobustRule) -> tuple:
    start = rule.filled % rule.history if rule.filled >= rule.history else 0
    used = min(rule.filled, rule.history)
    ring = (rule._ring[start:] + rule._ring[:start]) if rule.filled >= rule.history else rule._ring[:used]
    return (ring, rule._ordered, rule.filled, rule.seen, list(rule._recent), rule._recent_sorted,
            rule._newest_sorted, rule._run, rule.transition, rule.last_k)


@pytest.mark.parametrize("guess", ["default", "none", "all", "random"])
def test_the_guess_changes_nothing_but_speed(guess):
    """Blocks start from a guess of the flags and stop where it is wrong: any guess gives the loop's
    answer, and the rule is left in the loop's state (ring, sorted copies, recent window, run, last k)."""
    stream = np.log(series("bursts", 3, 3000))
    stream[1200:] += 1.5                     # a level shift: the refill goes through the loop
    n = len(stream)
    guesses = {"default": None, "none": np.zeros(n, bool), "all": np.ones(n, bool),
               "random": np.random.default_rng(0).random(n) < 0.3}
    fast_rule, loop_rule = RobustRule(), RobustRule()
    score, spike, level_shift, transition = spike_rule._judge_stream(fast_rule, stream, guesses[guess])
    want = [loop_rule.judge(v) for v in stream.tolist()]
    assert rule_state(fast_rule) == rule_state(loop_rule)
    assert np.array_equal(score, [v.score for v in want])
    assert level_shift.sum() == sum(v.level_shift for v in want) >= 1
    assert np.array_equal(spike | transition, [v.spike for v in want])


def test_a_block_judges_many_steps_at_once():
    """The fast path is taken: with a full history, one call judges a whole clean block, and the
    rule's state then equals that of the loop fed the same values."""
    rng = np.random.default_rng(4)
    stream = 0.2 * rng.standard_normal(1000)
    fast_rule, loop_rule = RobustRule(), RobustRule()
    for value in stream[:300].tolist():
        fast_rule.judge(value)
        loop_rule.judge(value)
    score = np.zeros(len(stream))
    spike = np.zeros(len(stream), bool)
    accepted = spike_rule._judge_block(fast_rule, stream, 300, 500, score, spike, np.zeros(len(stream), bool))
    want = [loop_rule.judge(v) for v in stream[300:300 + accepted].tolist()]
    assert accepted >= 100 and not spike.any()
    assert score[300:300 + accepted].tolist() == [v.score for v in want]
    assert rule_state(fast_rule) == rule_state(loop_rule)
    assert fast_rule.last_k == loop_rule.last_k and math.isfinite(fast_rule.last_k)

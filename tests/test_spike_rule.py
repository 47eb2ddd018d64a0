"""The shared spike rule (clip/spike_rule.py) against an independent reference, and its promises:
k adapts to the tail, a burst is never a level shift, a genuine shift is followed within 16 flags,
the history after a shift holds no burst values, the in-graph RobustDetector gives the same flags."""
from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from gradwatch.clip import spike_rule
from gradwatch.clip.spike_rule import RobustRule, adaptive_k, burst_runs, robust_spikes, tail_gauss


def reference_rule(values, k=None, history=200, warmup=25, window=16, span=8, min_scale=0.01,
                   k_gauss=3.25, k_min=3.0, k_max=6.0, q=0.95, power=3.0, tail_min=100):
    """The rule written out with lists, np.median and np.mean (no bisection, no ring):
    returns (score, spike, level_shift, transition) lists over the finite values' positions."""
    hist: list[float] = []                        # unflagged log values, oldest first
    recent: list[tuple[int, float, bool]] = []    # (index, raw log value, flagged)
    seen = run = 0
    out = []
    gauss = statistics.NormalDist()
    ratio_gauss = gauss.pdf(gauss.inv_cdf(q)) / (1 - q) / gauss.inv_cdf(0.75)   # E[X | X > z_q] / z_0.75
    for i, x in enumerate(values):
        if not math.isfinite(x):
            out.append([None, True, False, False])
            continue
        lx = math.log(max(x, 1e-30))
        ready = seen >= warmup
        z, flagged, bound, kk = 0.0, False, math.inf, None
        if ready:
            h = np.array(hist)
            med = float(np.median(h))
            dev = np.abs(h - med)
            mad = float(np.median(dev))
            scale = max(1.4826 * mad, min_scale)
            if k is not None:
                kk = k
            elif len(h) < tail_min or mad == 0:
                kk = k_max
            else:
                top = np.sort(h)[len(h) - (len(h) - math.floor(round(q * len(h), 9))):]   # the top 5%
                tail = (float(np.mean(top)) - med) / mad
                kk = min(max(k_gauss * (tail / ratio_gauss) ** power, k_min), k_max)
            z = (lx - med) / scale
            flagged = z > kk
            bound = med + kk * scale
        if not flagged:
            hist = (hist + [lx])[-history:]
        recent = (recent + [(i, lx, flagged)])[-window:]
        seen += 1
        raws = [v for _, v, _ in recent]
        above = sum(v > bound for v in raws)
        newest = sum(v > bound for v in raws[-(window // 2):])
        run = run + 1 if (ready and above > window // 2 and newest > window // 4) else 0
        out.append([z, flagged, False, False])
        if flagged and run >= span:
            out[-1] = [z, False, True, False]
            for j, _, was in recent:
                if was and j != i:
                    out[j][1], out[j][3] = False, True
            arr = np.array(raws)
            med = float(np.median(arr))
            scale = max(1.4826 * float(np.median(np.abs(arr - med))), min_scale)
            hist = [v for v in raws if abs(v - med) <= kk * scale]
            recent = [(j, v, False) for j, v, _ in recent]
            run = 0
    return out


def lognormal(n, sigma=0.2, seed=0):
    return np.exp(sigma * np.random.default_rng(seed).standard_normal(n))


def long_sequence(n=2000, seed=0):
    """Drift, a heavy-tailed stretch, spikes, bursts, non-finite values and a genuine 5x shift."""
    rng = np.random.default_rng(seed)
    logs = np.linspace(1.0, -1.0, n) + 0.2 * rng.standard_normal(n)
    logs[800:1200] = np.linspace(1.0, -1.0, n)[800:1200] + 0.15 * rng.standard_t(4, 400)
    logs[1500:] += math.log(5.0)
    x = np.exp(logs)
    for i in rng.choice(np.arange(100, n), 30, replace=False):
        x[i] *= float(np.exp(rng.uniform(math.log(3), math.log(50))))
    for start in (300, 600, 1300):            # bursts of 3-6 corrupted batches
        x[start:start + 3 + start % 4] *= 20.0
    x[[50, 700]] = [np.nan, np.inf]
    return [float(np.float32(v)) for v in x]


@pytest.mark.parametrize("seed", [0, 1])
def test_the_rule_equals_the_written_out_reference(seed):
    values = long_sequence(seed=seed)
    ref = reference_rule(values)
    found = robust_spikes(values)
    assert list(found.spike) == [r[1] for r in ref]
    assert list(found.level_shift) == [r[2] for r in ref]
    assert list(found.transition) == [r[3] for r in ref]
    for i, r in enumerate(ref):
        if r[0] is not None:
            assert found.score[i] == pytest.approx(r[0], rel=1e-9, abs=1e-9)
    assert found.level_shift.sum() >= 1 and found.spike.sum() >= 30


def test_fixed_k_and_other_parameters_equal_the_reference():
    values = list(lognormal(600, 0.3, seed=5))
    values[300:] = [3 * v for v in values[300:]]
    values[77] = 40.0
    params = dict(k=3.0, history=50, warmup=10, window=8, span=3, min_scale=0.05)
    ref = reference_rule(values, **params)
    found = robust_spikes(values, k=3.0, history=50, warmup=10, shift_window=8, shift_span=3, min_scale=0.05)
    assert list(found.spike) == [r[1] for r in ref]
    assert list(found.level_shift) == [r[2] for r in ref] and found.level_shift.sum() >= 1


def test_k_adapts_to_the_tail_of_the_history():
    rng = np.random.default_rng(3)
    assert tail_gauss() == pytest.approx(0.1031356 / 0.05 / 0.674490, rel=1e-5)   # φ(z_0.95) / 0.05 / z_0.75
    assert adaptive_k(tail_gauss()) == pytest.approx(3.25)
    light, heavy = RobustRule(), RobustRule()
    ks_light, ks_heavy = [], []
    for a, b in zip(rng.standard_normal(2000), rng.standard_t(4, 2000)):
        light.update(math.exp(0.3 * a))
        heavy.update(math.exp(0.3 * b))
        ks_light.append(light.last_k)
        ks_heavy.append(heavy.last_k)
    assert 3.0 <= np.median(ks_light[300:]) <= 3.8      # normal log noise: judged at about 3-3.5
    assert np.median(ks_heavy[300:]) >= 4.8              # Student-t(4): a higher bound
    assert all(k == spike_rule.K_MAX for k in ks_light[25:100])   # a short history: the cap


def test_bursts_with_aftermath_are_spikes_never_a_level_shift_and_the_next_burst_is_flagged():
    """Issue 21's case: a burst of 3-6 corrupted batches plus 8 elevated steps, then a return;
    a second burst (50-70x) later must still be flagged."""
    x = list(lognormal(1500, 0.1, seed=2))
    truth = []
    for start, length in ((300, 3), (500, 6), (700, 4), (900, 5)):
        for j in range(start, start + length):
            x[j] *= 30.0
            truth.append(j)
        for j in range(start + length, start + length + 8):
            x[j] *= 3.0                                    # genuine aftermath
        for j in range(start + length + 8 + 10, start + length + 8 + 10 + length):
            x[j] *= 60.0                                   # the burst after the burst
            truth.append(j)
    found = robust_spikes(x)
    assert not found.level_shift.any() and not found.transition.any()
    assert found.spike[truth].all()


def test_a_genuine_shift_is_followed_after_sixteen_flags_and_the_burst_in_it_is_left_out():
    x = list(lognormal(800, 0.1, seed=4))
    x[400:] = [5.0 * v for v in x[400:]]
    x[405:408] = [v * 40 for v in x[405:408]]               # a burst inside the new level's first steps
    rule = RobustRule()
    verdicts = []
    for v in x:
        verdicts.append(rule.update(v))
        if verdicts[-1].level_shift:   # the history right after the shift
            assert rule.filled <= spike_rule.SHIFT_WINDOW
            new_level = math.log(5.0)
            assert max(rule._ordered) < new_level + 1.0 and min(rule._ordered) > new_level - 1.0   # no burst value
    shifts = [i for i, v in enumerate(verdicts) if v.level_shift]
    flags = [i for i, v in enumerate(verdicts) if v.spike]
    assert len(shifts) == 1 and 400 <= shifts[0] <= 420
    assert len([i for i in flags if 400 <= i < shifts[0]]) == 15        # 15 flags, the 16th is the shift
    assert not [i for i in flags if i > shifts[0] and i not in range(405, 408)]


def test_a_flagged_value_never_enters_the_history():
    rule = RobustRule(warmup=3)
    for v in (1.0, 1.1, 0.9, 1.05):
        rule.update(v)
    before = list(rule._ordered)
    verdict = rule.update(1000.0)
    assert verdict.spike and rule._ordered == before
    for bad in (math.nan, math.inf, -math.inf):
        assert rule.update(bad).spike and rule._ordered == before


def test_burst_runs():
    flags = np.array([0, 1, 1, 0, 1, 0, 0, 1, 1, 1], bool)
    assert burst_runs(flags) == [(1, 2, 2), (4, 4, 1), (7, 9, 3)]
    assert burst_runs(flags, np.arange(10) * 10) == [(10, 20, 2), (40, 40, 1), (70, 90, 3)]
    assert burst_runs(np.zeros(3, bool)) == []


@pytest.mark.parametrize("kwargs", [dict(shift_window=300), dict(shift_window=1), dict(shift_span=0), dict(k=0.0)])
def test_bad_parameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        RobustRule(**kwargs)


# ------------------------------------------------------------------ the in-graph copy

def in_graph_flags(values, compiled=True, **params):
    import mlx.core as mx

    from gradwatch.clip.robust import RobustDetector
    detector = RobustDetector(**params)
    state = detector.state
    step = detector
    if compiled:
        step = mx.compile(lambda n: detector(n), inputs=state, outputs=state)
    out = []
    for v in values:
        info = step(mx.array(v, mx.float32))
        mx.eval(info, state)
        out.append((bool(info.spike.item()), bool(info.level_shift.item()), float(info.score.item())))
    return out


def test_the_in_graph_detector_flags_what_the_numpy_rule_flags():
    values = long_sequence(seed=1)
    found = robust_spikes(values)
    got = in_graph_flags(values)
    # the in-graph detector reports the flags as they came (no relabelling of transitions)
    assert [g[0] for g in got] == list(found.spike | found.transition)
    assert [g[1] for g in got] == list(found.level_shift)
    finite = np.isfinite(values)
    scores = np.array([g[2] for g in got])
    assert np.allclose(scores[finite], found.score[finite], rtol=1e-4, atol=1e-3)


def test_the_in_graph_detector_with_a_fixed_k_and_small_windows():
    values = list(lognormal(700, 0.3, seed=9))
    values[350:] = [4 * v for v in values[350:]]
    values[100] = 50.0
    found = robust_spikes(values, k=3.0, history=50, warmup=10, shift_window=8, shift_span=3)
    got = in_graph_flags(values, compiled=False, k=3.0, history=50, warmup_steps=10, shift_window=8, shift_span=3)
    assert [g[0] for g in got] == list(found.spike | found.transition)
    assert [g[1] for g in got] == list(found.level_shift) and found.level_shift.any()

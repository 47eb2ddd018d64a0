"""server/analysis/tensor_groups.py's group spikes use the shared rule's adaptive bound: equal to a plain
per-step reference (np.median, np.mean of the top values) on hard sequences, whatever the block shortcut does."""
from __future__ import annotations

import numpy as np

from gradwatch.clip import spike_rule as rule
from gradwatch.server.analysis import tensor_groups as tg


def per_step_adaptive(logs: np.ndarray, history=200, warmup=25, min_scale=0.01) -> np.ndarray:
    """The bound of the shared rule over the previous `history` finite values, the plain way."""
    flags = np.zeros(len(logs), dtype=bool)
    for j in range(warmup, len(logs)):
        window = logs[max(0, j - history):j]
        center = np.median(window)
        dev = np.abs(window - center)
        mad = np.median(dev)
        if len(window) >= rule.TAIL_MIN and mad > 0:
            top = np.sort(window)[-(len(window) - int(np.floor(round(rule.TAIL_QUANTILE * len(window), 9)))):]
            tail = (np.mean(top) - center) / mad   # the top 5% above the median, in MADs
            k = rule.adaptive_k(tail)
        else:
            k = rule.K_MAX
        flags[j] = logs[j] > center + k * max(1.4826 * mad, min_scale)
    return flags


def test_group_spike_flags_follow_the_adaptive_rule_on_hard_sequences():
    rng = np.random.default_rng(7)
    sequences = [rng.normal(0, 0.2, 2500), rng.standard_t(3, 1800) * 0.3,      # normal, heavy tails
                 np.cumsum(rng.normal(0, 0.05, 2200)),                          # drift
                 np.round(rng.normal(0, 0.004, 1500), 3),                       # ties at the MAD floor
                 rng.normal(0, 0.2, 180), rng.normal(0, 0.2, 20)]               # short runs
    assert tg.SPIKE_K is None
    for logs in sequences:
        spikes = rng.random(len(logs)) < 0.01
        logs[spikes] += rng.uniform(0.5, 4.0, spikes.sum())   # some near the bound, some far above
        norms = np.exp(logs)
        np.testing.assert_array_equal(tg.spike_flags(norms), per_step_adaptive(np.log(norms)))
        single = norms.astype(np.float32)
        np.testing.assert_array_equal(tg.spike_flags(single), per_step_adaptive(np.log(single.astype(np.float64))))


def test_moderate_spikes_on_a_light_tailed_group_are_counted():
    """3.2x spikes on a group with log noise 0.25 (z about 4.7): above the adaptive bound (k about 3.25),
    below the old fixed k = 5 one."""
    rng = np.random.default_rng(3)
    n = 1500
    norms = np.exp(rng.normal(0.0, 0.25, (n, 2))).astype(np.float32)
    steps = [400, 800, 1200]
    local = np.exp(np.median(np.log(norms[:, 0])))
    norms[steps, 0] = 3.2 * local
    counts, latest = tg.spike_counts(norms, np.zeros(norms.shape, bool))
    flags = tg.spike_flags(norms[:, 0])
    assert flags[steps].all() and latest[0] >= 1200
    assert not tg.spike_flags(norms[:, 0], k=5.0)[steps].any()

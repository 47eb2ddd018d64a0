"""server/analysis/tensor_groups.py against plain NumPy loops: names grouped by module path,
group norms as the per-step L2 of their tensors, downsampling by bucket max, robust
per-group spike counts."""
from __future__ import annotations

import math

import numpy as np

from gradwatch.server.analysis import tensor_groups as tg


def test_module_paths_of_mlx_lm_and_plain_names():
    assert tg.block_of("model.layers.12.self_attn.q_proj.weight") == "model.layers.12"
    assert tg.module_of("model.layers.12.self_attn.q_proj.weight") == "model.layers.12.self_attn"
    assert tg.module_of("model.layers.3.input_layernorm.weight") == "model.layers.3.input_layernorm"
    assert tg.block_of("layers.0.weight") == "layers.0" and tg.module_of("layers.0.weight") == "layers.0"
    assert tg.block_of("model.embed_tokens.weight") == "model.embed_tokens"
    assert tg.block_of("lm_head.weight") == "lm_head" and tg.block_of("bias") == "bias"
    assert tg.block_of("layers.10.mlp.up.weight") == "layers.10"  # not layers.1


def test_group_norms_are_the_l2_of_member_norms_then_the_bucket_max():
    rng = np.random.default_rng(0)
    names = [f"layers.{b}.{m}.weight" for b in range(3) for m in ("attn", "mlp", "norm")] + ["head.weight"]
    steps = np.arange(100, 150)
    norms = rng.uniform(0.5, 2.0, (len(steps), len(names))).astype(np.float32)
    norms[7, 4] = np.nan  # layers.1.mlp
    absent = np.zeros(norms.shape, dtype=bool)
    absent[9, 0] = True  # layers.0.attn did not report at step 109
    answer = tg.grouped_answer(names, steps, norms, absent, "block", points=10)
    assert answer["names"] == ["layers.0", "layers.1", "layers.2", "head"]
    assert answer["members"][0] == names[0:3]
    assert answer["step"] == list(range(100, 150, 5))
    for g, group in enumerate(answer["names"]):
        columns = [i for i, name in enumerate(names) if name.startswith(group + ".")]
        for b in range(10):
            per_step = []
            for s in range(b * 5, b * 5 + 5):
                total = 0.0
                for c in columns:
                    if not absent[s, c]:
                        total += float(norms[s, c]) ** 2
                per_step.append(math.sqrt(total))
            got = answer["norms"][g][b]
            if any(math.isnan(v) for v in per_step):
                assert got == "NaN"
            else:
                assert math.isclose(got, max(per_step), rel_tol=1e-5), (group, b)


def test_robust_spike_counts_find_the_group_that_spikes():
    rng = np.random.default_rng(1)
    names = [f"layers.{b}.{m}.weight" for b in range(4) for m in ("attn", "mlp", "input_layernorm")]
    n = 2000
    norms = np.exp(rng.normal(0.0, 0.1, (n, len(names)))).astype(np.float32)
    spiky = names.index("layers.2.input_layernorm.weight")
    spike_steps = [300, 700, 1100, 1500, 1900]
    norms[spike_steps, spiky] *= 50.0
    answer = tg.grouped_answer(names, np.arange(n), norms, np.zeros(norms.shape, bool), "module", points=500)
    counts = dict(zip(answer["names"], answer["spikes"]))
    assert counts["layers.2.input_layernorm"] >= len(spike_steps)
    # the adaptive bound (k about 3.25 on normal noise) flags about 0.1% of clean steps
    assert sum(counts.values()) - len(spike_steps) <= 0.003 * n * len(names)
    assert answer["latest_spike"][answer["names"].index("layers.2.input_layernorm")] == 1900
    assert answer["parents"][answer["names"].index("layers.2.mlp")] == "layers.2"


def per_step_rule(logs: np.ndarray, k=5.0, history=200, warmup=25, min_scale=0.01) -> np.ndarray:
    """The detector's rule with a median per step (np.median), the plain way."""
    flags = np.zeros(len(logs), dtype=bool)
    for j in range(warmup, len(logs)):
        window = logs[max(0, j - history):j]
        center = np.median(window)
        scale = max(1.4826 * np.median(np.abs(window - center)), min_scale)
        flags[j] = logs[j] > center + k * scale
    return flags


def test_group_spike_flags_equal_a_median_per_step_on_hard_sequences():
    rng = np.random.default_rng(7)
    sequences = [rng.normal(0, 0.2, 2500), rng.standard_t(2, 1800) * 0.3,      # heavy tails
                 np.cumsum(rng.normal(0, 0.05, 2200)),                          # drift
                 np.round(rng.normal(0, 0.004, 1500), 3),                       # ties at the MAD floor
                 rng.normal(0, 0.2, 180), rng.normal(0, 0.2, 201), rng.normal(0, 0.2, 20)]  # short runs
    for logs in sequences:
        spikes = rng.random(len(logs)) < 0.01
        logs[spikes] += rng.uniform(0.5, 4.0, spikes.sum())  # some near the fence, some far above
        norms = np.exp(logs)
        np.testing.assert_array_equal(tg.spike_flags(norms, k=5.0), per_step_rule(np.log(norms)))
        single = norms.astype(np.float32)  # as group norms are stored
        np.testing.assert_array_equal(tg.spike_flags(single, k=5.0),
                                      per_step_rule(np.log(single.astype(np.float64))))
    table = np.exp(np.stack([s[:1800] for s in sequences[:3]], axis=1))  # columns judged on their own
    got = tg.spike_flags(table, k=5.0)   # the adaptive default: tests/test_spike_rule_groups.py
    for column in range(table.shape[1]):
        np.testing.assert_array_equal(got[:, column], per_step_rule(np.log(table[:, column])))


def test_group_spikes_agree_with_the_robust_detector_and_count_non_finite_norms():
    import mlx.core as mx
    from gradwatch.clip.robust import RobustDetector

    rng = np.random.default_rng(11)
    n = 700
    norms = np.exp(rng.normal(0.0, 0.15, (n, 2))).astype(np.float32)
    norms[[60, 240, 410, 655], 0] *= [9.0, 30.0, 4.0, 80.0]
    norms[500, 1] = np.nan  # a NaN in the second group: a spike, then left out of its history
    missing = np.zeros(norms.shape, dtype=bool)
    missing[100:120, 1] = True  # steps the second group did not report
    detector = RobustDetector()
    expected = []
    for step in range(n):
        info = detector(mx.array(norms[step, 0]))
        if bool(info.spike.item()):
            expected.append(step)
    assert len(expected) >= 3
    counts, latest = tg.spike_counts(norms, missing)
    flags = tg.spike_flags(norms[:, 0])
    assert np.flatnonzero(flags).tolist() == expected
    assert counts[0] == len(expected) and latest[0] == expected[-1]
    reported = np.flatnonzero(~missing[:, 1] & np.isfinite(norms[:, 1]))
    from tests.test_spike_rule_groups import per_step_adaptive
    second = per_step_adaptive(np.log(norms[reported, 1].astype(np.float64)))
    assert counts[1] == second.sum() + 1 and latest[1] == max([500] + reported[second].tolist())


def test_grouped_answers_follow_new_steps_through_the_cache(tmp_path):
    """The server keeps grouped answers per run state: asked twice, the same answer; after a
    batch, the new steps are in it (real server, real SQLite, over HTTP)."""
    from tests.procs import ServerProcess
    from tests.test_dashboard_support import get_json, post_steps

    names = [f"layers.{b}.{m}.weight" for b in range(2) for m in ("attn", "mlp")]
    rng = np.random.default_rng(4)

    def batch(start, count):
        norms = rng.uniform(0.5, 2.0, (count, len(names)))
        return norms, {"step": list(range(start, start + count)), "pre_norm": [1.0] * count,
                       "tensor_norms": {"names": names, "norms": norms.tolist()}}

    with ServerProcess(f"sqlite:///{tmp_path / 'groups.db'}") as server:
        first, body = batch(0, 300)
        post_steps(server.url, "grouped", body)
        path = "/api/runs/grouped/tensors?group=module&points=1000"
        answer = get_json(server.url, path)
        assert answer == get_json(server.url, path) and answer["steps_total"] == 300
        second, body = batch(300, 50)
        post_steps(server.url, "grouped", body)
        answer = get_json(server.url, path)
        assert answer["steps_total"] == 350 and answer["step"] == list(range(350))
        both = np.concatenate([first, second])
        for g, group in enumerate(answer["names"]):
            np.testing.assert_allclose(answer["norms"][g], both[:, names.index(group + ".weight")], rtol=1e-6)
        blocks = get_json(server.url, "/api/runs/grouped/tensors?group=block&points=1000")
        np.testing.assert_allclose(blocks["norms"][1], np.sqrt((both[:, 2:4] ** 2).sum(axis=1)), rtol=1e-6)

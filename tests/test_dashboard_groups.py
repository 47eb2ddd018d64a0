"""server/tensor_groups.py against plain NumPy loops: names grouped by module path,
group norms as the per-step L2 of their tensors, downsampling by bucket max, robust
per-group spike counts."""
from __future__ import annotations

import math

import numpy as np

from gradwatch.server import tensor_groups as tg


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
    assert counts["layers.2.input_layernorm"] == len(spike_steps)
    assert sum(counts.values()) == len(spike_steps)  # lognormal noise at sigma 0.1 never passes the fence
    assert answer["latest_spike"][answer["names"].index("layers.2.input_layernorm")] == 1900
    assert answer["parents"][answer["names"].index("layers.2.mlp")] == "layers.2"

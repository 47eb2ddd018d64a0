"""Norms and GlobalNorm against independent references: MLX's own clip_grad_norm and NumPy."""
from __future__ import annotations

import math

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from gradwatch.clip import ClipInfo, GlobalNorm, global_norm, norms_and_global, tensor_norms

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def random_tree(rng: np.random.Generator, dtype, scale: float = 1.0):
    """A nested tree of dicts and lists with tensors of assorted shapes."""
    def arr(*shape):
        return mx.array((rng.standard_normal(shape) * scale).astype(np.float32)).astype(dtype)
    return {
        "embed": {"weight": arr(37, 16)},
        "layers": [
            {"attn": {"q": arr(16, 16), "k": arr(16, 16)}, "norm": [arr(16), arr(16)]},
            {"attn": {"q": arr(16, 16), "k": arr(16, 16)}, "norm": [arr(16), arr(16)]},
        ],
        "head": [arr(5, 16), arr(5), arr()],
    }


def as_f64(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32), dtype=np.float64)


def numpy_norm(tree, p=2.0) -> float:
    flat = np.concatenate([as_f64(g).ravel() for _, g in tree_flatten(tree)])
    return float(np.linalg.norm(flat, ord=p))


def assert_trees_identical(a, b):
    fa, fb = tree_flatten(a), tree_flatten(b)
    assert [n for n, _ in fa] == [n for n, _ in fb]
    for (name, x), (_, y) in zip(fa, fb):
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert mx.array_equal(x, y).item(), f"{name} differs"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("seed", range(6))
def test_global_norm_clipper_is_bit_identical_to_mlx_clip_grad_norm(dtype, seed):
    rng = np.random.default_rng(seed)
    grads = random_tree(rng, DTYPES[dtype], scale=[0.01, 0.1, 1.0, 3.0, 10.0, 0.5][seed])
    for max_norm in (0.0, 0.5, 1.0, 100.0):
        expected, expected_norm = optim.clip_grad_norm(grads, max_norm)
        clipped, info = GlobalNorm(max_norm)(grads)
        assert_trees_identical(clipped, expected)
        assert info.pre_norm.dtype == expected_norm.dtype
        assert info.pre_norm.item() == expected_norm.item()
        assert global_norm(grads).item() == expected_norm.item()
        assert norms_and_global(grads)[1].item() == expected_norm.item()


@pytest.mark.parametrize("seed", range(4))
def test_bfloat16_norm_is_float32_accurate_and_clip_matches_mlx_to_a_rounding(seed):
    rng = np.random.default_rng(100 + seed)
    grads = random_tree(rng, mx.bfloat16, scale=2.0)
    exact = numpy_norm(grads)
    clipped, info = GlobalNorm(1.0)(grads)
    # Squares summed in float32: the norm is right to float32 precision ...
    assert info.pre_norm.dtype == mx.float32
    assert info.pre_norm.item() == pytest.approx(exact, rel=1e-6)
    # ... while MLX sums bfloat16 squares in bfloat16 (8 mantissa bits).
    expected, mlx_norm = optim.clip_grad_norm(grads, 1.0)
    assert mlx_norm.item() == pytest.approx(exact, rel=2 ** -6)
    # Clipped values: the float32 product cast to bfloat16, as an independent NumPy reference.
    scale = np.float32(min(np.float32(1.0) / (np.float32(exact) + np.float32(1e-6)), 1.0))
    for (name, got), (_, want_mlx), (_, g) in zip(tree_flatten(clipped), tree_flatten(expected),
                                                   tree_flatten(grads)):
        assert got.dtype == mx.bfloat16
        reference = mx.array(np.array(g.astype(mx.float32)) * scale).astype(mx.bfloat16)
        ulp = np.abs(as_f64(reference)) * 2.0 ** -7 + 1e-30
        assert np.all(np.abs(as_f64(got) - as_f64(reference)) <= ulp), name
        assert np.all(np.abs(as_f64(got) - as_f64(want_mlx)) <= 2 * ulp), name


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_tensor_norms_names_and_values_match_numpy(dtype):
    grads = random_tree(np.random.default_rng(7), DTYPES[dtype])
    norms = tensor_norms(grads)
    flat = tree_flatten(grads)
    assert list(norms) == [name for name, _ in flat]
    assert "layers.1.attn.q" in norms and "head.2" in norms
    for name, g in flat:
        assert norms[name].dtype == mx.float32
        assert norms[name].item() == pytest.approx(np.linalg.norm(as_f64(g).ravel()), rel=1e-6)
    together, total = norms_and_global(grads)
    assert all(mx.array_equal(together[n], norms[n]).item() for n in norms)
    assert total.item() == pytest.approx(numpy_norm(grads), rel=1e-6)


def test_float16_squares_do_not_overflow():
    grads = {"w": mx.full((1000,), 300.0, dtype=mx.float16)}  # 300² · 1000 > float16 max
    assert global_norm(grads).item() == pytest.approx(300.0 * math.sqrt(1000), rel=1e-6)
    assert tensor_norms(grads)["w"].item() == pytest.approx(300.0 * math.sqrt(1000), rel=1e-6)


def test_hand_computed_p_norms_and_inf_norm():
    grads = {"a": mx.array([3.0, -4.0]), "b": [mx.array([[1.0, -2.0], [0.0, 2.0]])]}
    # |3|+|4|+|1|+|2|+|0|+|2| = 12
    assert global_norm(grads, ord=1).item() == pytest.approx(12.0)
    # 9+16+1+4+0+4 = 34
    assert global_norm(grads, ord=2).item() == pytest.approx(math.sqrt(34.0))
    # 27+64+1+8+0+8 = 108
    assert global_norm(grads, ord=3).item() == pytest.approx(108.0 ** (1 / 3), rel=1e-6)
    assert global_norm(grads, ord=float("inf")).item() == 4.0
    assert global_norm(grads, ord=math.inf).item() == 4.0


@pytest.mark.parametrize("p", [1.0, 1.5, 3.0, float("inf")])
def test_p_norm_clipping_follows_torch_rule(p):
    grads = random_tree(np.random.default_rng(3), mx.float32)
    flat = np.concatenate([as_f64(g).ravel() for _, g in tree_flatten(grads)])
    total = float(np.linalg.norm(flat, ord=p))
    clipped, info = GlobalNorm(0.5, ord=p)(grads)
    assert info.pre_norm.item() == pytest.approx(total, rel=1e-5)
    coef = min(0.5 / (total + 1e-6), 1.0)  # torch.nn.utils.clip_grad_norm_(norm_type=p)
    assert info.scale.item() == pytest.approx(coef, rel=1e-5)
    assert info.post_norm.item() == pytest.approx(0.5, rel=1e-5)
    for (_, got), (_, g) in zip(tree_flatten(clipped), tree_flatten(grads)):
        np.testing.assert_allclose(as_f64(got), as_f64(g) * coef, rtol=1e-5, atol=1e-8)


def test_clip_info_fields_for_a_clipped_and_an_unclipped_step():
    grads = {"w": mx.array([3.0, 4.0])}
    _, info = GlobalNorm(1.0)(grads)
    assert isinstance(info, ClipInfo)
    assert info.pre_norm.item() == 5.0
    assert info.scale.item() == pytest.approx(1.0 / (5.0 + 1e-6))
    assert info.post_norm.item() == pytest.approx(1.0, rel=1e-6)
    assert info.threshold.item() == 1.0
    assert info.clipped.item() is True and info.nonfinite.item() is False
    assert info.tensor_norms["w"].item() == 5.0
    clipped, info = GlobalNorm(10.0)(grads)
    assert info.scale.item() == 1.0 and info.clipped.item() is False
    assert info.post_norm.item() == 5.0
    assert mx.array_equal(clipped["w"], grads["w"]).item()


def test_dtypes_and_structure_are_kept():
    grads = {"a": (mx.ones((2, 2), mx.float16),), "b": [mx.ones(3, mx.bfloat16)],
             "step": mx.array(3, mx.int32)}
    clipped, _ = GlobalNorm(0.1)(grads)
    assert isinstance(clipped["a"], tuple) and isinstance(clipped["b"], list)
    assert clipped["a"][0].dtype == mx.float16 and clipped["b"][0].dtype == mx.bfloat16
    assert clipped["step"].dtype == mx.int32 and clipped["step"].item() == 3


def test_config_is_plain_json():
    import json
    config = GlobalNorm(1.0, ord=float("inf"), nonfinite="skip").config()
    assert config == {"name": "global_norm", "max_norm": 1.0, "ord": "inf", "group_size": None,
                      "nonfinite": "skip"}
    json.dumps(config, allow_nan=False)

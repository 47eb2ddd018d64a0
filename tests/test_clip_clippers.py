"""ValueClip, PerTensorNorm, AGC, AutoClip and AdaGC against NumPy re-derivations."""
from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from gradwatch.clip import AGC, AdaGC, AutoClip, PerTensorNorm, ValueClip


def tree(rng, scale=1.0):
    def arr(*shape):
        return mx.array((rng.standard_normal(shape) * scale).astype(np.float32))
    return {"linear": {"weight": arr(6, 4), "bias": arr(6)},
            "conv": [arr(3, 2, 2, 5)], "gain": arr()}


def flat_np(t):
    return {name: np.array(g, dtype=np.float64) for name, g in tree_flatten(t)}


def global_np(arrays):
    return math.sqrt(sum(float((a ** 2).sum()) for a in arrays))


# ValueClip -----------------------------------------------------------------

def test_value_clip_matches_numpy_clip():
    grads = tree(np.random.default_rng(0), scale=2.0)
    clipped, info = ValueClip(1.5)(grads)
    before, after = flat_np(grads), flat_np(clipped)
    expected = {n: np.clip(a, -1.5, 1.5) for n, a in before.items()}
    for name in before:
        np.testing.assert_array_equal(after[name], expected[name])
    assert info.pre_norm.item() == pytest.approx(global_np(before.values()), rel=1e-6)
    assert info.post_norm.item() == pytest.approx(global_np(expected.values()), rel=1e-6)
    assert info.scale.item() == pytest.approx(global_np(expected.values())
                                              / global_np(before.values()), rel=1e-6)
    size = sum(a.size for a in before.values())
    assert info.threshold.item() == pytest.approx(1.5 * math.sqrt(size), rel=1e-6)
    assert info.clipped.item() is True
    _, info = ValueClip(100.0)(grads)
    assert info.clipped.item() is False and info.scale.item() == pytest.approx(1.0)


# PerTensorNorm -------------------------------------------------------------

def test_per_tensor_norm_matches_numpy():
    grads = tree(np.random.default_rng(1))
    clipped, info = PerTensorNorm(1.0)(grads)
    before, after = flat_np(grads), flat_np(clipped)
    expected = {}
    for name, a in before.items():
        norm = np.linalg.norm(a.ravel())
        expected[name] = a * min(1.0 / (norm + 1e-6), 1.0)
        np.testing.assert_allclose(after[name], expected[name], rtol=1e-6, atol=1e-9)
        assert info.tensor_norms[name].item() == pytest.approx(norm, rel=1e-6)
    assert info.post_norm.item() == pytest.approx(global_np(expected.values()), rel=1e-5)
    assert info.threshold.item() == pytest.approx(1.0 * math.sqrt(len(before)), rel=1e-6)
    assert info.clipped.item() is True


# AGC -----------------------------------------------------------------------

def numpy_agc(grad: np.ndarray, weight: np.ndarray, clipping: float, eps: float) -> np.ndarray:
    """NFNets AGC on MLX's (out, ...) layout: one unit per row for ndim >= 2."""
    if grad.ndim <= 1:
        g_units, w_units = grad.reshape(1, -1), weight.reshape(1, -1)
    else:
        g_units, w_units = grad.reshape(grad.shape[0], -1), weight.reshape(weight.shape[0], -1)
    out = np.empty_like(g_units)
    for u in range(g_units.shape[0]):
        g_norm = np.linalg.norm(g_units[u])
        bound = max(np.linalg.norm(w_units[u]), eps) * clipping
        out[u] = g_units[u] if g_norm < bound else g_units[u] * bound / max(g_norm, 1e-6)
    return out.reshape(grad.shape)


def test_agc_matches_numpy_rederivation():
    rng = np.random.default_rng(2)
    params = tree(rng)
    params["linear"]["weight"] = params["linear"]["weight"] * mx.array([[0.01], [1], [2], [0.0],
                                                                        [3], [0.5]])
    grads = tree(rng, scale=0.05)
    clipped, info = AGC(clipping=0.05, eps=1e-3)(grads, params=params)
    g, w, got = flat_np(grads), flat_np(params), flat_np(clipped)
    expected = {n: numpy_agc(g[n], w[n], 0.05, 1e-3) for n in g}
    for name in g:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-9, err_msg=name)
    # Some rows were clipped and some were not: the test exercises both branches.
    rows_changed = ~np.all(np.isclose(got["linear.weight"], g["linear.weight"]), axis=1)
    assert rows_changed.any() and not rows_changed.all()
    assert info.pre_norm.item() == pytest.approx(global_np(g.values()), rel=1e-6)
    assert info.post_norm.item() == pytest.approx(global_np(expected.values()), rel=1e-5)
    assert info.clipped.item() is True


def test_agc_needs_params_with_matching_names_and_shapes():
    grads = tree(np.random.default_rng(3))
    with pytest.raises(ValueError, match="params="):
        AGC()(grads)
    with pytest.raises(ValueError, match="linear.bias"):
        AGC()(grads, params={"linear": {"weight": grads["linear"]["weight"]}})
    bad = tree(np.random.default_rng(3))
    bad["gain"] = mx.zeros((2,))
    with pytest.raises(ValueError, match="shape"):
        AGC()(grads, params=bad)


# AutoClip ------------------------------------------------------------------

def test_autoclip_threshold_is_numpy_quantile_of_earlier_norms():
    rng = np.random.default_rng(4)
    history, quantile = 7, 0.8
    clipper = AutoClip(quantile=quantile, history=history)
    seen = []
    for step in range(20):
        grads = tree(rng, scale=float(rng.uniform(0.2, 3.0)))
        exact = global_np(flat_np(grads).values())
        clipped, info = clipper(grads)
        if not seen:
            assert math.isinf(info.threshold.item()) and info.scale.item() == 1.0
        else:
            threshold = float(np.quantile(seen[-history:], quantile))
            assert info.threshold.item() == pytest.approx(threshold, rel=1e-5), f"step {step}"
            coef = min(threshold / (exact + 1e-6), 1.0)
            assert info.scale.item() == pytest.approx(coef, rel=1e-5)
            got, before = flat_np(clipped), flat_np(grads)
            for name in got:
                np.testing.assert_allclose(got[name], before[name] * coef, rtol=1e-5, atol=1e-9)
        seen.append(exact)


@pytest.mark.parametrize("q", [0.0, 0.5, 0.9, 1.0])
def test_autoclip_quantile_edges(q):
    clipper = AutoClip(quantile=q, history=5)
    norms = [3.0, 1.0, 2.0]
    for norm in norms:
        clipper({"w": mx.array([norm])})
    _, info = clipper({"w": mx.array([0.5])})
    assert info.threshold.item() == pytest.approx(float(np.quantile(norms, q)))


# AdaGC ---------------------------------------------------------------------

def numpy_adagc(steps, beta, lambda_rel, lambda_abs, warmup):
    """Algorithm 1 of Wang et al. (2025) on lists of per-tensor arrays, float64."""
    gamma, out = None, []
    for t, tensors in enumerate(steps):
        norms = [np.linalg.norm(a.ravel()) for a in tensors]
        total = math.sqrt(sum(n * n for n in norms))
        if t < warmup:
            h = min(lambda_abs / (total + 1e-6), 1.0)
            clipped = [a * h for a in tensors]
            clipped_norms = [n * h for n in norms]
            gamma = clipped_norms if gamma is None else [min(g, c) for g, c in zip(gamma, clipped_norms)]
        else:
            hs = [min(lambda_rel * g / n, 1.0) for g, n in zip(gamma, norms)]
            clipped = [a * h for a, h in zip(tensors, hs)]
            gamma = [beta * g + (1 - beta) * n * h for g, n, h in zip(gamma, norms, hs)]
        out.append((clipped, list(gamma)))
    return out


def test_adagc_matches_numpy_loop():
    rng = np.random.default_rng(6)
    trees = []
    for t in range(14):
        grads = tree(rng, scale=0.3)
        if t == 9:
            grads["linear"]["weight"] = grads["linear"]["weight"] * 40.0  # one tensor spikes
        trees.append(grads)
    names = [n for n, _ in tree_flatten(trees[0])]
    reference = numpy_adagc([[flat_np(g)[n] for n in names] for g in trees],
                            beta=0.9, lambda_rel=1.05, lambda_abs=1.0, warmup=5)
    clipper = AdaGC(beta=0.9, lambda_rel=1.05, lambda_abs=1.0, warmup_steps=5)
    for t, (grads, (expected, gamma)) in enumerate(zip(trees, reference)):
        clipped, info = clipper(grads)
        got = flat_np(clipped)
        for name, want in zip(names, expected):
            np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-9,
                                       err_msg=f"step {t} {name}")
        for name, want in zip(names, gamma):
            assert clipper.state["gamma"][name].item() == pytest.approx(want, rel=1e-5)
        assert info.post_norm.item() == pytest.approx(global_np(expected), rel=1e-5)
    spike = flat_np(trees[9])["linear.weight"]
    assert np.linalg.norm(reference[9][0][names.index("linear.weight")]) < 0.1 * np.linalg.norm(spike)

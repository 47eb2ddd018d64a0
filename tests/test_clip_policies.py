"""Non-finite policies and bad input, for every clipper."""
from __future__ import annotations

import math

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from gradwatch.clip import (AGC, AdaGC, AutoClip, GlobalNorm, PerTensorNorm, ValueClip, ZClip,
                            global_norm, norms_and_global, tensor_norms)

FACTORIES = {
    "global_norm": lambda **kw: GlobalNorm(1.0, **kw),
    "value": lambda **kw: ValueClip(0.5, **kw),
    "per_tensor_norm": lambda **kw: PerTensorNorm(1.0, **kw),
    "agc": lambda **kw: AGC(**kw),
    "zclip": lambda **kw: ZClip(warmup_steps=2, **kw),
    "adagc": lambda **kw: AdaGC(warmup_steps=2, **kw),
    "autoclip": lambda **kw: AutoClip(history=3, **kw),
}
PARAMS = {"w": mx.ones((3, 2)), "b": mx.ones(3)}


def grads(seed, bad=None):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((3, 2)).astype(np.float32)
    if bad is not None:
        w[1, 0] = bad
    return {"w": mx.array(w), "b": mx.array(rng.standard_normal(3).astype(np.float32))}


def snapshot(state):
    return {name: np.array(value) for name, value in tree_flatten(state)}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("kind", list(FACTORIES))
def test_skip_gives_zero_gradients_and_leaves_state_alone(kind, bad):
    clipper, twin = FACTORIES[kind](nonfinite="skip"), FACTORIES[kind](nonfinite="skip")
    for seed in range(4):
        mx.eval(clipper(grads(seed), params=PARAMS), twin(grads(seed), params=PARAMS))
    before = snapshot(clipper.state)
    clipped, info = clipper(grads(9, bad=bad), params=PARAMS)
    mx.eval(clipped, info, clipper.state)
    for name, g in tree_flatten(clipped):
        assert np.all(np.array(g) == 0.0), name
    assert info.nonfinite.item() is True
    assert info.scale.item() == 0.0 and info.post_norm.item() == 0.0
    after = snapshot(clipper.state)
    assert after.keys() == before.keys()
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    # The next finite step is what it would have been had the bad step never happened.
    got, got_info = clipper(grads(10), params=PARAMS)
    want, want_info = twin(grads(10), params=PARAMS)
    for (name, x), (_, y) in zip(tree_flatten(got), tree_flatten(want)):
        np.testing.assert_array_equal(np.array(x), np.array(y), err_msg=name)
    assert got_info.nonfinite.item() is False


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_nonfinite_norms_never_poison_state_under_propagate(kind):
    clipper = FACTORIES[kind]()
    for seed in range(3):
        clipper(grads(seed), params=PARAMS)
    clipper(grads(3, bad=float("nan")), params=PARAMS)
    clipper(grads(4, bad=float("inf")), params=PARAMS)
    for name, value in snapshot(clipper.state).items():
        assert not np.isnan(value).any(), name


def test_propagate_is_what_mlx_does_with_nan():
    bad = grads(1, bad=float("nan"))
    got, info = GlobalNorm(1.0)(bad)
    want, norm = optim.clip_grad_norm(bad, 1.0)
    assert math.isnan(info.pre_norm.item()) and math.isnan(norm.item())
    for (name, x), (_, y) in zip(tree_flatten(got), tree_flatten(want)):
        assert mx.array_equal(x, y, equal_nan=True).item(), name
    assert info.nonfinite.item() is True


def test_raise_policy_stays_lazy_and_is_exposed():
    clipper = GlobalNorm(1.0, nonfinite="raise")
    assert clipper.nonfinite == "raise"
    clipped, info = clipper(grads(1, bad=float("inf")))  # no exception here: nothing was read
    assert info.nonfinite.item() is True
    assert clipper.config()["nonfinite"] == "raise"


# Bad input -----------------------------------------------------------------

EMPTY = [{}, [], {"a": {}}, {"a": []}]


@pytest.mark.parametrize("empty", EMPTY, ids=["dict", "list", "nested-dict", "nested-list"])
@pytest.mark.parametrize("kind", list(FACTORIES))
def test_empty_tree_is_refused(kind, empty):
    with pytest.raises(ValueError, match="empty"):
        FACTORIES[kind]()(empty, params=empty)


@pytest.mark.parametrize("leaf", [1.5, np.ones(3, np.float32), None, "x"],
                         ids=["float", "numpy", "none", "str"])
@pytest.mark.parametrize("kind", list(FACTORIES))
def test_non_array_leaf_is_refused_with_its_path(kind, leaf):
    tree = {"ok": mx.ones(3), "layers": [{"bad": leaf}]}
    with pytest.raises(TypeError, match=r"layers\.0\.bad"):
        FACTORIES[kind]()(tree, params=tree)


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_integer_only_tree_is_refused(kind):
    tree = {"a": mx.array([1, 2, 3]), "b": mx.array([True, False])}
    with pytest.raises(ValueError, match="floating-point"):
        FACTORIES[kind]()(tree, params=tree)


def test_norm_functions_refuse_bad_trees_too():
    for fn in (global_norm, tensor_norms, norms_and_global):
        with pytest.raises(ValueError):
            fn({})
        with pytest.raises(TypeError, match="'w'"):
            fn({"w": [1.0, 2.0]} | {"w": 3.0})
        with pytest.raises(ValueError):
            fn({"n": mx.array([1, 2])})


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), -float("inf"), "1.0", None,
                                   True])
def test_bad_thresholds_are_refused_at_construction(value):
    for make in (lambda v: GlobalNorm(v), lambda v: ValueClip(v), lambda v: PerTensorNorm(v),
                 lambda v: AGC(clipping=v), lambda v: AdaGC(lambda_abs=v),
                 lambda v: AdaGC(lambda_rel=v), lambda v: ZClip(z_thresh=v),
                 lambda v: AutoClip(quantile=v)):
        with pytest.raises(ValueError):
            make(value)


@pytest.mark.parametrize("make", [
    lambda: GlobalNorm(1.0, ord=0.5), lambda: GlobalNorm(1.0, ord="two"),
    lambda: GlobalNorm(1.0, ord=float("nan")), lambda: GlobalNorm(1.0, nonfinite="ignore"),
    lambda: AutoClip(quantile=1.5), lambda: AutoClip(history=0), lambda: AdaGC(beta=1.0),
    lambda: AdaGC(warmup_steps=0), lambda: ZClip(alpha=-0.1), lambda: ZClip(warmup_steps=-1),
    lambda: ZClip(clip_factor=0.0),
])
def test_other_bad_arguments_are_refused(make):
    with pytest.raises(ValueError):
        make()


def test_error_messages_name_the_argument_and_value():
    with pytest.raises(ValueError, match=r"max_norm must be >= 0, got -2"):
        GlobalNorm(-2)
    with pytest.raises(ValueError, match=r"clip_value must be finite, got inf"):
        ValueClip(float("inf"))

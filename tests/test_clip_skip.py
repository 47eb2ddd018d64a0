"""Skip-step: a skipped AdamW step leaves parameters and optimizer state bit-identical."""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from gradwatch.clip import GlobalNorm, apply_update


def snapshot(model, optimizer):
    mx.eval(model.parameters(), optimizer.state)
    return ({k: np.array(v) for k, v in tree_flatten(model.parameters())},
            {k: np.array(v) for k, v in tree_flatten(optimizer.state)})


def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def setup(seed=0):
    mx.random.seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = optim.AdamW(learning_rate=optim.cosine_decay(1e-2, 100), weight_decay=0.1)
    x = mx.random.normal((16, 4))
    y = mx.random.normal((16, 2))
    loss_and_grad = nn.value_and_grad(model, lambda m: ((m(x) - y) ** 2).mean())
    return model, optimizer, loss_and_grad


def test_zero_gradients_do_not_skip_an_adamw_step():
    """Why the helper exists: the bug of zeroing the gradients, shown on real AdamW."""
    model, optimizer, loss_and_grad = setup()
    _, grads = loss_and_grad(model)
    optimizer.update(model, grads)
    before = snapshot(model, optimizer)
    poisoned = {"layers": [{k: v * np.nan for k, v in layer.items()} if layer else layer
                           for layer in grads["layers"]]}
    zeros, info = GlobalNorm(1.0, nonfinite="skip")(poisoned)
    assert info.nonfinite.item()
    optimizer.update(model, zeros)
    after = snapshot(model, optimizer)
    assert not same(before[0], after[0]) and not same(before[1], after[1])


@pytest.mark.parametrize("first", [False, True])
def test_skipped_adamw_step_is_bit_identical(first):
    model, optimizer, loss_and_grad = setup()
    if not first:
        for _ in range(3):
            _, grads = loss_and_grad(model)
            apply_update(optimizer, model, grads, mx.array(False))
    before_params, before_state = snapshot(model, optimizer)
    _, grads = loss_and_grad(model)
    apply_update(optimizer, model, grads, mx.array(True))
    params, state = snapshot(model, optimizer)
    assert same(params, before_params)
    if first:  # the state was initialised by the helper: moments zero, step 0
        assert all(np.all(v == 0) for k, v in state.items() if k != "learning_rate")
    else:
        assert same(state, before_state)


def test_not_skipped_equals_plain_update():
    a, opt_a, lg_a = setup(1)
    b, opt_b, lg_b = setup(1)
    for i in range(4):
        _, ga = lg_a(a)
        apply_update(opt_a, a, ga, mx.array(i == 2))
        _, gb = lg_b(b)
        if i != 2:
            opt_b.update(b, gb)
        else:
            opt_b.init(gb)
    assert same(snapshot(a, opt_a)[0], snapshot(b, opt_b)[0])
    assert same(snapshot(a, opt_a)[1], snapshot(b, opt_b)[1])


def test_nonfinite_skip_policy_with_the_helper_compiled_equals_eager():
    def make():
        model, optimizer, loss_and_grad = setup(2)
        clipper = GlobalNorm(1.0, nonfinite="skip")
        return model, optimizer, loss_and_grad, clipper

    def step_fn(model, optimizer, loss_and_grad, clipper, poison):
        _, grads = loss_and_grad(model)
        grads = {"layers": [{k: v * poison for k, v in layer.items()} if layer else layer
                           for layer in grads["layers"]]}
        clipped, info = clipper(grads)
        apply_update(optimizer, model, clipped, info.nonfinite)
        return info.nonfinite

    eager = make()
    comp = make()
    comp_model, comp_opt = comp[0], comp[1]
    state = [comp_model.state, comp_opt.state]
    compiled = mx.compile(lambda p: step_fn(*comp, p), inputs=state, outputs=state)
    comp_opt.init(comp_model.trainable_parameters())
    eager[1].init(eager[0].trainable_parameters())
    poisons = [1.0, 1.0, float("nan"), 1.0, float("inf"), 1.0]
    for i, poison in enumerate(poisons):
        before = snapshot(eager[0], eager[1])
        flag_e = step_fn(*eager, mx.array(poison))
        flag_c = compiled(mx.array(poison))
        after_e = snapshot(eager[0], eager[1])
        after_c = snapshot(comp_model, comp_opt)
        assert flag_e.item() == flag_c.item() == (poison != 1.0)
        assert same(after_e[0], after_c[0]) and same(after_e[1], after_c[1]), i
        assert same(after_e[0], before[0]) == (poison != 1.0)
        if poison != 1.0:
            assert same(after_e[1], before[1])
        assert all(np.isfinite(v).all() for v in after_e[0].values())

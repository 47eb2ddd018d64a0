"""The compiled API: `compute()` inside the user's `mx.compile`d step, `record()` outside.

A real model and optimizer in a compiled step; the reference for each stored pre-clip norm is
MLX's own `clip_grad_norm` on the same gradients (computed eagerly by a twin model trained
here without gradwatch). Each misuse (step() inside compile, watch.state left out of the
inputs or outputs, record() before compute()) must raise `CompiledStepError` naming the fix."""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest

from gradwatch.agent import CompiledStepError, GradWatch
from gradwatch.clip import GlobalNorm
from tests.test_agent_unit import BIG_BYTES, _big_lazy, _peak_growth, f32, spooled_steps


def model_and_optimizer():
    mx.random.seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    mx.eval(model.parameters())
    return model, optim.SGD(learning_rate=0.1)


def loss_fn(model, x, y):
    return ((model(x) - y) ** 2).mean()


def batch(step: int):
    rng = np.random.default_rng(step)
    x = mx.array(rng.standard_normal((8, 4)).astype(np.float32))
    return x, x[:, :2] * 3


def compiled_step(watch, model, optimizer, inputs=True, outputs=True, use_step=False):
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    base = [model.state, optimizer.state]

    def train_step(x, y):
        loss, grads = loss_and_grad(model, x, y)
        if use_step:
            grads = watch.step(grads, loss)
        else:
            grads, _ = watch.compute(grads, loss, optimizer.learning_rate)
        optimizer.update(model, grads)
        return loss

    return mx.compile(train_step, inputs=base + ([watch.state] if inputs else []),
                      outputs=base + ([watch.state] if outputs else []))


def reference_norms(steps: int, max_norm: float) -> list[np.float32]:
    model, optimizer = model_and_optimizer()
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    norms = []
    for step in range(steps):
        _, grads = loss_and_grad(model, *batch(step))
        clipped, norm = optim.clip_grad_norm(grads, max_norm)
        optimizer.update(model, clipped)
        mx.eval(model.parameters(), optimizer.state)
        norms.append(np.float32(norm.item()))
    return norms


def test_record_without_argument_and_steps_that_survive_skipped_calls(tmp_path):
    model, optimizer = model_and_optimizer()
    watch = GradWatch("compiled", url=None, clipper=GlobalNorm(0.5), spool_dir=tmp_path, start_step=100)
    step_fn = compiled_step(watch, model, optimizer)
    losses = {}
    for step in range(12):
        losses[step] = step_fn(*batch(step))
        mx.eval(model.parameters(), optimizer.state)
        if step % 3 != 1:  # record() skipped on some steps: the others keep their numbers
            watch.record()
            watch.record()  # twice for one record: recorded once
    meta = watch._sender.meta
    watch.close()
    steps = spooled_steps(tmp_path)
    kept = [step for step in range(12) if step % 3 != 1]
    assert sorted(steps) == [100 + step for step in kept]
    norms = reference_norms(12, 0.5)
    assert [f32(steps[100 + step]["pre_norm"]) for step in kept] == [norms[step] for step in kept]
    assert [f32(steps[100 + step]["loss"]) for step in kept] == [f32(losses[step].item()) for step in kept]
    assert all(steps[100 + step]["lr"] == pytest.approx(0.1) for step in kept)  # compute(grads, loss, lr)
    assert meta["tensors"]["shapes"] == {"layers.0.weight": [8, 4], "layers.0.bias": [8],
                                         "layers.2.weight": [2, 8], "layers.2.bias": [2]}


def test_record_with_an_explicit_step_and_positional_loss_and_lr(tmp_path):
    watch = GradWatch("explicit", url=None, spool_dir=tmp_path, detectors=[])
    compiled = mx.compile(lambda grads: watch.compute(grads)[1], inputs=watch.state, outputs=watch.state)
    for step in (5, 9, 20):
        record = compiled({"w": mx.array([3.0, 4.0 + step])})
        mx.eval(record)
        watch.record(record, 0.25, 0.5, step=step)  # same order as compute: (grads|record, loss, lr)
    watch.close()
    steps = spooled_steps(tmp_path)
    assert sorted(steps) == [5, 9, 20]
    assert all(steps[s]["loss"] == 0.25 and steps[s]["lr"] == 0.5 for s in steps)
    assert [f32(steps[s]["pre_norm"]) for s in (5, 9, 20)] == [
        np.float32(np.sqrt(np.float32(9.0) + np.float32((4.0 + s) ** 2))) for s in (5, 9, 20)]


def test_record_never_forces_an_array_loss(tmp_path):
    """An `mx.array` loss given to record() is read one step late, after the user's eval,
    never forced by the call (a sync)."""
    watch = GradWatch("lazy-loss", url=None, spool_dir=tmp_path, detectors=[])
    compiled = mx.compile(lambda grads: watch.compute(grads)[0], inputs=watch.state, outputs=watch.state)
    grads = {"w": mx.ones((8,))}
    for seed in range(3):
        mx.eval(compiled(grads))
        loss = _big_lazy(seed).sum()  # lazy: evaluating it allocates BIG_BYTES
        assert _peak_growth(lambda: watch.record(loss=loss)) < BIG_BYTES / 4
        mx.eval(loss)
    watch.close()
    assert len(spooled_steps(tmp_path)) == 3


def test_step_inside_compile_raises_and_says_what_to_do(tmp_path):
    model, optimizer = model_and_optimizer()
    watch = GradWatch("step-inside", url=None, clipper=GlobalNorm(0.5), spool_dir=tmp_path)
    step_fn = compiled_step(watch, model, optimizer, use_step=True)
    with pytest.raises(CompiledStepError, match=r"step\(\).*inside mx.compile.*watch.compute"):
        step_fn(*batch(0))
    watch.close()


def test_step_inside_a_compile_without_watch_state_raises_by_flush(tmp_path):
    """Without watch.state in the compile, the first trace cannot tell; a retrace (here the
    optimizer's state appearing) or, at the latest, flush() does."""
    model, optimizer = model_and_optimizer()
    watch = GradWatch("step-inside-2", url=None, clipper=GlobalNorm(0.5), spool_dir=tmp_path)
    step_fn = compiled_step(watch, model, optimizer, inputs=False, outputs=False, use_step=True)
    with pytest.raises(CompiledStepError, match=r"step\(\).*inside mx.compile"):
        for step in range(3):
            step_fn(*batch(step))
            mx.eval(model.parameters(), optimizer.state)
        watch.flush(timeout=5)
    try:
        watch.close()
    except CompiledStepError:
        pass


def test_step_inside_a_compile_that_never_retraces_raises_at_flush(tmp_path):
    model, optimizer = model_and_optimizer()
    optimizer.init(model.trainable_parameters())
    watch = GradWatch("step-inside-3", url=None, clipper=GlobalNorm(0.5), spool_dir=tmp_path)
    step_fn = compiled_step(watch, model, optimizer, inputs=False, outputs=False, use_step=True)
    step_fn(*batch(0))
    mx.eval(model.parameters(), optimizer.state)
    with pytest.raises(CompiledStepError, match=r"step\(\).*inside mx.compile"):
        watch.flush(timeout=5)
    watch.close()


@pytest.mark.parametrize("inputs,outputs,named", [(False, True, "inputs"), (True, False, "outputs"),
                                                  (False, False, "outputs")])
def test_watch_state_left_out_of_the_compile_is_named(tmp_path, inputs, outputs, named):
    """(Left out of both with an optimizer that initialises in the first step, MLX's own
    error at the second eval comes first: the optimizer is initialised here.)"""
    model, optimizer = model_and_optimizer()
    optimizer.init(model.trainable_parameters())
    watch = GradWatch("forgot", url=None, clipper=GlobalNorm(0.5), spool_dir=tmp_path)
    step_fn = compiled_step(watch, model, optimizer, inputs=inputs, outputs=outputs)
    with pytest.raises(CompiledStepError, match=rf"watch.state is not among the {named} of your mx.compile"):
        for step in range(4):
            step_fn(*batch(step))
            mx.eval(model.parameters(), optimizer.state)
            watch.record()
    try:
        watch.close()
    except CompiledStepError:
        pass


def test_record_before_any_compute_says_so(tmp_path):
    watch = GradWatch("early", url=None, spool_dir=tmp_path)
    with pytest.raises(CompiledStepError, match=r"watch.compute"):
        watch.record()
    watch.close()


def test_eager_step_fills_the_tensor_shapes_too(tmp_path):
    watch = GradWatch("shapes", url=None, spool_dir=tmp_path)
    mx.eval(watch.step({"a": mx.ones((2, 3)), "b": [mx.ones((4,))]}))
    assert watch._sender.meta["tensors"] == {"names": ["a", "b.0"], "shapes": {"a": [2, 3], "b.0": [4]}}
    watch.close()


def test_the_compiled_example_streams_to_the_server_named_by_gradwatch_url(tmp_path):
    """examples/train_compiled.py with no --url: GRADWATCH_URL names the server."""
    import json
    import os
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path

    from tests.procs import ServerProcess

    root = Path(__file__).resolve().parent.parent
    with ServerProcess(f"sqlite:///{tmp_path / 'db.sqlite'}") as server:
        env = {**os.environ, "GRADWATCH_URL": server.url}
        env.pop("GRADWATCH_TOKEN", None)
        done = subprocess.run([sys.executable, str(root / "examples" / "train_compiled.py"), "--steps", "30"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr
        with urllib.request.urlopen(f"{server.url}/api/runs/compiled-mlp/series?points=1000", timeout=30) as answer:
            series = json.loads(answer.read())
    assert series["step"] == list(range(30))


def test_url_not_given_reads_the_environment_and_url_none_does_not(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADWATCH_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("GRADWATCH_TOKEN", "secret")
    from_env = GradWatch("env", spool_dir=tmp_path / "a")
    spool_only = GradWatch("none", url=None, spool_dir=tmp_path / "b")
    try:
        assert from_env.url == "http://127.0.0.1:9" and from_env._sender.transport is not None
        assert from_env._sender.transport.token == "secret"
        assert spool_only.url is None and spool_only._sender.transport is None
    finally:
        from_env.close(timeout=1)
        spool_only.close(timeout=1)

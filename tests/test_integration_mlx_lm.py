"""gradwatch attached to mlx-lm's own trainer (`mlx_lm.tuner.trainer.train`, its compiled
step untouched), on a tiny random-weight llama built from a config (no download), streaming
to a real `gradwatch serve`.

The reference is independent of gradwatch: the same initial weights and the same batches
trained by an eager hand loop that accumulates like the trainer and clips with MLX's own
`mlx.optimizers.clip_grad_norm`; its norms are what each stored pre-clip norm must be
(compiled vs eager float32: a relative 1e-4), and its final weights what the watched,
clipped run must end with."""
from __future__ import annotations

import json
import urllib.request

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from gradwatch.agent import GradWatch
from gradwatch.agent.integrations import mlx_lm as gradwatch_mlx_lm
from gradwatch.clip import GlobalNorm
from tests.procs import ServerProcess

from mlx_lm.models import llama  # noqa: E402  (mlx-lm is in the dev extra: this test never skips)
from mlx_lm.tuner import trainer  # noqa: E402

MAX_NORM = 1.0
LR = 1e-2


def tiny_llama(seed: int = 0) -> nn.Module:
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs(
        model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=64))
    mx.eval(model.parameters())
    return model


def dataset(count: int = 16, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)  # (tokens, offset) pairs, as mlx-lm's datasets give
    return [(rng.integers(1, 64, size=int(rng.integers(8, 24))).tolist(), 0) for _ in range(count)]


def get(url: str):
    with urllib.request.urlopen(url, timeout=30) as answer:
        return json.loads(answer.read())


def reference(batches: list, accumulation: int, initial: dict) -> tuple[list[float], dict]:
    """The same training, eager, with MLX's clip_grad_norm: norms of each update, final weights."""
    model = tiny_llama()
    model.update(initial)
    optimizer = optim.Adam(learning_rate=LR)
    loss_and_grad = nn.value_and_grad(model, trainer.default_loss)
    norms, accumulated = [], None
    for it, batch in enumerate(batches, start=1):
        (_, _), grads = loss_and_grad(model, *batch)
        if accumulated is not None:
            grads = tree_map(lambda x, y: x + y, grads, accumulated)
        if it % accumulation == 0:
            if accumulation > 1:
                grads = tree_map(lambda x: x / accumulation, grads)
            clipped, norm = optim.clip_grad_norm(grads, MAX_NORM)
            optimizer.update(model, clipped)
            mx.eval(model.parameters(), optimizer.state)
            norms.append(norm.item())
            accumulated = None
        else:
            accumulated = grads
            mx.eval(accumulated)
    return norms, dict(tree_flatten(model.parameters()))


@pytest.mark.parametrize("accumulation,iters", [(1, 5), (2, 8)])
def test_mlx_lm_train_is_watched_and_clipped_with_one_record_per_update(tmp_path, accumulation, iters):
    model = tiny_llama()
    initial = tree_map(lambda x: mx.array(x), model.parameters())
    batches = []

    def recording_batches(*args, **kwargs):  # the trainer's batches, kept for the reference
        for batch in trainer.iterate_batches(*args, **kwargs):
            if kwargs.get("loop"):  # the training batches (evaluate() asks without loop)
                batches.append(batch)
            yield batch

    args = trainer.TrainingArgs(batch_size=4, iters=iters, steps_per_report=3, steps_per_eval=4,
                                steps_per_save=10**6, val_batches=1, grad_accumulation_steps=accumulation,
                                adapter_file=str(tmp_path / "adapters.safetensors"))
    optimizer = optim.Adam(learning_rate=LR)
    run = f"mlx-lm-accum{accumulation}"
    with ServerProcess(f"sqlite:///{tmp_path / 'db.sqlite'}") as server:
        with GradWatch(run, url=server.url, clipper=GlobalNorm(MAX_NORM), spool_dir=tmp_path / "spool") as watch:
            gradwatch_mlx_lm.train(model, optimizer, dataset(), dataset(8, seed=1), args=args, watch=watch,
                                   iterate_batches=recording_batches)
            assert watch.flush(timeout=60)
        series = get(f"{server.url}/api/runs/{run}/series?points=100000&fields=pre_norm,threshold,clipped,lr")
    assert "update" not in vars(optimizer) and "gradwatch" not in optimizer.state  # detached

    updates = iters // accumulation
    assert len(batches) == iters
    norms, final = reference(batches, accumulation, initial)
    assert series["step"] == list(range(updates))  # exactly one record per optimizer update
    np.testing.assert_allclose(series["pre_norm"], norms, rtol=1e-4)
    assert series["threshold"] == [MAX_NORM] * updates
    assert series["clipped"] == [norm > MAX_NORM for norm in norms]
    assert any(series["clipped"]) and series["lr"] == [pytest.approx(LR)] * updates
    # The clipped gradients are what the trainer's optimizer applied.
    watched = dict(tree_flatten(model.parameters()))
    for name, value in final.items():
        np.testing.assert_allclose(np.array(watched[name]), np.array(value), rtol=1e-3, atol=1e-5, err_msg=name)

"""A compiled MLX training step watched by gradwatch: `compute()` inside, `record()` outside.

    python examples/train_compiled.py [--url http://127.0.0.1:8765] [--steps 200]

Three rules (gradwatch raises `CompiledStepError` naming the one you broke):
1. inside the compiled function call `grads, record = watch.compute(grads, loss, lr)`,
   never `watch.step()` (a compiled function runs its Python only while tracing);
2. put `watch.state` among the compile's inputs AND outputs, next to the model's and the
   optimizer's state: it holds the clipper's and detectors' state, the step counter and
   the last record;
3. after your `mx.eval`, call `watch.record()`: it takes the record from `watch.state`;
   each record carries its step number, so skipping a call loses that step, never
   renumbers the others. Nothing is evaluated by gradwatch: your eval computes the record.
"""
from __future__ import annotations

import argparse
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from gradwatch.agent import GradWatch
from gradwatch.clip import GlobalNorm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="gradwatch server (default: GRADWATCH_URL, else spool only)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--run", default="compiled-mlp")
    options = parser.parse_args()

    mx.random.seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 1))
    optimizer = optim.AdamW(learning_rate=1e-3)
    loss_and_grad = nn.value_and_grad(model, lambda m, x, y: nn.losses.mse_loss(m(x), y))
    url = {"url": options.url} if options.url else {}  # not given: GRADWATCH_URL when set

    with GradWatch(options.run, clipper=GlobalNorm(1.0), **url) as watch:
        state = [model.state, optimizer.state, watch.state]  # rule 2

        @partial(mx.compile, inputs=state, outputs=state)
        def train_step(x, y):
            loss, grads = loss_and_grad(model, x, y)
            grads, _ = watch.compute(grads, loss, optimizer.learning_rate)  # rule 1: clipped, lazy
            optimizer.update(model, grads)
            return loss

        rng = np.random.default_rng(0)
        w_true = rng.standard_normal((16, 1)).astype(np.float32)
        for step in range(options.steps):
            x = rng.standard_normal((32, 16)).astype(np.float32)
            loss = train_step(mx.array(x), mx.array(x @ w_true))
            mx.eval(model.parameters(), optimizer.state, loss)
            watch.record()  # rule 3
            if step % 50 == 0:
                print(f"step {step}: loss {loss.item():.4f}")
        result = watch.flush(timeout=10)
        print(f"recorded {watch.stats.recorded} steps; flush: {result}")


if __name__ == "__main__":
    main()

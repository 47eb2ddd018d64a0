"""A complete MLX training loop with gradwatch attached: a tiny MLP, seconds on a CPU.

    gradwatch serve &                                   # the server and dashboard
    python examples/train_mlp.py --url http://127.0.0.1:8765 --steps 500 --run mlp
    python examples/train_mlp.py --steps 500            # no server: spool only, then
    gradwatch push gradwatch-spool/mlp                  # upload it later

The two gradwatch lines are marked below.
"""
from __future__ import annotations

import argparse
import sys

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from gradwatch.agent import GradWatch
from gradwatch.clip import GlobalNorm


class MLP(nn.Module):
    def __init__(self, features: int = 8, hidden: int = 32, classes: int = 4):
        super().__init__()
        self.hidden = nn.Linear(features, hidden)
        self.out = nn.Linear(hidden, classes)

    def __call__(self, x: mx.array) -> mx.array:
        return self.out(nn.relu(self.hidden(x)))


def batches(steps: int, batch: int = 32, features: int = 8, classes: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, 2.0, size=(classes, features)).astype(np.float32)
    for _ in range(steps):
        labels = rng.integers(0, classes, size=batch)
        inputs = centers[labels] + rng.normal(size=(batch, features)).astype(np.float32)
        yield mx.array(inputs), mx.array(labels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="gradwatch server, e.g. http://127.0.0.1:8765 "
                                                    "(default: write the spool only)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--run", default="mlp")
    parser.add_argument("--token", default=None, help="write token of the server")
    args = parser.parse_args(argv)

    mx.random.seed(0)
    model = MLP()
    optimizer = optim.Adam(learning_rate=1e-2)
    loss_and_grad = nn.value_and_grad(model, lambda m, x, y: nn.losses.cross_entropy(m(x), y, reduction="mean"))

    with GradWatch(args.run, url=args.url, clipper=GlobalNorm(1.0), token=args.token,       # gradwatch
                   config={"model": "MLP 8-32-4", "optimizer": "Adam", "lr": 1e-2}) as watch:
        for step, (x, y) in enumerate(batches(args.steps)):
            loss, grads = loss_and_grad(model, x, y)
            grads = watch.step(grads, loss=loss, lr=optimizer.learning_rate)                 # gradwatch
            optimizer.update(model, grads)
            mx.eval(model.parameters(), optimizer.state)
            if step % 100 == 0 or step == args.steps - 1:
                print(f"step {step:5d}  loss {loss.item():.4f}")
    stats = watch.stats
    print(f"gradwatch: {stats.recorded} steps recorded, {stats.acked} acknowledged by the server, "
          f"{stats.spooled} spooled, {stats.dropped_total} dropped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

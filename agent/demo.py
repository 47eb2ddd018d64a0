"""The demo training run behind `gradwatch demo`.

A tiny MLP learns to classify synthetic Gaussian clusters (a few thousand
parameters, seconds on a CPU) with gradwatch attached and clipping at 1.0.
A few deliberately corrupted batches (inputs blown up, labels shuffled) make
gradient spikes, so the dashboard has clip events and spikes to show.

    python -m gradwatch.agent.demo --url http://127.0.0.1:8765 --steps 2000 --run demo
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np

try:
    from gradwatch.clip import GlobalNorm  # first: says what MLX lacks

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    from gradwatch.agent import GradWatch
except ImportError as error:
    sys.exit(f"gradwatch demo: {error}")

FEATURES = 16
CLASSES = 8
BATCH = 64
# Overlapping clusters keep the task from being solved outright, so the gradient
# norm settles around 0.7 the way a real run's settles, instead of collapsing to 0.
CENTER_SPREAD = 0.6


class MLP(nn.Module):
    def __init__(self, hidden: int = 64):
        super().__init__()
        self.layers = [nn.Linear(FEATURES, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, CLASSES)]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers[:-1]:
            x = nn.relu(layer(x))
        return self.layers[-1](x)


DETECTOR_WARMUP = 100


def spike_steps(steps: int) -> set[int]:
    """Steps whose batch is corrupted: spread over the part of the run after the detectors'
    warm-up (runs shorter than the warm-up get them anyway, undetected)."""
    start = min(DETECTOR_WARMUP, steps // 2)
    return {start + int((steps - start) * fraction) for fraction in (0.2, 0.45, 0.7, 0.9)}


def synthetic_batches(steps: int, seed: int = 0):
    """Yields (x, y, corrupted) for each step; corrupted batches have inputs scaled by 40
    and shuffled labels, the kind of bad shard that makes a real run spike."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, CENTER_SPREAD, size=(CLASSES, FEATURES)).astype(np.float32)
    corrupt = spike_steps(steps)
    for step in range(steps):
        labels = rng.integers(0, CLASSES, size=BATCH)
        inputs = centers[labels] + rng.normal(0.0, 1.0, size=(BATCH, FEATURES)).astype(np.float32)
        if step in corrupt:
            inputs *= 40.0
            labels = rng.permutation(labels)
        yield mx.array(inputs), mx.array(labels), step in corrupt


def learning_rate(step: int, steps: int, peak: float = 3e-3, warmup: int = 50) -> float:
    """Linear warm-up then cosine decay, as most recipes do."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


class ProgressBar:
    """Progress on stderr from step 0: on a terminal one line redrawn at most ten times a second,
    elsewhere (a pipe, a log file) a line at step 0 and at every tenth of the run. Until the first
    steps are done it says why they are slow (MLX compiles its kernels on first use)."""

    def __init__(self, total: int, width: int = 30):
        self.total, self.width = total, width
        self.started = time.monotonic()
        self.last_draw = 0.0
        self.next_line = 0
        self.enabled = sys.stderr.isatty()

    def update(self, done: int, loss: float | None = None, force: bool = False, note: str = "") -> None:
        now = time.monotonic()
        if self.enabled and not force and now - self.last_draw < 0.1:
            return
        if not self.enabled and not force and done < self.next_line:
            return
        self.last_draw = now
        self.next_line = done + max(1, self.total // 10)
        filled = int(self.width * done / self.total)
        text = f"  training [{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} steps"
        if done:
            rate = done / max(now - self.started, 1e-9)
            text += f"  {rate:,.0f} steps/s" if rate >= 10 else f"  {rate:.1f} steps/s"
        if loss is not None:
            text += f"  loss {loss:.3f}"
        text += f"  {note}" if note else ""
        if self.enabled:
            sys.stderr.write("\r" + text + "\033[K")
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def finish(self, loss: float | None) -> None:
        self.update(self.total, loss, force=True)
        if self.enabled:
            sys.stderr.write("\n")


def kernels_cold() -> bool:
    """True when MLX's CPU kernel cache (`$TMPDIR/mlx/<version>/cpu`, Linux) is still empty."""
    import os
    import tempfile

    if sys.platform == "darwin":
        return False
    cache = os.path.join(tempfile.gettempdir(), "mlx", mx.__version__, "cpu")
    return not (os.path.isdir(cache) and os.listdir(cache))


def train(run: str, url: str | None, steps: int, token: str | None = None, seed: int = 0) -> None:
    mx.random.seed(seed)
    model = MLP()
    optimizer = optim.AdamW(learning_rate=learning_rate(0, steps), weight_decay=0.01)
    loss_and_grad = nn.value_and_grad(model, lambda m, x, y: nn.losses.cross_entropy(m(x), y, reduction="mean"))
    progress = ProgressBar(steps)
    loss = None
    config = {"model": "MLP 16-64-64-8", "optimizer": "AdamW", "batch": BATCH, "steps": steps,
              "corrupted_steps": sorted(spike_steps(steps))}
    # The library's default detector (RobustDetector: median/MAD of the log norm).
    with GradWatch(run=run, url=url, token=token, clipper=GlobalNorm(1.0), config=config) as watch:
        progress.update(0, force=True, note="(compiling MLX's kernels first: once)" if kernels_cold() else "")
        for step, (inputs, labels, _) in enumerate(synthetic_batches(steps, seed)):
            lr = learning_rate(step, steps)
            optimizer.learning_rate = lr
            loss, grads = loss_and_grad(model, inputs, labels)
            grads = watch.step(grads, loss=loss, lr=lr)
            optimizer.update(model, grads)
            mx.eval(model.parameters(), optimizer.state, loss)
            if step % 25 == 0:
                progress.update(step + 1, loss.item(), force=step == 0)
        progress.finish(loss.item() if loss is not None else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="gradwatch server (default: spool only)")
    parser.add_argument("--token", default=None, help="write token")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--run", default="demo")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train(args.run, args.url, args.steps, args.token, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())

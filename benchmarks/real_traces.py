"""Clean gradient-norm traces from tiny MLX models trained here (the "real traces" of issue 21).

    python benchmarks/real_traces.py            # load benchmarks/data/real_traces.npz (train when missing)
    python benchmarks/real_traces.py --retrain  # train every trace again and rewrite the cache (~1-2 min)
    python benchmarks/real_traces.py --heldout [--retrain]   # the held-out traces (HELDOUT_SPECS)

Each trace is the pre-clip global gradient norm of every step of an unclipped
training run (no spikes injected here: ``benchmarks/spike_recall.py`` injects
them into what a watch would see). Models are tiny (an MLP classifier of ~7k
parameters on a noisy teacher task, a 2-layer transformer of ~27k parameters
on an order-2 Markov token source), every run has linear warm-up then cosine
decay, and the optimizers are SGD with momentum, AdamW and Lion. Two runs
carry a *genuine* change (``change`` > 0): a learning-rate instability (the
learning rate jumps 20x and stays there) and a batch-size change (128 -> 8:
a noisier gradient, a norm level about 2-3x higher). The cache holds float32
norms (tens of kilobytes); training is seeded, so ``--retrain`` regenerates
traces of the same kind (MLX's CPU kernels are not bit-reproducible across
machines, the cache is what the tables were measured on).

Held-out traces (``HELDOUT_SPECS``, cached in benchmarks/data/real_traces_heldout.npz,
names prefixed "ho-"): cases the spike rule's defaults were *not* tuned on, differing
from SPECS in seed and in kind: batch sizes 2, 8 and 64, higher and lower learning
rates, SGD without momentum, AdamW on the transformer at batch 4, Lion at batch 8,
AdamW on the regression, and two more genuine changes (a batch-size change 64 -> 4
under AdamW at step 1100: a norm level ~3.5x higher; a learning rate that jumps 1.6x
and stays on the regression at step 1300: a slow divergence, the norm ~2x higher 300
steps later and ~7x by the end). Training them takes about 1 minute.
``spike_recall.py --heldout`` measures the rule on them.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

CACHE = Path(__file__).resolve().parent / "data" / "real_traces.npz"
HELDOUT_CACHE = CACHE.with_name("real_traces_heldout.npz")


@dataclass(frozen=True)
class TraceSpec:
    name: str
    model: str          # "mlp", "gpt" or "mse"
    optimizer: str      # "sgd", "adam", "lion"
    steps: int
    lr: float
    batch: int = 32
    change: int = 0     # step of a genuine change (0: none)
    change_kind: str = ""
    seed: int = 0
    momentum: float = 0.9   # SGD only

SPECS = (
    TraceSpec("mlp-sgd", "mlp", "sgd", 2500, 0.05, seed=1),
    TraceSpec("mlp-adam", "mlp", "adam", 2500, 3e-3, seed=2),
    TraceSpec("mlp-lion", "mlp", "lion", 2500, 3e-4, seed=3),
    TraceSpec("mlp-adam-batch4", "mlp", "adam", 2500, 3e-3, batch=4, seed=9),     # noisy: log scale ~0.3
    TraceSpec("mlp-lion-batch4", "mlp", "lion", 2500, 3e-4, batch=4, seed=10),
    TraceSpec("mlp-sgd-batch4", "mlp", "sgd", 2500, 0.02, batch=4, seed=11),
    TraceSpec("gpt-adam", "gpt", "adam", 1500, 3e-3, batch=16, seed=4),
    TraceSpec("gpt-lion", "gpt", "lion", 1500, 3e-4, batch=16, seed=5),
    TraceSpec("gpt-sgd", "gpt", "sgd", 1500, 0.3, batch=16, seed=8),
    # past the edge of stability for 150 steps: the norm climbs ~2.5x and settles ~2x higher
    TraceSpec("mse-sgd-lr-instability", "mse", "sgd", 2500, 0.05, change=1400, change_kind="lr x1.5 for 150",
              seed=6),
    TraceSpec("mlp-sgd-batch-change", "mlp", "sgd", 2500, 0.05, batch=128, change=1400,
              change_kind="batch 128 -> 8", seed=7),
)

# Held out: not used to tune the rule's defaults; other seeds and other kinds than SPECS.
HELDOUT_SPECS = (
    TraceSpec("ho-mlp-sgd-batch2", "mlp", "sgd", 2000, 0.01, batch=2, seed=21),
    TraceSpec("ho-mlp-sgd-nomomentum", "mlp", "sgd", 2000, 0.3, seed=22, momentum=0.0),
    TraceSpec("ho-mlp-adam-batch8-lr-high", "mlp", "adam", 2000, 1e-2, batch=8, seed=23),
    TraceSpec("ho-mlp-adam-batch64-lr-low", "mlp", "adam", 2000, 3e-4, batch=64, seed=24),
    TraceSpec("ho-mlp-lion-batch8", "mlp", "lion", 2000, 3e-4, batch=8, seed=25),
    TraceSpec("ho-gpt-adam-batch4", "gpt", "adam", 1500, 3e-3, batch=4, seed=26),
    TraceSpec("ho-gpt-lion-batch8-lr-high", "gpt", "lion", 1500, 1e-3, batch=8, seed=27),
    TraceSpec("ho-mse-adam-batch8", "mse", "adam", 2000, 1e-3, batch=8, seed=28),
    TraceSpec("ho-mlp-adam-batch-change", "mlp", "adam", 2200, 3e-3, batch=64, change=1100,
              change_kind="batch 64 -> 4", seed=29),
    # the learning rate jumps 1.6x and stays, past the edge of stability: the norm climbs ~2x in the
    # 300 steps after the jump and ~7x by the end (a slow divergence, not a step)
    TraceSpec("ho-mse-sgd-lr-jump", "mse", "sgd", 2200, 0.04, change=1300, change_kind="lr x1.6 for 10000",
              seed=30),
)

def _train(spec: TraceSpec) -> np.ndarray:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    from mlx.utils import tree_flatten

    def global_norm(grads):
        return mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for _, g in tree_flatten(grads)))

    mx.random.seed(spec.seed)
    rng = np.random.default_rng(spec.seed)
    if spec.model == "mse":   # a tanh MLP regression (the edge-of-stability run)
        dim = 32
        target = rng.standard_normal((dim, 1))

        def batch_of(size: int):
            x = rng.standard_normal((size, dim)).astype(np.float32)
            y = (np.sin(x @ target) + 0.3 * rng.standard_normal((size, 1))).astype(np.float32)
            return mx.array(x), mx.array(y)

        model = nn.Sequential(nn.Linear(dim, 64), nn.Tanh(), nn.Linear(64, 1))

        def loss_fn(m, x, y):
            return ((m(x) - y) ** 2).mean()
    elif spec.model == "mlp":
        dim, classes = 32, 8
        teacher = [rng.standard_normal((dim, 32)) / np.sqrt(dim), rng.standard_normal((32, classes)) / np.sqrt(32)]

        def batch_of(size: int):
            x = rng.standard_normal((size, dim)).astype(np.float32)
            logits = np.tanh(x @ teacher[0]) @ teacher[1] * 3.0
            y = logits.argmax(axis=1)
            noisy = rng.random(size) < 0.15          # label noise: the loss never reaches 0
            y[noisy] = rng.integers(0, classes, noisy.sum())
            return mx.array(x), mx.array(y.astype(np.int32))

        model = nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, classes))

        def loss_fn(m, x, y):
            return nn.losses.cross_entropy(m(x), y, reduction="mean")
    else:
        from benchmarks.tau_quality import CTX, Markov2, TinyGPT, lm_loss
        chain = Markov2(spec.seed)
        model = TinyGPT()

        def batch_of(size: int):
            tokens = mx.array(chain.sample(rng, size))
            return tokens, None

        def loss_fn(m, x, _y):
            return lm_loss(m, x)
        del CTX
    mx.eval(model.parameters())
    warm = max(1, spec.steps // 20)
    decay = optim.cosine_decay(spec.lr, spec.steps - warm, spec.lr * 0.05)
    if spec.model == "mse":   # warm-up, then constant: the instability is the LR change, not the decay
        decay = lambda _step: mx.array(spec.lr)   # noqa: E731
    base = optim.join_schedules([optim.linear_schedule(spec.lr / warm, spec.lr, warm), decay], [warm])
    if spec.change and spec.change_kind.startswith("lr"):
        words = spec.change_kind.split()
        factor, span = float(words[1][1:]), int(words[3])

        def lr_at(step):   # the instability: `span` steps from `change` at `factor` times the schedule
            return base(step) * mx.where((step >= spec.change) & (step < spec.change + span), factor, 1.0)
    else:
        lr_at = base
    if spec.optimizer == "sgd":
        optimizer = optim.SGD(learning_rate=lr_at, momentum=spec.momentum)
    elif spec.optimizer == "adam":
        optimizer = optim.AdamW(learning_rate=lr_at, weight_decay=0.01)
    else:
        optimizer = optim.Lion(learning_rate=lr_at, weight_decay=0.01)
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    norms = np.empty(spec.steps, np.float64)
    for step in range(spec.steps):
        size = spec.batch
        if spec.change and spec.change_kind.startswith("batch") and step >= spec.change:
            size = int(spec.change_kind.split()[-1])   # "batch 128 -> 8": 8
        x, y = batch_of(size)
        _, grads = loss_and_grad(model, x, y)
        norm = global_norm(grads)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, norm)
        norms[step] = norm.item()
    return norms


def train_all(verbose: bool = True, heldout: bool = False) -> dict[str, np.ndarray]:
    specs, cache = (HELDOUT_SPECS, HELDOUT_CACHE) if heldout else (SPECS, CACHE)
    traces = {}
    total = time.perf_counter()
    for spec in specs:
        started = time.perf_counter()
        traces[spec.name] = _train(spec)
        if verbose:
            print(f"  {spec.name}: {spec.steps} steps in {time.perf_counter() - started:.1f}s", flush=True)
    if verbose:
        print(f"  trained {len(specs)} traces in {time.perf_counter() - total:.1f}s", flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(cache, **{name: v.astype(np.float32) for name, v in traces.items()})
    return load(heldout=heldout)


def load(retrain: bool = False, heldout: bool = False) -> dict[str, np.ndarray]:
    """{trace name: float64 norms}, from the cache (trained and cached when missing);
    ``heldout``: the held-out traces (HELDOUT_SPECS) instead of SPECS."""
    specs, cache = (HELDOUT_SPECS, HELDOUT_CACHE) if heldout else (SPECS, CACHE)
    if retrain or not cache.exists():
        return train_all(heldout=heldout)
    with np.load(cache) as data:
        return {spec.name: data[spec.name].astype(np.float64) for spec in specs if spec.name in data}


def spec_of(name: str) -> TraceSpec:
    """The spec of a trace of SPECS or of HELDOUT_SPECS."""
    return next(s for s in SPECS + HELDOUT_SPECS if s.name == name)


def describe(traces: dict[str, np.ndarray]) -> None:
    print(f"{'trace':<26}{'steps':>6}{'median':>10}{'log MAD·1.48':>14}{'q90/MAD':>9}  change")
    for name, norms in traces.items():
        spec = spec_of(name)
        logs = np.log(norms)
        # local noise: deviations from a centred 51-step rolling median
        from numpy.lib.stride_tricks import sliding_window_view
        rolled = np.median(sliding_window_view(np.pad(logs, 25, mode="edge"), 51), axis=1)
        dev = np.abs(logs - rolled)[100:]
        mad = np.median(dev)
        print(f"{name:<26}{len(norms):>6}{np.median(norms):>10.4g}{1.4826 * mad:>14.3f}"
              f"{np.quantile(dev, 0.9) / mad:>9.2f}  {spec.change_kind or '-'}"
              f"{' at ' + str(spec.change) if spec.change else ''}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--heldout", action="store_true", help="the held-out traces (HELDOUT_SPECS)")
    args = parser.parse_args()
    describe(load(args.retrain, heldout=args.heldout))

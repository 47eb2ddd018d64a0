"""What the agent costs the training loop.

    python benchmarks/agent_bench.py

1. Overhead: `watch.step(grads)` + `mx.eval` against bare
   `mlx.optimizers.clip_grad_norm` + `mx.eval` on the same gradient tree
   (64 float32 tensors, 1,048,576 parameters), interleaved in rounds in one
   process, with a `gradwatch serve` child process receiving the stream,
   per-tensor norms and both detectors on. Goal: median ratio <= 1.10.
2. The training thread while the server is down: p50/p99/max time of the
   `step()` call alone (what blocks the loop), same tree. Goal: p99 <= 1 ms.
   For scale, the time to build MLX's own `clip_grad_norm` graph on the same
   tree is measured interleaved (on a CPU, most of `step()` is MLX graph
   construction: the compiled call with 64 gradient inputs and outputs).
1b. The same with an LLM's layout: 300 tensors of 64x64 (1,228,800
   parameters), per-tensor norms and the default detectors on, against
   eager `clip_grad_norm`. Goal: median ratio <= 1.10.
3. Memory with the server down for 1,000,000 steps and a spool cap: RSS at
   checkpoints and tracemalloc over the last 100,000 steps. The MLX math
   of a step costs ~0.3 ms on a CPU, so these steps go through
   `watch.record()` with a computed record vector (the agent's whole Python
   pipeline: recorder, buffer, sender thread, spool, cap, drop counts) and
   the MLX part is left out. Goal: memory bounded by the queue, flat in steps.
4. A fast real loop (`fast_loop`, also alone: `python benchmarks/agent_bench.py --fast-loop
   [--seed N] [--model mlp|deep|wide] [--optimizer sgd|adamw|lion] [--lean]`): a tiny MLP (loss
   and gradients compiled) as fast as it runs, the default watch streaming to a `gradwatch
   serve` child, against the same loop with `clip_grad_norm` ("bare") and with what users write
   instead: `float(norm)` into a list, tensorboardX `add_scalar` (when installed), the loops
   alternated in rounds in one process (median of per-round ratios). Goals: watch <= 1.15x
   the bare step, 0 drops.
5. The lean step (`--lean`, and in the full run): 300 tensors of 64x64 with a real AdamW
   update in the timed step (goal <= 1.05x), and a training step compiled whole with
   `watch.compute()` inside and `watch.record()` after (goal <= 1.4x).
"""
from __future__ import annotations

import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.request
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim

from gradwatch.agent import GradWatch
from gradwatch.clip import EMADetector, GlobalNorm, ZScoreDetector

TENSORS = 64
SHAPE = (128, 128)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "gradwatch.server.commands.cli", "serve", "--db",
                                f"sqlite:///{folder / 'bench.db'}", "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1):
                return process, url
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("gradwatch serve did not start")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_tree() -> dict:
    keys = mx.random.split(mx.random.key(0), TENSORS)
    tree = {"layers": [{"weight": mx.random.normal(SHAPE, key=key)} for key in keys]}
    mx.eval(tree)
    return tree


def interleaved_times(watch, grads, rounds: int, per_round: int) -> tuple[list[float], list[float]]:
    """Seconds per call of bare `clip_grad_norm` + eval and of `watch.step` + eval on the same
    tree, in interleaved rounds (the machine's load hits both alike), after a warm-up."""

    def bare():
        clipped, _ = optim.clip_grad_norm(grads, 1.0)
        mx.eval(clipped)

    def watched():
        mx.eval(watch.step(grads))

    for _ in range(20):  # compile, warm caches
        bare()
        watched()
    bare_times, watched_times = [], []
    for _ in range(rounds):
        for fn, out in ((bare, bare_times), (watched, watched_times)):
            for _ in range(per_round):
                started = time.perf_counter()
                fn()
                out.append(time.perf_counter() - started)
    return bare_times, watched_times


def overhead(url: str, folder: Path, rounds: int = 15, per_round: int = 20) -> dict:
    grads = make_tree()
    watch = GradWatch("bench-overhead", url=url, clipper=GlobalNorm(1.0),
                      detectors=[ZScoreDetector(), EMADetector()], tensor_norms=True,
                      spool_dir=folder / "spool-overhead")
    bare_times, watched_times = interleaved_times(watch, grads, rounds, per_round)
    ok = watch.flush(timeout=30)
    stats = watch.stats
    watch.close()
    bare_ms = statistics.median(bare_times) * 1e3
    watched_ms = statistics.median(watched_times) * 1e3
    return {"params": TENSORS * SHAPE[0] * SHAPE[1], "tensors": TENSORS,
            "bare_clip_grad_norm_ms": bare_ms, "watch_step_ms": watched_ms,
            "overhead_ratio": watched_ms / bare_ms,
            "overhead_ratio_mean": statistics.fmean(watched_times) / statistics.fmean(bare_times),
            "overhead_steps_acked": stats.acked, "overhead_flushed": ok}


MANY_TENSORS = 300
MANY_SHAPE = (64, 64)


def overhead_many_tensors(url: str, folder: Path, rounds: int = 15, per_round: int = 20) -> dict:
    """Case 1b: hundreds of small tensors, where a per-tensor cost of the step would show."""
    keys = mx.random.split(mx.random.key(1), MANY_TENSORS)
    grads = {"layers": [{"weight": mx.random.normal(MANY_SHAPE, key=key)} for key in keys]}
    mx.eval(grads)
    watch = GradWatch("bench-many-tensors", url=url, clipper=GlobalNorm(1.0),
                      tensor_norms=True, spool_dir=folder / "spool-many")  # default detectors
    bare_times, watched_times = interleaved_times(watch, grads, rounds, per_round)
    ok = watch.flush(timeout=30)
    watch.close()
    bare_ms = statistics.median(bare_times) * 1e3
    watched_ms = statistics.median(watched_times) * 1e3
    return {"many_tensors": MANY_TENSORS, "many_params": MANY_TENSORS * MANY_SHAPE[0] * MANY_SHAPE[1],
            "many_bare_clip_grad_norm_ms": bare_ms, "many_watch_step_ms": watched_ms,
            "many_overhead_ratio": watched_ms / bare_ms, "many_flushed": ok}


def step_latency_server_down(folder: Path, steps: int = 2000) -> dict:
    grads = make_tree()
    dead = f"http://127.0.0.1:{free_port()}"
    watch = GradWatch("bench-down", url=dead, clipper=GlobalNorm(1.0), spool_dir=folder / "spool-down",
                      spool_cap_bytes=256 << 20)
    for _ in range(20):
        mx.eval(watch.step(grads))
    times, reference = [], []
    for _ in range(steps):
        started = time.perf_counter()
        clipped = watch.step(grads)
        times.append(time.perf_counter() - started)
        mx.eval(clipped)
        # Reference, interleaved: building MLX's own clip_grad_norm graph on the same tree.
        started = time.perf_counter()
        clipped, _ = optim.clip_grad_norm(grads, 1.0)
        reference.append(time.perf_counter() - started)
        mx.eval(clipped)
    started = time.perf_counter()
    watch.close()
    close_s = time.perf_counter() - started
    times.sort()
    reference.sort()
    return {"down_step_p50_ms": times[len(times) // 2] * 1e3,
            "down_clip_grad_norm_build_p50_ms": reference[len(reference) // 2] * 1e3,
            "down_clip_grad_norm_build_p99_ms": reference[int(len(reference) * 0.99)] * 1e3,
            "down_step_p99_ms": times[int(len(times) * 0.99)] * 1e3,
            "down_step_max_ms": times[-1] * 1e3,
            "down_spooled": watch.stats.spooled, "down_close_s": close_s}


def memory_million_steps(folder: Path, steps: int = 1_000_000, cap_bytes: int = 32 << 20) -> dict:
    dead = f"http://127.0.0.1:{free_port()}"
    watch = GradWatch("bench-memory", url=dead, clipper=GlobalNorm(1.0), spool_dir=folder / "spool-memory",
                      spool_cap_bytes=cap_bytes)
    grads = {"w": mx.array([3.0, 4.0])}
    _, record = watch.compute(grads, loss=mx.array(0.5))
    mx.eval(record)
    rss = {}
    traced_start = None
    started = time.perf_counter()
    record_fn = watch.record
    for step in range(steps):
        record_fn(record, lr=1e-3, step=step)
        if step % 250_000 == 0:
            rss[step] = rss_mb()
        if step == steps - 100_000:
            tracemalloc.start()
            traced_start = tracemalloc.get_traced_memory()[0]
    elapsed = time.perf_counter() - started
    traced_end, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss[steps] = rss_mb()
    watch.close(timeout=10)
    stats = watch.stats
    spool_bytes = sum(path.stat().st_size for path in (folder / "spool-memory").glob("*.gws"))
    return {"mem_steps": steps, "mem_steps_per_s": steps / elapsed,
            "mem_rss_mb_at_250k": rss[250_000], "mem_rss_mb_at_1m": rss[steps],
            "mem_rss_growth_250k_to_1m_mb": rss[steps] - rss[250_000],
            "mem_tracemalloc_growth_last_100k_kb": (traced_end - traced_start) / 1024,
            "mem_tracemalloc_peak_last_100k_kb": traced_peak / 1024,
            "mem_spool_mb": spool_bytes / 2**20, "mem_spool_cap_mb": cap_bytes / 2**20,
            "mem_spooled": stats.spooled, "mem_dropped": stats.dropped_total,
            "mem_dropped_by_reason": dict(stats.dropped)}


def _mlp_loss(params: dict, inputs: mx.array, targets: mx.array) -> mx.array:
    """An MLP with ReLU and mean squared error: a fraction of a millisecond a step."""
    hidden = inputs
    for layer in params["hidden"]:
        hidden = mx.maximum(hidden @ layer["weight"] + layer["bias"], 0.0)
    return mx.mean(mx.square(hidden @ params["out"]["weight"] + params["out"]["bias"] - targets))


MODELS = {"mlp": (8, 16, 1), "deep": (8, 32, 4), "wide": (32, 64, 1)}  # inputs, width, hidden layers
OPTIMIZERS = {"sgd": lambda: optim.SGD(learning_rate=0.01),
              "adamw": lambda: optim.AdamW(learning_rate=1e-3),
              "lion": lambda: optim.Lion(learning_rate=1e-4)}


class FastLoop:
    """One real training loop (loss and gradients `mx.compile`d, as a fast loop would be) that
    runs `n` steps at a time, so loops that log differently can be timed in alternation.

    `how`: "bare" (`clip_grad_norm`), "list" (`clip_grad_norm`, then `float(norm)` appended to
    a list after the eval), "tensorboardx" (the same, then `SummaryWriter.add_scalar`),
    "watch" (`watch.step(grads, loss=loss)`, default settings)."""

    def __init__(self, how: str, seed: int = 0, model: str = "mlp", optimizer: str = "sgd",
                 watch: GradWatch | None = None, logdir: Path | None = None):
        inputs, width, layers = MODELS[model]
        keys = mx.random.split(mx.random.key(seed), 2 * layers + 4)
        sizes = [inputs] + [width] * layers
        self.params = {
            "hidden": [{"weight": (2.0 / sizes[i]) ** 0.5 * mx.random.normal((sizes[i], sizes[i + 1]), key=keys[i]),
                        "bias": mx.zeros((sizes[i + 1],))} for i in range(layers)],
            "out": {"weight": 0.3 * mx.random.normal((width, 1), key=keys[-4]), "bias": mx.zeros((1,))}}
        self.inputs = mx.random.normal((32, inputs), key=keys[-3])
        self.targets = mx.random.normal((32, 1), key=keys[-2])
        self.optimizer = OPTIMIZERS[optimizer]()
        self.loss_and_grad = mx.compile(mx.value_and_grad(_mlp_loss))
        self.how, self.watch, self.norms, self.step = how, watch, [], 0
        self.writer = None
        if how == "tensorboardx":
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(logdir=str(logdir))
        mx.eval(self.params, self.inputs, self.targets)

    def run(self, steps: int) -> float:
        """Train `steps` steps; seconds per step."""
        params, optimizer, how = self.params, self.optimizer, self.how
        started = time.perf_counter()
        for _ in range(steps):
            loss, grads = self.loss_and_grad(params, self.inputs, self.targets)
            if how == "watch":
                grads = self.watch.step(grads, loss=loss)
                params = optimizer.apply_gradients(grads, params)
                mx.eval(params, loss)
            else:
                grads, norm = optim.clip_grad_norm(grads, 1.0)
                params = optimizer.apply_gradients(grads, params)
                mx.eval(params, loss, norm)
                if how == "list":
                    self.norms.append(float(norm))
                elif how == "tensorboardx":
                    self.writer.add_scalar("grad_norm", float(norm), self.step)
            self.step += 1
        self.params = params
        return (time.perf_counter() - started) / steps

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _alternate(loops: dict, rounds: int, steps: int) -> dict[str, list[float]]:
    """Seconds per step of each loop, `rounds` times `steps` steps, the loops in turn (the
    order turned each round), after a warm-up."""
    for loop in loops.values():
        loop.run(max(10, min(200, 2 * steps)))
    times: dict[str, list[float]] = {name: [] for name in loops}
    names = list(loops)
    for index in range(rounds):
        for name in names[index % len(names):] + names[:index % len(names)]:
            times[name].append(loops[name].run(steps))
    return times


def _ratios(times: dict[str, list[float]], baseline: str = "bare") -> dict[str, float]:
    """Median over rounds of each loop's time over the baseline's in the same round."""
    return {name: statistics.median(t / b for t, b in zip(series, times[baseline]))
            for name, series in times.items()}


def fast_loop(url: str, folder: Path, rounds: int = 30, steps: int = 500, seed: int = 0, model: str = "mlp",
              optimizer: str = "sgd") -> dict:
    """The default watch in a fast real loop, streamed to a server, against the bare
    `clip_grad_norm` step and what users write instead (float(norm) into a list,
    tensorboardX's add_scalar when installed), alternated in one process: ratios and drops."""
    hows = ["bare", "watch", "list"]
    try:
        import tensorboardX  # noqa: F401
        hows.append("tensorboardx")
    except ImportError:
        pass
    watch = GradWatch("bench-fast-loop", url=url, clipper=GlobalNorm(1.0), spool_dir=folder / "spool-fast",
                      handle_signals=False)
    loops = {how: FastLoop(how, seed, model, optimizer, watch=watch, logdir=folder / "tbx") for how in hows}
    times = _alternate(loops, rounds, steps)
    result = watch.flush(timeout=120)
    stats = watch.stats
    watch.close()
    for loop in loops.values():
        loop.close()
    ratios = _ratios(times)
    return {"fast_steps": loops["watch"].step, "fast_model": model, "fast_optimizer": optimizer, "fast_seed": seed,
            "fast_bare_us": statistics.median(times["bare"]) * 1e6,
            "fast_ratios": {name: ratios[name] for name in hows if name != "bare"},
            "fast_overhead_ratio": ratios["watch"],
            "fast_dropped": stats.dropped_total, "fast_dropped_by_reason": dict(stats.dropped),
            "fast_acked": result.acked, "fast_flushed": bool(result)}


def print_fast_loop(figures: dict) -> None:
    peers = ", ".join(f"{name} {ratio:.3f}x" for name, ratio in figures["fast_ratios"].items())
    print(f"fast real-MLX loop ({figures['fast_model']}, {figures['fast_optimizer']}, seed {figures['fast_seed']}; "
          f"bare clip_grad_norm step {figures['fast_bare_us']:.0f} us): {peers} the bare step "
          f"(median of per-round ratios; goal watch <= 1.15x); {figures['fast_steps']:,} watched steps, dropped "
          f"{figures['fast_dropped']} {figures['fast_dropped_by_reason']} (goal 0); {figures['fast_acked']:,} acked, "
          f"flush {'complete' if figures['fast_flushed'] else 'INCOMPLETE'}")


class UpdateLoop:
    """`MANY_TENSORS` tensors of 64x64 (an LLM's layout) with a real optimizer update in the
    timed step: clip (`clip_grad_norm`, or the default `watch.step`), update, eval."""

    def __init__(self, how: str, optimizer: str, watch: GradWatch | None = None, seed: int = 1):
        keys = mx.random.split(mx.random.key(seed), 2 * MANY_TENSORS)
        self.params = {"layers": [{"weight": 0.02 * mx.random.normal(MANY_SHAPE, key=keys[i])}
                                  for i in range(MANY_TENSORS)]}
        self.grads = {"layers": [{"weight": 1e-3 * mx.random.normal(MANY_SHAPE, key=keys[MANY_TENSORS + i])}
                                 for i in range(MANY_TENSORS)]}
        self.optimizer = OPTIMIZERS[optimizer]()
        self.how, self.watch, self.step = how, watch, 0
        mx.eval(self.params, self.grads)

    def run(self, steps: int) -> float:
        params, grads, optimizer = self.params, self.grads, self.optimizer
        started = time.perf_counter()
        for _ in range(steps):
            if self.how == "watch":
                clipped = self.watch.step(grads)
            else:
                clipped, _ = optim.clip_grad_norm(grads, 1.0)
            params = optimizer.apply_gradients(clipped, params)
            mx.eval(params, optimizer.state)
            self.step += 1
        self.params = params
        return (time.perf_counter() - started) / steps

    def close(self) -> None:
        pass


def update_loop(url: str, folder: Path, optimizer: str = "adamw", rounds: int = 40, steps: int = 5) -> dict:
    watch = GradWatch("bench-update", url=url, clipper=GlobalNorm(1.0), spool_dir=folder / "spool-update",
                      handle_signals=False)
    loops = {how: UpdateLoop(how, optimizer, watch) for how in ("bare", "watch")}
    times = _alternate(loops, rounds, steps)
    ok = watch.flush(timeout=60)
    watch.close()
    return {"update_optimizer": optimizer, "update_bare_ms": statistics.median(times["bare"]) * 1e3,
            "update_ratio": _ratios(times)["watch"], "update_flushed": bool(ok)}


class CompiledLoop:
    """A training step compiled whole (`mx.compile` over model, optimizer and, watched, the
    watch's state): `watch.compute()` inside and `watch.record()` after the eval, against
    the same step with `clip_grad_norm` inside."""

    def __init__(self, how: str, watch: GradWatch | None = None, seed: int = 0, model: str = "mlp",
                 optimizer: str = "sgd"):
        import mlx.nn as nn

        inputs, width, layers = MODELS[model]
        mx.random.seed(seed)
        parts: list = []
        size = inputs
        for _ in range(layers):
            parts += [nn.Linear(size, width), nn.ReLU()]
            size = width
        self.model = nn.Sequential(*parts, nn.Linear(size, 1))
        self.optimizer = OPTIMIZERS[optimizer]()
        self.inputs = mx.random.normal((32, inputs))
        self.targets = mx.random.normal((32, 1))
        mx.eval(self.model.parameters(), self.inputs, self.targets)
        loss_and_grad = nn.value_and_grad(self.model, lambda m, x, y: mx.mean(mx.square(m(x) - y)))
        self.how, self.watch, self.step = how, watch, 0
        self.state = [self.model.state, self.optimizer.state] + ([watch.state] if how == "watch" else [])

        def train_step(x, y):
            loss, grads = loss_and_grad(self.model, x, y)
            if how == "watch":
                grads, _ = watch.compute(grads, loss)
            else:
                grads, _ = optim.clip_grad_norm(grads, 1.0)
            self.optimizer.update(self.model, grads)
            return loss

        self.train_step = mx.compile(train_step, inputs=self.state, outputs=self.state)

    def run(self, steps: int) -> float:
        started = time.perf_counter()
        for _ in range(steps):
            loss = self.train_step(self.inputs, self.targets)
            mx.eval(self.state, loss)
            if self.how == "watch":
                self.watch.record()
            self.step += 1
        return (time.perf_counter() - started) / steps

    def close(self) -> None:
        pass


def compiled_loop(url: str, folder: Path, rounds: int = 30, steps: int = 300, seed: int = 0, model: str = "mlp",
                  optimizer: str = "sgd") -> dict:
    watch = GradWatch("bench-compiled", url=url, clipper=GlobalNorm(1.0), spool_dir=folder / "spool-compiled",
                      handle_signals=False)
    loops = {how: CompiledLoop(how, watch, seed, model, optimizer) for how in ("bare", "watch")}
    times = _alternate(loops, rounds, steps)
    ok = watch.flush(timeout=60)
    watch.close()
    return {"compiled_bare_us": statistics.median(times["bare"]) * 1e6, "compiled_ratio": _ratios(times)["watch"],
            "compiled_flushed": bool(ok)}


def print_lean(figures: dict) -> None:
    print(f"{MANY_TENSORS} tensors of {MANY_SHAPE[0]}x{MANY_SHAPE[1]}, clip + {figures['update_optimizer']} update + "
          f"eval: bare {figures['update_bare_ms']:.2f} ms, watch {figures['update_ratio']:.3f}x (goal <= 1.05x)")
    print(f"compiled training step (compute() inside, record() after): bare {figures['compiled_bare_us']:.0f} us, "
          f"watch {figures['compiled_ratio']:.3f}x (goal <= 1.4x)")


def _option(name: str, default: str) -> str:
    args = sys.argv[1:]
    return args[args.index(name) + 1] if name in args else default


def main_fast_loop() -> dict:
    """`--fast-loop [--seed N] [--model mlp|deep|wide] [--optimizer sgd|adamw|lion] [--lean]`:
    the fast loop and its peers; `--lean` adds the 300-tensor update and the compiled step."""
    seed, model, optimizer = int(_option("--seed", "0")), _option("--model", "mlp"), _option("--optimizer", "sgd")
    folder = Path(tempfile.mkdtemp(prefix="gradwatch-agent-bench-"))
    server = None
    try:
        server, url = start_server(folder)
        figures = fast_loop(url, folder, seed=seed, model=model, optimizer=optimizer)
        print_fast_loop(figures)
        if "--lean" in sys.argv[1:]:
            figures.update(update_loop(url, folder, optimizer="adamw" if optimizer == "sgd" else optimizer))
            figures.update(compiled_loop(url, folder, seed=seed, model=model, optimizer=optimizer))
            print_lean(figures)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)
    return figures


def main() -> dict:
    folder = Path(tempfile.mkdtemp(prefix="gradwatch-agent-bench-"))
    server = None
    try:
        server, url = start_server(folder)
        figures = overhead(url, folder)
        figures.update(overhead_many_tensors(url, folder))
        figures.update(fast_loop(url, folder))
        figures.update(update_loop(url, folder))
        figures.update(compiled_loop(url, folder))
        server.terminate()
        server.wait(timeout=10)
        server = None
        figures.update(step_latency_server_down(folder))
        figures.update(memory_million_steps(folder))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)
    print(f"agent overhead: watch.step+eval {figures['watch_step_ms']:.3f} ms vs clip_grad_norm+eval "
          f"{figures['bare_clip_grad_norm_ms']:.3f} ms on {figures['params']:,} params in "
          f"{figures['tensors']} tensors: ratio {figures['overhead_ratio']:.3f} (goal <= 1.10)")
    print(f"agent overhead, {figures['many_tensors']} tensors of {MANY_SHAPE[0]}x{MANY_SHAPE[1]}: "
          f"watch.step+eval {figures['many_watch_step_ms']:.3f} ms vs clip_grad_norm+eval "
          f"{figures['many_bare_clip_grad_norm_ms']:.3f} ms: ratio {figures['many_overhead_ratio']:.3f} "
          f"(goal <= 1.10)")
    print(f"server down: step() p50 {figures['down_step_p50_ms']:.3f} ms, p99 {figures['down_step_p99_ms']:.3f} ms "
          f"(goal <= 1 ms), max {figures['down_step_max_ms']:.3f} ms; close() {figures['down_close_s']:.2f} s; "
          f"for reference, building MLX's clip_grad_norm graph: p50 "
          f"{figures['down_clip_grad_norm_build_p50_ms']:.3f} ms, p99 {figures['down_clip_grad_norm_build_p99_ms']:.3f} ms")
    print(f"1M steps, server down, spool cap {figures['mem_spool_cap_mb']:.0f} MiB: RSS "
          f"{figures['mem_rss_mb_at_250k']:.1f} MiB at 250k -> {figures['mem_rss_mb_at_1m']:.1f} MiB at 1M; "
          f"tracemalloc growth over the last 100k steps {figures['mem_tracemalloc_growth_last_100k_kb']:.1f} KiB; "
          f"{figures['mem_spooled']:,} spooled, {figures['mem_dropped']:,} dropped {figures['mem_dropped_by_reason']} (a pure-Python loop that never releases the GIL starves the sender; real MLX steps release it and lose nothing); "
          f"{figures['mem_steps_per_s']:,.0f} steps/s")
    print_fast_loop(figures)
    print_lean(figures)
    return figures


if __name__ == "__main__":
    if "--fast-loop" in sys.argv[1:]:
        main_fast_loop()
    else:
        main()

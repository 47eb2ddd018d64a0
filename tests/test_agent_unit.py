"""The agent's pieces without a server: spool, wire encoding, recorder, zero extra syncs,
compile, the non-finite `raise` policy, fork. (Server round trips: test_agent_e2e.py.)"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from gradwatch.agent import GradWatch, NonFiniteGradientError
from gradwatch.agent.recorder import Layout, StepRecord
from gradwatch.agent.sender import encode_batches
from gradwatch.agent.spool import MAGIC, Position, Spool, encode_frame, read_frames
from gradwatch.agent.wire import encode_message, ingest_url, load_payload
from gradwatch.clip import EMADetector, GlobalNorm, ZScoreDetector

ROOT = Path(__file__).resolve().parent.parent


def spooled_batches(directory: Path) -> list[dict]:
    """Every batch in a spool folder, decoded, in order (what `gradwatch push` would send)."""
    spool = Spool(directory)
    spool.open()
    try:
        frames = []
        position = spool.acked
        while True:
            chunk = spool.read(position, max_frames=1000)
            if not chunk:
                break
            frames.extend(frame for frame in chunk if frame.payload)
            position = chunk[-1].end
            if position >= spool.end():
                break
        return [_as_json(load_payload(frame.payload)["batch"]) for frame in frames]
    finally:
        spool.close()


def _as_json(batch: dict) -> dict:
    """A decoded batch, JSON or msgpack (typed arrays), as the JSON wire spells it: lists,
    non-finite floats as "NaN"/"Infinity"/"-Infinity", tensor norms one row per step."""
    def plain(value):
        if isinstance(value, np.ndarray):
            value = value.tolist()
        if isinstance(value, list):
            return [plain(item) for item in value]
        if isinstance(value, float) and not math.isfinite(value):
            return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
        return value

    out = {key: plain(value) for key, value in batch.items() if key != "tensor_norms"}
    tensors = batch.get("tensor_norms")
    if tensors is not None:
        names = list(tensors["names"])
        norms = tensors["norms"]
        if isinstance(norms, np.ndarray) and norms.ndim == 1 and names:
            norms = norms.reshape(-1, len(names))
        out["tensor_norms"] = {"names": names, "norms": plain(norms)}
    return out


def f32(value) -> np.float32:
    """A float from the wire or from MLX as float32: the agent writes each float32 value as the
    shortest decimal that reads back as the same float32, so values compare bit-exact as float32."""
    return np.float32(value)


def spooled_steps(directory: Path) -> dict[int, dict]:
    steps = {}
    for batch in spooled_batches(directory):
        for index, step in enumerate(batch["step"]):
            assert step not in steps, f"step {step} spooled twice"
            steps[step] = {key: value[index] for key, value in batch.items()
                           if isinstance(value, list) and key != "step"}
    return steps


# ---------------------------------------------------------------- wire and spool

def test_ingest_url_is_derived_from_the_http_address():
    assert ingest_url("http://127.0.0.1:8765") == "ws://127.0.0.1:8765/ws/ingest"
    assert ingest_url("https://example.org/gw/") == "wss://example.org/gw/ws/ingest"
    assert ingest_url("ws://h:1/ws/ingest") == "ws://h:1/ws/ingest"
    with pytest.raises(ValueError, match="http://host:port"):
        ingest_url("127.0.0.1:8765")


def test_batch_is_columnar_with_nonfinite_floats_as_wire_strings():
    layout = Layout(("pre_norm", "clipped", "nonfinite"), ("a", "b"), ("lr",))
    values = [np.array([nan_or, 1.0, 0.0, 3.0, -np.inf], np.float32).tobytes()
              for nan_or in (1.5, np.nan, np.inf)]
    records = [StepRecord(step, 100.0 + step, layout, blob, (0.1,)) for step, blob in enumerate(values)]
    (payload, steps), = encode_batches("r", records, encoding="json")
    assert steps == 3
    body = json.loads(payload)
    assert body["run"] == "r"
    batch = body["batch"]
    assert batch["step"] == [0, 1, 2] and batch["time"] == [100.0, 101.0, 102.0]
    assert batch["pre_norm"] == [1.5, "NaN", "Infinity"]
    assert batch["clipped"] == [True, True, True] and batch["nonfinite"] == [False] * 3
    assert batch["lr"] == [0.1] * 3
    assert batch["tensor_norms"] == {"names": ["a", "b"], "norms": [[3.0, "-Infinity"]] * 3}
    message = json.loads(encode_message(7, payload, meta={"m": 1}))
    assert message["type"] == "batch" and message["seq"] == 7 and message["meta"] == {"m": 1}
    assert message["batch"] == batch


def test_spool_replays_in_order_and_remembers_acks_across_reopen(tmp_path):
    spool = Spool(tmp_path, segment_bytes=200)  # small segments: several files
    for index in range(10):
        assert spool.append(json.dumps({"i": index}).encode(), steps=1)
    frames = spool.read(spool.acked, max_frames=100)
    assert [json.loads(frame.payload)["i"] for frame in frames] == list(range(10))
    assert len(list(tmp_path.glob("*.gws"))) > 1
    spool.ack(frames[3].end)
    spool.close()

    reopened = Spool(tmp_path)
    reopened.open()
    rest = reopened.read(reopened.acked, max_frames=100)
    assert [json.loads(frame.payload)["i"] for frame in rest] == list(range(4, 10))
    reopened.ack(rest[-1].end)
    assert not reopened.pending() and not list(tmp_path.glob("*.gws"))
    reopened.close()


def test_a_torn_and_corrupt_spool_is_read_up_to_the_damage_with_a_warning(tmp_path):
    good = [encode_frame(json.dumps({"i": index}).encode(), 1) for index in range(5)]
    flipped = bytearray(good[2])
    flipped[-2] ^= 0xFF  # a flipped bit in frame 2's payload: CRC mismatch
    torn = good[4][: len(good[4]) - 3]  # killed mid-write
    (tmp_path / "0000000001.gws").write_bytes(good[0] + good[1] + bytes(flipped) + good[3] + torn)
    with pytest.warns(RuntimeWarning, match="spool"):
        spool = Spool(tmp_path)
        spool.open()
        frames = spool.read(spool.acked, max_frames=100)
    assert [json.loads(frame.payload)["i"] for frame in frames] == [0, 1, 3]
    assert frames[-1].end == Position(1, (tmp_path / "0000000001.gws").stat().st_size)
    # New data goes to a new segment, after the damaged one, and is read after it.
    spool.append(b'{"i": 5}', 1)
    later = spool.read(frames[-1].end, max_frames=100)
    assert [json.loads(frame.payload)["i"] for frame in later] == [5]
    spool.close()


def test_read_frames_survives_random_garbage():
    rng = np.random.default_rng(0)
    for _ in range(200):
        data = bytes(rng.integers(0, 256, size=int(rng.integers(0, 200)), dtype=np.uint8))
        data = data[:10] + MAGIC + data[10:]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert list(read_frames(data)) == []


def test_spool_cap_drops_past_the_cap_and_counts_by_reason(tmp_path):
    with GradWatch("capped", spool_dir=tmp_path, spool_cap_bytes=4096, batch_steps=10,
                   tensor_norms=False) as watch:
        for step in range(500):
            mx.eval(watch.step({"w": mx.array([float(step)])}))
    stats = watch.stats
    assert stats.recorded == 500
    assert stats.dropped["spool_full"] > 0
    assert stats.spooled + stats.dropped["spool_full"] == 500
    assert sum(path.stat().st_size for path in tmp_path.glob("*.gws")) <= 4096
    assert sum(len(batch["step"]) for batch in spooled_batches(tmp_path)) == stats.spooled
    assert json.loads((tmp_path / "drops.json").read_text()) == {"spool_full": stats.dropped["spool_full"]}


# ---------------------------------------------------------------- what step() records

def _tree(seed: int, sizes=(5, 7, 3)) -> dict:
    rng = np.random.default_rng(seed)
    return {"layers": [{"weight": mx.array(rng.standard_normal((size, 4)).astype(np.float32))}
                       for size in sizes], "bias": mx.array(rng.standard_normal(4).astype(np.float32))}


@pytest.mark.parametrize("compile", [True, False])
def test_step_clips_like_mlx_and_records_the_clip_info(tmp_path, compile):
    clipper_ref = GlobalNorm(1.0)
    detectors_ref = [ZScoreDetector(warmup_steps=3), EMADetector(warmup_steps=3)]
    expected = []
    with GradWatch("rec", clipper=GlobalNorm(1.0), detectors=[ZScoreDetector(warmup_steps=3),
                   EMADetector(warmup_steps=3)], spool_dir=tmp_path, compile=compile) as watch:
        for step in range(12):
            grads = _tree(step)
            if step == 9:  # a spike for the detectors
                grads["bias"] = grads["bias"] * 10.0
            clipped = watch.step(grads, loss=mx.array(step / 3), lr=1e-3)
            reference, _ = optim.clip_grad_norm(grads, 1.0)
            mx.eval(clipped, reference)
            for (_, got), (_, want) in zip(tree_flatten(clipped), tree_flatten(reference)):
                assert np.array_equal(np.array(got), np.array(want))
            _, info = clipper_ref(grads)
            z, ema = (detector(info.pre_norm) for detector in detectors_ref)
            mx.eval(info, z, ema)
            expected.append((info, z, ema))
    steps = spooled_steps(tmp_path)
    assert sorted(steps) == list(range(12))
    for step, (info, z, ema) in enumerate(expected):
        got = steps[step]
        assert f32(got["pre_norm"]) == f32(info.pre_norm.item())
        assert f32(got["post_norm"]) == f32(info.post_norm.item())
        assert f32(got["scale"]) == f32(info.scale.item()) and got["threshold"] == 1.0
        assert got["clipped"] == info.clipped.item() and got["nonfinite"] is False
        assert f32(got["z"]) == f32(z.score.item()) and f32(got["ema"]) == f32(ema.score.item())
        assert got["spike"] == (z.spike.item() or ema.spike.item())
        assert f32(got["loss"]) == np.float32(step / 3) and got["lr"] == 1e-3  # lr: a Python float
    assert steps[9]["spike"] is True
    batch = spooled_batches(tmp_path)[0]
    names = batch["tensor_norms"]["names"]
    assert names == ["layers.0.weight", "layers.1.weight", "layers.2.weight", "bias"]
    norms0 = expected[0][0].tensor_norms
    assert [f32(value) for value in batch["tensor_norms"]["norms"][0]] == [f32(norms0[name].item())
                                                                         for name in names]
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["run"] == "rec" and meta["meta"]["clipper"]["max_norm"] == 1.0
    assert meta["meta"]["tensors"]["shapes"]["layers.1.weight"] == [7, 4]
    assert meta["meta"]["mlx"] == mx.__version__ and meta["meta"]["pid"] == os.getpid()


def test_monitor_only_returns_the_gradients_unchanged(tmp_path):
    with GradWatch("monitor", spool_dir=tmp_path, detectors=[]) as watch:
        grads = _tree(1)
        out = watch.step(grads)
        mx.eval(out)
        for key in ("bias",):
            assert np.array_equal(np.array(out[key]), np.array(grads[key]))
    (step,) = spooled_steps(tmp_path).values()
    norm = float(np.sqrt(sum(float((np.array(g, np.float64) ** 2).sum())
                             for g in [*[l["weight"] for l in grads["layers"]], grads["bias"]])))
    assert math.isclose(step["pre_norm"], norm, rel_tol=1e-6)
    assert step["post_norm"] == step["pre_norm"] and step["scale"] == 1.0 and step["clipped"] is False
    assert "threshold" not in step and "z" not in step


# ---------------------------------------------------------------- zero extra syncs

BIG = (4096, 1024)  # 16 MiB of float32: what evaluating the lazy graph below must allocate
BIG_BYTES = 4096 * 1024 * 4


def _big_lazy(seed: int) -> mx.array:
    """A lazy graph whose evaluation allocates at least BIG_BYTES; nothing runs until evaluated."""
    return mx.tanh(mx.random.normal(BIG, key=mx.random.key(seed))) * 0.01


def _peak_growth(action) -> int:
    """Bytes of MLX memory allocated at the peak of `action()`, above what was live before it.

    Deterministic (no clocks): a step that evaluated the gradients or the loss would have
    to allocate their buffers, so its peak would grow by at least BIG_BYTES.
    """
    mx.synchronize()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    action()
    return mx.get_peak_memory() - before


def test_step_builds_lazy_ops_only_and_never_evaluates_the_gradients(tmp_path):
    watch = GradWatch("lazy", clipper=GlobalNorm(1.0), spool_dir=tmp_path)
    mx.eval(watch.step({"w": mx.zeros(BIG)}))  # compile once for this shape
    for seed in range(3):
        grads = {"w": _big_lazy(seed)}  # lazy: nothing has run yet
        result = {}
        grown = _peak_growth(lambda: result.setdefault("clipped", watch.step(grads)))
        # Had step() read the norm (`.item()`, `mx.eval`, `tolist`) it would have computed
        # the 16 MiB gradient first.
        assert grown < BIG_BYTES / 4, grown
        grown_by_user_eval = _peak_growth(lambda: mx.eval(result["clipped"]))
        assert grown_by_user_eval >= BIG_BYTES  # the measurement can see an evaluation
    watch.close()


def test_the_record_is_computed_by_the_users_eval_not_by_the_next_step(tmp_path):
    """The step's record vector (norms, detector scores, *and the loss*) is tied to the
    returned gradients, so `mx.eval(params)` computes it. The loss here is a big lazy graph
    the user never evaluates: if the record were not part of the user's graph, reading it
    at the next step() would evaluate that graph there."""
    watch = GradWatch("tied", clipper=GlobalNorm(1.0), spool_dir=tmp_path)
    grads = {"w": mx.ones((8,))}
    mx.eval(watch.step(grads, loss=mx.zeros(())))  # compile once
    for seed in range(3):
        loss = _big_lazy(seed).sum()  # lazy; the user evaluates only the gradients
        clipped = watch.step(grads, loss=loss)
        del loss
        mx.eval(clipped)
        grown = _peak_growth(lambda: watch.step(grads, loss=mx.zeros(())))  # reads the record
        assert grown < BIG_BYTES / 4, grown
        mx.eval(grads)
    watch.close()
    losses = [step["loss"] for step in spooled_steps(tmp_path).values()]
    assert sum(1 for value in losses if value != 0.0) == 3


class CountingGlobalNorm(GlobalNorm):
    """GlobalNorm that counts how often its Python code runs (= traces under mx.compile)."""

    calls = 0

    def __call__(self, grads, params=None):
        CountingGlobalNorm.calls += 1
        return super().__call__(grads, params)


def test_the_watched_step_is_compiled_once_with_its_state_as_inputs_and_outputs(tmp_path):
    CountingGlobalNorm.calls = 0
    with GradWatch("compiled", clipper=CountingGlobalNorm(1.0), spool_dir=tmp_path,
                   detectors=[ZScoreDetector(warmup_steps=2)]) as watch:
        for step in range(40):
            mx.eval(watch.step({"w": mx.array([float(step % 7) + 1.0, 1.0])}, loss=mx.array(1.0)))
        detector_count = int(watch.state["detectors"][0]["count"].item())
    assert CountingGlobalNorm.calls == 1  # traced once, then 39 runs of the compiled graph
    assert detector_count == 2  # the detector's state went in and out of the compiled step
    assert sorted(spooled_steps(tmp_path)) == list(range(40))


def test_a_user_compiled_training_step_with_compute_and_record(tmp_path):
    mx.random.seed(0)
    model = nn.Linear(4, 2)
    optimizer = optim.SGD(learning_rate=0.1)
    watch = GradWatch("user-compiled", clipper=GlobalNorm(0.5), spool_dir=tmp_path)
    loss_and_grad = nn.value_and_grad(model, lambda m, x, y: ((m(x) - y) ** 2).mean())
    state = [model.state, optimizer.state, watch.state]

    def train_step(x, y):
        loss, grads = loss_and_grad(model, x, y)
        grads, record = watch.compute(grads, loss=loss)
        optimizer.update(model, grads)
        return loss, record

    compiled = mx.compile(train_step, inputs=state, outputs=state)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(20):
        x = mx.array(rng.standard_normal((8, 4)).astype(np.float32))
        loss, record = compiled(x, x[:, :2] * 3)
        watch.record(record, lr=0.1)
        mx.eval(model.parameters(), optimizer.state)
        losses.append(loss)
    watch.close()
    steps = spooled_steps(tmp_path)
    assert sorted(steps) == list(range(20))
    assert [f32(steps[i]["loss"]) for i in range(20)] == [f32(loss.item()) for loss in losses]
    assert all(step["threshold"] == 0.5 and step["lr"] == 0.1 for step in steps.values())


# ---------------------------------------------------------------- non-finite gradients

def test_raise_policy_raises_at_the_next_step_after_recording_the_nan(tmp_path):
    watch = GradWatch("nan", clipper=GlobalNorm(1.0, nonfinite="raise"), spool_dir=tmp_path)
    mx.eval(watch.step({"w": mx.array([1.0, 2.0])}))
    mx.eval(watch.step({"w": mx.array([float("nan"), 2.0])}))  # lazy: nothing raised yet
    with pytest.raises(NonFiniteGradientError, match="step 1") as error:
        watch.step({"w": mx.array([1.0, 2.0])})
    assert error.value.step == 1 and math.isnan(error.value.pre_norm)
    mx.eval(watch.step({"w": mx.array([float("inf"), 2.0])}))
    with pytest.raises(NonFiniteGradientError, match="step 2"):
        watch.flush(timeout=5)
    watch.close()
    steps = spooled_steps(tmp_path)
    assert steps[1]["pre_norm"] == "NaN" and steps[1]["nonfinite"] is True
    assert steps[2]["pre_norm"] == "Infinity"


def test_propagate_policy_records_nonfinite_without_raising(tmp_path):
    with GradWatch("nan-ok", clipper=GlobalNorm(1.0), spool_dir=tmp_path) as watch:
        for value in (1.0, float("nan"), 1.0):
            mx.eval(watch.step({"w": mx.array([value])}))
    steps = spooled_steps(tmp_path)
    assert steps[1]["pre_norm"] == "NaN" and steps[1]["nonfinite"] is True and steps[1]["spike"] is True


# ---------------------------------------------------------------- process events

FORK_SCRIPT = textwrap.dedent("""
    import os, sys, time
    import mlx.core as mx
    from gradwatch.agent import GradWatch
    watch = GradWatch("forky", spool_dir=sys.argv[1], batch_steps=7, tensor_norms=False)
    for step in range(50):
        mx.eval(watch.step({"w": mx.array([float(step) + 1.0])}))
    pid = os.fork()
    if pid == 0:
        # The child: no sender, nothing of the parent's is sent or spooled again; its
        # exit (atexit hook included) must be quick and harmless.
        started = time.monotonic()
        assert watch.flush(timeout=5)
        stats = watch.stats
        assert stats.spooled == 0 and stats.sent == 0, stats
        print(f"child ok {time.monotonic() - started:.2f}", flush=True)
        sys.exit(0)  # runs the atexit hook in the child
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    for step in range(50, 80):
        mx.eval(watch.step({"w": mx.array([float(step) + 1.0])}))
    watch.close()
    print("parent ok", watch.stats.recorded, flush=True)
""")


def test_a_forked_child_never_sends_or_spools_the_parents_records(tmp_path):
    result = subprocess.run([sys.executable, "-c", FORK_SCRIPT, str(tmp_path / "spool")],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "child ok" in result.stdout and "parent ok 80" in result.stdout, result.stdout
    steps = spooled_steps(tmp_path / "spool")  # raises if any step was spooled twice
    assert sorted(steps) == list(range(80))
    assert all(steps[step]["pre_norm"] == step + 1.0 for step in steps)


def test_close_without_server_is_quick_and_leaves_every_step_in_the_spool(tmp_path):
    watch = GradWatch("quick", url=f"http://127.0.0.1:{_closed_port()}", spool_dir=tmp_path)
    for step in range(300):
        mx.eval(watch.step({"w": mx.array([float(step)])}))
    closed = watch.close()
    assert closed.unreachable   # it ended because the server was found away, not by waiting it out
    assert watch.stats.spooled == 300 and not watch.stats.dropped
    assert sorted(spooled_steps(tmp_path)) == list(range(300))


def _closed_port() -> int:
    from tests.procs import free_port

    return free_port()  # nothing listens there


ATEXIT_SCRIPT = textwrap.dedent("""
    import sys
    import mlx.core as mx
    from gradwatch.agent import GradWatch
    watch = GradWatch("atexit", spool_dir=sys.argv[1], url=sys.argv[2])
    for step in range(123):
        mx.eval(watch.step({"w": mx.array([float(step)])}))
    # no close(): the atexit hook must hand over the last step and spool everything
""")


def test_the_atexit_hook_flushes_a_watch_that_was_never_closed(tmp_path):
    result = subprocess.run([sys.executable, "-c", ATEXIT_SCRIPT, str(tmp_path),
                             f"http://127.0.0.1:{_closed_port()}"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(spooled_steps(tmp_path)) == list(range(123))


def test_the_buffer_never_blocks_and_says_when_it_is_full():
    from gradwatch.agent.buffer import RecordBuffer

    buffer = RecordBuffer(3, wake_at=2)
    assert buffer.put(1) and not buffer.wake.is_set()
    assert buffer.put(2) and buffer.wake.is_set()  # a batch is waiting: wake the sender
    assert buffer.put(3) and not buffer.put(4)  # full: the caller spools or counts a drop
    assert buffer.take(2) == [1, 2] and buffer.take(10) == [3] and buffer.take(10) == []


# ---------------------------------------------------------------- trees that change shape

def _norm32(tree: dict) -> np.float32:
    """The global norm as MLX computes it: float32 squares summed in tree order."""
    total = np.float32(0.0)
    for _, leaf in tree_flatten(tree):
        total = np.float32(total + np.float32((np.array(leaf, np.float32) ** 2).sum()))
    return np.float32(np.sqrt(total))


def _shape_a(step: int) -> dict:
    return {"w": mx.array([float(step) + 1.0, 2.0]), "b": mx.array([3.0])}


def _shape_b(step: int) -> dict:  # another model: other names, other tensor count
    return {"enc": [mx.array([1.0, float(step) + 0.5, 2.0]) for _ in range(3)]}


def test_alternating_gradient_trees_under_compile_keep_every_step_and_its_values(tmp_path):
    """Under mx.compile the Python of a step runs only while tracing a new shape; alternating
    two trees (two models, a GAN with one watch) must still record each step with its own
    columns and tensor names."""
    trees = [(_shape_a if step % 2 == 0 else _shape_b)(step) for step in range(60)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning from the sender either
        with GradWatch("shapes", clipper=GlobalNorm(1.0), spool_dir=tmp_path, compile=True) as watch:
            for step, tree in enumerate(trees):
                # loss as an array on some steps only: another layout of the same tree
                loss = mx.array(step / 8) if step % 3 == 0 else None
                mx.eval(watch.step(tree, loss=loss))
            assert watch.flush(timeout=20)
    assert watch.stats.recorded == 60 and not watch.stats.dropped
    steps = spooled_steps(tmp_path)
    assert sorted(steps) == list(range(60))
    for step, tree in enumerate(trees):
        assert f32(steps[step]["pre_norm"]) == _norm32(tree), step
        assert ("loss" in steps[step]) == (step % 3 == 0)
        if step % 3 == 0:
            assert f32(steps[step]["loss"]) == np.float32(step / 8)
    names = {tuple(batch["tensor_norms"]["names"]): len(batch["step"]) for batch in spooled_batches(tmp_path)}
    assert set(names) == {("w", "b"), ("enc.0", "enc.1", "enc.2")}
    for batch in spooled_batches(tmp_path):
        for step, row in zip(batch["step"], batch["tensor_norms"]["norms"]):
            flat = dict(tree_flatten(trees[step]))
            expected = [np.float32(np.sqrt(np.float32((np.array(flat[name], np.float32) ** 2).sum())))
                        for name in batch["tensor_norms"]["names"]]
            assert [f32(value) for value in row] == expected, step


def test_alternating_user_compiled_steps_with_compute_and_record(tmp_path):
    """The same with the user's own mx.compile around `compute()`: `record()` gets only the
    vector, which must say by itself which layout it has."""
    watch = GradWatch("user-shapes", spool_dir=tmp_path, detectors=[])
    compiled = mx.compile(lambda grads: watch.compute(grads)[1], inputs=watch.state, outputs=watch.state)
    trees = [(_shape_a if step % 2 == 0 else _shape_b)(step) for step in range(20)]
    for tree in trees:
        record = compiled(tree)
        mx.eval(record)
        watch.record(record, lr=0.5)
    watch.close()
    assert not watch.stats.dropped
    steps = spooled_steps(tmp_path)
    assert sorted(steps) == list(range(20))
    assert all(f32(steps[step]["pre_norm"]) == _norm32(tree) for step, tree in enumerate(trees))
    assert all(steps[step]["lr"] == 0.5 for step in steps)


def test_a_record_that_cannot_be_encoded_is_counted_and_the_sender_goes_on(tmp_path):
    bad = StepRecord(10_000, time.time(), Layout(("pre_norm", "post_norm"), ("a",)), b"\x00\x00", ())
    with pytest.warns(RuntimeWarning, match="cannot encode") as caught:
        watch = GradWatch("bad-record", spool_dir=tmp_path, tensor_norms=False, detectors=[], batch_steps=10)
        for step in range(50):
            mx.eval(watch.step({"w": mx.array([float(step) + 1.0])}))
            if step == 20:
                assert watch._buffer.put(bad)  # what a bug in the recorder would hand over
                watch._buffered += 1
        result = watch.flush(timeout=20)
        # Falsy: one record was lost. Every other one is in the spool (the destination here).
        assert not result and result.dropped == 1 and result.pending == 0 and result.spooled == 50
        for step in range(50, 80):  # the sender thread is still there
            mx.eval(watch.step({"w": mx.array([float(step) + 1.0])}))
        watch.close()
    assert sum("cannot encode" in str(warning.message) for warning in caught) == 1
    assert watch.stats.dropped == {"encode_error": 1}
    steps = spooled_steps(tmp_path)
    assert sorted(steps) == list(range(80))
    assert all(f32(steps[step]["pre_norm"]) == np.float32(step + 1.0) for step in steps)


# ---------------------------------------------------------------- encoding: size and exactness

def _records(count: int, tensors: int, seed: int = 0) -> list[StepRecord]:
    rng = np.random.default_rng(seed)
    layout = Layout(("pre_norm", "clipped"), tuple(f"layers.{index}.weight" for index in range(tensors)))
    values = rng.random((count, layout.width), dtype=np.float32)
    return [StepRecord(step, 1000.0 + step, layout, values[step].tobytes()) for step in range(count)]


def test_float32_values_are_written_short_and_read_back_bit_exact():
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    values = bits.view(np.float32)
    values = values[np.isfinite(values)]
    values = np.concatenate([values, np.float32([0.1, 1 / 3, 1e-45, 3.4028235e38, -0.0, 2.0 ** -149])])
    layout = Layout(("pre_norm",), tuple(f"t{index}" for index in range(len(values) - 1)))
    record = StepRecord(0, 0.0, layout, values.tobytes())
    (payload, _), = encode_batches("exact", [record], max_bytes=1 << 30, encoding="json")
    batch = json.loads(payload)["batch"]  # float64, as the server parses it
    back = np.float32([batch["pre_norm"][0], *batch["tensor_norms"]["norms"][0]])
    assert np.array_equal(back.view(np.uint32), values.view(np.uint32))
    assert b"0.1," in payload and b"0.33333334," in payload  # not 0.10000000149011612
    # Typical norms (0.001..10): at most 9 significant digits each, not float64's 17.
    records = _records(100, 50)
    (short, _), = encode_batches("r", records, max_bytes=1 << 30, encoding="json")
    digits = [len(repr(value).split("e")[0].replace(".", "").replace("-", "").lstrip("0").rstrip("0"))
              for row in json.loads(short)["batch"]["tensor_norms"]["norms"] for value in row]
    assert max(digits) <= 9


def test_batches_are_cut_by_encoded_bytes_as_well_as_by_steps():
    records = _records(1000, 60)
    parts = encode_batches("big", records, max_bytes=50_000, encoding="json")
    assert len(parts) > 1 and all(len(payload) <= 50_000 for payload, _ in parts)
    assert sum(steps for _, steps in parts) == 1000
    stepped = [step for payload, _ in parts for step in json.loads(payload)["batch"]["step"]]
    assert stepped == list(range(1000))
    (whole, steps), = encode_batches("big", records, max_bytes=1 << 30)
    assert steps == 1000


# ---------------------------------------------------------------- a server that never answers

class BlackHole:
    """A TCP listener that accepts connections and never answers (a stuck or firewalled server)."""

    def __init__(self):
        import socket
        import threading

        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        import socket

        while not self._stop.is_set():
            try:
                connection, _ = self.listener.accept()
                self.connections.append(connection)
            except socket.timeout:
                pass
            except OSError:
                return

    def close(self):
        self._stop.set()
        self._thread.join(5)
        for connection in self.connections:
            connection.close()
        self.listener.close()


@pytest.mark.slow
def test_a_server_that_never_answers_costs_the_training_thread_no_disk_io_and_no_steps(tmp_path):
    """While a connection attempt hangs (here until the open timeout), the spool is written by
    the sender thread only: the training thread never writes, and every step reaches it. The
    buffer holds every step, so the result does not depend on how fast the sender thread gets
    the GIL on a loaded machine (a buffer smaller than the run would drop `queue_full` there)."""
    import threading

    hole = BlackHole()
    try:
        steps = 6_000
        watch = GradWatch("blackhole", url=hole.url, spool_dir=tmp_path, queue_size=steps,
                          batch_steps=100, tensor_norms=False, detectors=[])
        writers = []
        append = watch._spool.append

        def recording_append(*args, **kwargs):
            writers.append(threading.current_thread())
            return append(*args, **kwargs)

        watch._spool.append = recording_append
        for step in range(steps):
            mx.eval(watch.step({"w": mx.array([float(step) + 1.0])}))
        watch.close()   # a hang fails the test by its timeout (pytest-timeout)
    finally:
        hole.close()
    assert writers and threading.main_thread() not in writers
    assert all(thread.name == "gradwatch-sender" for thread in writers)
    assert not watch.stats.dropped
    assert watch.stats.spooled == steps
    spooled = spooled_steps(tmp_path)
    assert sorted(spooled) == list(range(steps))
    assert all(f32(spooled[step]["pre_norm"]) == np.float32(step + 1.0) for step in spooled)

"""The agent against a real `gradwatch serve` process: kills, restarts, no server, push,
a refused token, a corrupt spool, drop reports. Values are checked against an independent
reference: each step's gradient is one float32 value v per tensor, so its exact global norm is
sqrt(k) * |v| computed here in float32 arithmetic, and it is compared bit for bit."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.parse
import warnings
import urllib.request
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest

from gradwatch.agent import GradWatch
from gradwatch.agent.spool import read_frames
from gradwatch.agent.wire import load_payload
from gradwatch.clip import GlobalNorm, norms_and_global
from tests.procs import ServerProcess, free_port

ROOT = Path(__file__).resolve().parent.parent


def get(url: str, token: str | None = None):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def stored(server: ServerProcess, run: str, fields: str = "pre_norm,loss", points: int = 10**6) -> dict:
    quoted = urllib.parse.quote(run, safe="")
    return get(f"{server.url}/api/runs/{quoted}/series?points={points}&fields={fields}")


def wait_for_steps(server: ServerProcess, run: str, count: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        runs = {entry["name"]: entry for entry in get(server.url + "/api/runs")}
        seen = runs.get(run, {}).get("steps", 0)
        if seen >= count:
            return seen
        time.sleep(0.2)
    return seen


def value_of(step: int) -> np.float32:
    """The gradient value of a step: varied, exactly representable, never repeating."""
    return np.float32(1.0 + (step * 7919 % 10007) / 1024.0)


def grads_of(step: int) -> dict:
    v = float(value_of(step))
    return {"a": mx.array([v]), "b": [mx.array([v])]}


def expected_norm(step: int) -> float:
    v = value_of(step)
    return float(np.sqrt(np.float32(v * v) + np.float32(v * v)))  # float32, in tree order


def check_series(series: dict, steps: int) -> None:
    assert series["step"] == list(range(steps))  # each step once, none missing
    # The agent writes float32 values as their shortest decimal: bit-exact as float32.
    assert [np.float32(value) for value in series["pre_norm"]] == [np.float32(expected_norm(step))
                                                                   for step in range(steps)]
    assert series["loss"] == [step / 4 for step in range(steps)]


def push(directory: Path, url: str, token: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "gradwatch.server.commands.cli", "push", str(directory), "--url", url]
    if token:
        command += ["--token", token]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.fixture
def server(tmp_path):
    process = ServerProcess(f"sqlite:///{tmp_path / 'gradwatch.db'}", log_path=tmp_path / "server.log")
    process.start()
    yield process
    process.stop()


@pytest.mark.slow
def test_every_step_is_stored_exactly_once_through_repeated_server_kills(server, tmp_path):
    steps = 20_000
    kills = {3_000, 7_000, 11_000, 15_000}
    restarter = None
    watch = GradWatch("kills", url=server.url, clipper=GlobalNorm(1.0), spool_dir=tmp_path / "spool",
                      detectors=[], batch_steps=500, backoff_cap=1.0)
    for step in range(steps):
        mx.eval(watch.step(grads_of(step), loss=step / 4))
        if step in kills:
            if restarter is not None:
                restarter.join()
            server.kill()  # SIGKILL: no clean shutdown, acks in flight are lost
            restarter = threading.Timer(1.0, server.start)
            restarter.start()
    restarter.join()
    assert watch.flush(timeout=60)
    assert wait_for_steps(server, "kills", steps) == steps
    watch.close()
    check_series(stored(server, "kills"), steps)
    stats = watch.stats
    assert stats.recorded == steps and not stats.dropped
    assert stats.spooled_total > 0  # the kills did send data to the spool
    assert stats.spooled == 0 and stats.pending == 0  # and all of it went on to the server
    # Each step acknowledged once: as accepted, or as a duplicate when a kill landed between the
    # commit and its ack (the resend finds it stored). Stored exactly once: check_series above.
    assert stats.accepted + stats.duplicates == steps and stats.conflicts == 0
    # Nothing left to replay: the spool was drained and acknowledged.
    assert not list((tmp_path / "spool").glob("*.gws"))


def test_without_a_server_close_is_quick_and_push_delivers_every_step_once(server, tmp_path):
    spool_dir = tmp_path / "spool"
    steps = 2_500
    watch = GradWatch("offline", url=None, clipper=GlobalNorm(1.0), spool_dir=spool_dir,
                      config={"note": "no server"})
    for step in range(steps):
        mx.eval(watch.step(grads_of(step), loss=step / 4))
    closed = watch.close()
    assert closed and closed.spooled == steps   # every step fsynced in the spool: nothing given up
    assert watch.stats.spooled == steps

    first = push(spool_dir, server.url)
    assert first.returncode == 0, first.stderr
    assert f"{steps} step(s) sent, {steps} stored, 0 duplicate(s)" in first.stdout
    check_series(stored(server, "offline"), steps)
    (run,) = get(server.url + "/api/runs")
    run = get(server.url + "/api/runs/" + run["name"])
    assert run["meta"]["config"] == {"note": "no server"} and run["meta"]["clipper"]["max_norm"] == 1.0

    second = push(spool_dir, server.url)
    assert second.returncode == 0, second.stderr
    assert "0 step(s) sent, 0 stored" in second.stdout
    check_series(stored(server, "offline"), steps)


def test_a_corrupt_spool_tail_is_skipped_and_the_rest_pushed(server, tmp_path):
    spool_dir = tmp_path / "spool"
    with GradWatch("torn", spool_dir=spool_dir, batch_steps=100, detectors=[]) as watch:
        for step in range(1_000):
            mx.eval(watch.step(grads_of(step), loss=step / 4))
            if step == 499:
                assert watch.flush()  # steps 0..499 end a frame: the spool holds at least two
    (segment,) = sorted(spool_dir.glob("*.gws"))
    data = segment.read_bytes()
    # However the sender cut its batches: tear the last frame, keep every frame before it.
    frames = list(read_frames(data))
    assert len(frames) >= 2 and frames[-1][1] == len(data)
    last_start, _, last_payload, _ = frames[-1]
    kept = min(load_payload(last_payload)["batch"]["step"])  # steps 0..kept-1 are in intact frames
    assert kept > 0 and sum(steps for *_, steps in frames[:-1]) == kept
    torn = data[:last_start + (len(data) - last_start) // 2]  # the last frame torn halfway
    segment.write_bytes(torn + b"\x00garbage")  # and junk after it
    result = push(spool_dir, server.url)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("torn or corrupt tail") == 1, result.stderr  # said once
    check_series(stored(server, "torn"), kept)  # every intact frame, the torn one lost
    # The rest of the spool was acknowledged: a second push sends nothing.
    assert "0 step(s) sent" in push(spool_dir, server.url).stdout


def test_a_refused_token_is_reported_once_and_the_data_stays_in_the_spool(tmp_path):
    spool_dir = tmp_path / "spool"
    with ServerProcess(f"sqlite:///{tmp_path / 'db.sqlite'}", extra_args=["--token", "right"]) as server:
        with pytest.warns(RuntimeWarning, match="refused the token") as caught:
            watch = GradWatch("guarded", url=server.url, token="wrong", spool_dir=spool_dir,
                              batch_interval=0.05)
            for step in range(300):
                mx.eval(watch.step(grads_of(step), loss=step / 4))
                if step == 100:
                    time.sleep(0.5)  # let the sender meet the refusal mid-run
            watch.close()
        assert sum("refused the token" in str(warning.message) for warning in caught) == 1
        assert watch.stats.refused and watch.stats.acked == 0 and watch.stats.spooled == 300
        assert get(server.url + "/api/runs") == []
        assert push(spool_dir, server.url, token="wrong").returncode != 0
        result = push(spool_dir, server.url, token="right")
        assert result.returncode == 0, result.stderr
        check_series(stored(server, "guarded"), 300)


def test_drops_past_the_spool_cap_are_reported_to_the_server_as_a_drop_event(tmp_path):
    port = free_port()
    server = ServerProcess(f"sqlite:///{tmp_path / 'db.sqlite'}", port=port)
    watch = GradWatch("dropping", url=server.url, spool_dir=tmp_path / "spool", spool_cap_bytes=20_000,
                      batch_steps=50, batch_interval=0.05, backoff_cap=0.5, detectors=[])
    for step in range(2_000):  # server not started yet: spool, then drop past the cap
        mx.eval(watch.step(grads_of(step), loss=step / 4))
    offline = watch.flush(timeout=1)
    dropped = watch.stats.dropped.get("spool_full", 0)
    assert dropped > 0 and not offline and offline.unreachable and offline.dropped == dropped
    assert offline.pending == 0 and offline.spooled == 2_000 - dropped  # kept: durable on disk
    with server:
        result = watch.flush(timeout=30)
        # Falsy (steps were dropped), but everything kept is acknowledged now.
        assert not result and result.spooled == 0 and result.pending == 0 and not result.unreachable
        kept = watch.stats.recorded - dropped
        assert wait_for_steps(server, "dropping", kept) == kept
        deadline = time.monotonic() + 20
        events = []
        while not events and time.monotonic() < deadline:
            events = get(f"{server.url}/api/runs/dropping/events?kind=drop")
            time.sleep(0.1)
        watch.close()
        assert len(events) == 1 and f"{dropped} step record(s)" in events[0]["message"]


def test_tensor_norms_and_run_metadata_reach_the_server(server, tmp_path):
    rng = np.random.default_rng(0)
    trees = [{"layers": [{"weight": mx.array(rng.standard_normal((3, 2)).astype(np.float32))}],
              "bias": mx.array(rng.standard_normal(2).astype(np.float32))} for _ in range(30)]
    with GradWatch("tensors", url=server.url, clipper=GlobalNorm(1.0), spool_dir=tmp_path / "spool",
                   config={"lr": 3e-4}, optimizer=optim.Lion(learning_rate=1e-4)) as watch:
        for tree in trees:
            mx.eval(watch.step(tree))
        assert watch.flush(timeout=20)
    answer = get(f"{server.url}/api/runs/tensors/tensors?points=1000")
    assert answer["names"] == ["layers.0.weight", "bias"] and answer["step"] == list(range(30))
    for row, name in zip(answer["norms"], answer["names"]):
        expected = [float(np.sqrt(np.float32((np.array(tree["layers"][0]["weight"] if name != "bias"
                                                         else tree["bias"]) ** 2).sum())))
                    for tree in trees]
        assert np.allclose([float(value) for value in row], expected, rtol=1e-6)
    (run,) = get(server.url + "/api/runs")
    meta = get(server.url + "/api/runs/" + run["name"])["meta"]
    assert meta["tensors"]["shapes"] == {"layers.0.weight": [3, 2], "bias": [2]}
    assert meta["mlx"] == mx.__version__ and meta["config"] == {"lr": 3e-4}
    assert {"host", "pid", "start_time"} <= set(meta)
    # the optimizer's class name: the recommendation reads it (Lion is sign-based)
    assert meta["optimizer"] == "Lion"
    assert get(f"{server.url}/api/runs/tensors/recommendation")["optimizer"] == "Lion"


def test_the_example_training_loop_streams_every_step(server):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "train_mlp.py"), "--url", server.url,
                             "--steps", "200", "--run", "example"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "200 steps recorded, 200 acknowledged by the server" in result.stdout
    answer = stored(server, "example", fields="pre_norm,loss,lr,clipped")
    assert answer["step"] == list(range(200))
    assert all(isinstance(value, float) and value > 0 for value in answer["pre_norm"])


def test_a_batch_the_server_refuses_for_good_is_reported_once_and_kept_aside(server, tmp_path):
    spool_dir = tmp_path / "spool"
    with pytest.warns(RuntimeWarning, match="refused a batch") as caught:
        with GradWatch("bad/name", url=server.url, spool_dir=spool_dir, batch_steps=10,
                       batch_interval=0.02) as watch:  # '/' is not allowed in a run name: HTTP 422
            for step in range(50):
                mx.eval(watch.step(grads_of(step)))
            watch.flush(timeout=20)
    assert sum("refused a batch" in str(warning.message) for warning in caught) == 1
    assert get(server.url + "/api/runs") == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = [load_payload(payload) for _, _, payload, _ in read_frames((spool_dir / "rejected.gws").read_bytes())]
    assert sorted(step for body in kept if "batch" in body for step in body["batch"]["step"]) == list(range(50))



def wide_grads(step: int, tensors: int) -> dict:
    v = float(value_of(step))
    return {"layers": [{"weight": mx.array([v, float(index)])} for index in range(tensors)]}


@pytest.mark.slow
def test_batches_over_the_servers_message_limit_are_cut_until_they_fit(tmp_path):
    """`gradwatch serve --max-body 100000`: a 1,000-step batch of a 60-tensor watch is several
    times the limit. The server closes with 1009; the agent cuts smaller and every step is stored,
    with its per-tensor norms, bit-exact as float32."""
    steps, tensors = 2_500, 60
    with ServerProcess(f"sqlite:///{tmp_path / 'db.sqlite'}", extra_args=["--max-body", "100000"],
                       log_path=tmp_path / "server.log") as server:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing is set aside: no warning
            # batch_interval: batches are cut at batch_steps (1,000 steps, ~0.7 MB), never by time
            with GradWatch("limited", url=server.url, clipper=GlobalNorm(1.0), spool_dir=tmp_path / "spool",
                           detectors=[], batch_interval=600) as watch:
                for step in range(steps):
                    mx.eval(watch.step(wide_grads(step, tensors), loss=step / 4))
                assert watch.flush(timeout=120)
        assert wait_for_steps(server, "limited", steps) == steps
        series = stored(server, "limited")
        assert series["step"] == list(range(steps))
        # The reference: the same MLX norms computed here, independently of the agent's pipeline.
        reference = [norms_and_global(wide_grads(step, tensors)) for step in range(steps)]
        mx.eval(reference)
        assert [np.float32(value) for value in series["pre_norm"]] == [
            np.float32(total.item()) for _, total in reference]
        assert series["loss"] == [step / 4 for step in range(steps)]
        answer = get(f"{server.url}/api/runs/limited/tensors?points={steps}")
        assert answer["step"] == list(range(steps)) and len(answer["names"]) == tensors
        for name in ("layers.0.weight", "layers.7.weight", "layers.59.weight"):
            row = answer["names"].index(name)
            assert [np.float32(value) for value in answer["norms"][row]] == [
                np.float32(norms[name].item()) for norms, _ in reference]
    stats = watch.stats
    # accepted + duplicates: a batch stored just before the server closed is sent again.
    assert not stats.dropped and stats.accepted + stats.duplicates == steps and stats.conflicts == 0
    assert watch._sender.max_batch_bytes < 100_000  # it learned the limit
    assert not list((tmp_path / "spool").glob("*.gws"))


def test_a_single_step_over_the_servers_limit_is_set_aside_once_not_resent_forever(tmp_path):
    spool_dir = tmp_path / "spool"
    with ServerProcess(f"sqlite:///{tmp_path / 'db.sqlite'}", extra_args=["--max-body", "6000"],
                       log_path=tmp_path / "server.log") as server:
        with pytest.warns(RuntimeWarning, match="over the server's message limit") as caught:
            with GradWatch("huge-steps", url=server.url, spool_dir=spool_dir, detectors=[],
                           batch_interval=0.05) as watch:
                for step in range(5):  # 400 tensors: ~10 kB a step
                    mx.eval(watch.step(wide_grads(step, 400)))
                result = watch.flush(timeout=60)
                # Falsy: the five steps are set aside (dropped as too_big); nothing else waits.
                assert not result and not result.timed_out and result.dropped == 5
                assert result.pending == 0 and result.spooled == 0
        assert sum("one step of run" in str(warning.message) for warning in caught) == 1
        stats = watch.stats
        assert stats.dropped == {"too_big": 5} and stats.acked == 0
        assert wait_for_steps(server, "huge-steps", 1, timeout=1) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = [load_payload(payload) for _, _, payload, _ in read_frames((spool_dir / "rejected.gws").read_bytes())]
    assert sorted(step for body in kept for step in body["batch"]["step"]) == list(range(5))
    assert not list(spool_dir.glob("[0-9]*.gws"))  # nothing left to replay

"""The agent's side of the binary wire, through a real server: the agent spools and sends
msgpack (GWS2 frames), `GRADWATCH_WIRE=json` sends JSON (GWS1); one spool folder holding both
(an older agent's JSON frames, then binary ones) pushes every step; a payload cut smaller keeps
its encoding; a wrong URL path is named as such, and the push hints say what to add."""
from __future__ import annotations

import json
from pathlib import Path
import urllib.request
import warnings

import msgpack
import numpy as np
import pytest

from gradwatch.agent import GradWatch
from gradwatch.agent.push import push
from gradwatch.agent.spool import MAGIC, MAGIC_BINARY, Spool, read_frames
from gradwatch.agent.transport import Refused, WebSocketTransport
from gradwatch.agent.wire import encode_message, is_binary, load_payload, split_payload, typed_array
from tests.conftest import missing
from tests.procs import ServerProcess


def get(url: str):
    with urllib.request.urlopen(url, timeout=30) as answer:
        return json.loads(answer.read())


def stored_steps(server, run: str) -> list[int]:
    return get(f"{server.url}/api/runs/{run}/series?fields=pre_norm&points=100000")["step"]


def grads(step: int) -> dict:
    import mlx.core as mx
    return {"w": mx.full((4, 4), 0.1 * (step % 7 + 1)), "b": mx.full((4,), 0.05)}


def spool_magics(folder) -> set[bytes]:
    magics = set()
    for segment in sorted(folder.glob("[0-9]*.gws")):
        for offset, _end, _payload, _steps in read_frames(segment.read_bytes()):
            magics.add(segment.read_bytes()[offset:offset + 4])
    return magics


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wire-agent")
    with ServerProcess(f"sqlite:///{folder / 'agent.db'}") as process:
        yield process


@pytest.mark.parametrize("encoding, magic", [("msgpack", MAGIC_BINARY), ("json", MAGIC)])
def test_the_agent_spools_in_its_encoding_and_push_stores_every_step(server, tmp_path, monkeypatch,
                                                                     encoding, magic):
    monkeypatch.setenv("GRADWATCH_WIRE", encoding)
    run = f"spooled-{encoding}"
    with GradWatch(run=run, url=None, spool_dir=tmp_path / "spool") as watch:
        for step in range(300):
            watch.step(grads(step), loss=1.0 / (step + 1))
    assert spool_magics(tmp_path / "spool") == {magic}
    _, stats = push(tmp_path / "spool", server.url, timeout=60)
    assert stats.accepted == 300
    assert stored_steps(server, run) == list(range(300))
    tensors = get(f"{server.url}/api/runs/{run}/tensors?points=1000")
    assert sorted(tensors["names"]) == ["b", "w"] and len(tensors["step"]) == 300


def test_a_spool_holding_both_encodings_pushes_every_step(server, tmp_path):
    """An older agent's JSON frames, then binary ones, in one folder: all are replayed in order."""
    spool = Spool(tmp_path / "mixed")
    run = "mixed-spool"
    spool.append(json.dumps({"run": run, "batch": {"step": [0, 1], "pre_norm": [1.0, "NaN"]}}).encode(), 2)
    spool.append(msgpack.packb({"run": run, "batch": {"step": typed_array(np.arange(2, 5, dtype=np.int64)),
                                                       "pre_norm": typed_array(np.array([2, 3, 4], np.float32))}}), 3)
    spool.close()
    assert spool_magics(tmp_path / "mixed") == {MAGIC, MAGIC_BINARY}
    pushed_run, stats = push(tmp_path / "mixed", server.url, timeout=60)
    assert pushed_run == run and stats.accepted == 5
    series = get(f"{server.url}/api/runs/{run}/series?fields=pre_norm")
    assert series["step"] == [0, 1, 2, 3, 4] and series["pre_norm"] == [1.0, "NaN", 2.0, 3.0, 4.0]


def test_a_binary_payload_cut_smaller_keeps_its_values_and_encoding():
    rows = np.arange(600, dtype=np.float32).reshape(200, 3)
    payload = msgpack.packb({"run": "r", "batch": {
        "step": typed_array(np.arange(200, dtype=np.int64)), "pre_norm": typed_array(rows[:, 0]),
        "clipped": typed_array(rows[:, 1] > 300),
        "tensor_norms": {"names": ["a", "b"], "norms": typed_array(rows[:, 1:])}}})
    parts = split_payload(payload, len(payload) // 3)
    assert len(parts) >= 3 and all(is_binary(part) and len(part) <= len(payload) // 3 for part, _ in parts)
    batches = [load_payload(part)["batch"] for part, _ in parts]
    assert sum(count for _, count in parts) == 200
    np.testing.assert_array_equal(np.concatenate([b["step"] for b in batches]), np.arange(200))
    np.testing.assert_array_equal(np.concatenate([b["tensor_norms"]["norms"] for b in batches]).reshape(200, 2),
                                  rows[:, 1:])
    message = encode_message(7, parts[0][0], meta={"lr": np.float32(0.5), 3: "x"})
    assert isinstance(message, bytes)
    decoded = msgpack.unpackb(message, ext_hook=lambda code, data: (code, len(data)))
    assert decoded["type"] == "batch" and decoded["seq"] == 7 and decoded["meta"] == {"lr": 0.5, "3": "x"}
    assert decoded["run"] == "r" and set(decoded["batch"]) == {"step", "pre_norm", "clipped", "tensor_norms"}


def test_a_wrong_url_path_is_named_and_the_push_hint_names_the_servers_root(server, tmp_path):
    transport = WebSocketTransport(server.url + "/api")
    with pytest.raises(Refused, match="no gradwatch server at this path") as refused:
        transport.open()
    assert refused.value.reason == "path" and transport.push_url() == server.url
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with GradWatch(run="wrong-path", url=server.url + "/api", spool_dir=tmp_path / "spool") as watch:
            for step in range(5):
                watch.step(grads(step))
            watch.flush(timeout=20)
    said = " ".join(str(warning.message) for warning in caught)
    assert "no gradwatch server at this path" in said and "refused the token" not in said
    assert f"gradwatch push {tmp_path / 'spool'} --url {server.url}" in said and f"{server.url}/api" not in \
        said.split("send them with:")[-1]


def test_the_push_hint_after_a_refused_token_carries_token(tmp_path):
    with ServerProcess(f"sqlite:///{tmp_path / 'token.db'}", extra_args=["--token", "sesame"]) as guarded:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with GradWatch(run="no-token", url=guarded.url, spool_dir=tmp_path / "spool") as watch:
                for step in range(5):
                    watch.step(grads(step))
                watch.flush(timeout=20)
    said = " ".join(str(warning.message) for warning in caught)
    assert "refused the token" in said
    assert f"--url {guarded.url} --token TOKEN" in said


def test_an_older_server_that_reads_only_json_gets_json_from_the_agent(tmp_path, monkeypatch):
    """The release 3c20f55 (before the binary wire) run from `git archive`: its handshake names
    no encodings, so the agent's transport sends binary batches as the same JSON (here from a
    spool of msgpack frames, through `gradwatch push`); all stored, NaN and tensor norms too."""
    import subprocess
    root = Path(__file__).resolve().parent.parent
    source, site = tmp_path / "release", tmp_path / "site" / "gradwatch"
    source.mkdir()
    site.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(root), "archive", "3c20f55"], capture_output=True)
    if archive.returncode != 0:
        missing("the release commit 3c20f55 is not in this clone's history (clone without --depth)")
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive.stdout, check=True)
    for part in ("clip", "agent", "server", "dashboard"):
        (site / part).symlink_to(source / part)
    run = "to-an-old-server"
    spool = Spool(tmp_path / "spool")
    norms = np.arange(10, dtype=np.float32).reshape(5, 2)
    spool.append(msgpack.packb({"run": run, "batch": {
        "step": typed_array(np.arange(5, dtype=np.int64)),
        "pre_norm": typed_array(np.array([1, np.nan, 2, np.inf, 3], np.float32)),
        "clipped": typed_array(np.array([True, False, True, False, False])),
        "tensor_norms": {"names": ["w", "b"], "norms": typed_array(norms)}}}), 5)
    spool.close()
    monkeypatch.setenv("PYTHONPATH", str(site.parent))  # the server process imports the release
    with ServerProcess(f"sqlite:///{tmp_path / 'old.db'}", cli_module="gradwatch.server.cli") as old:
        monkeypatch.delenv("PYTHONPATH")
        _, stats = push(tmp_path / "spool", old.url, timeout=60)
        assert stats.accepted == 5
        series = get(f"{old.url}/api/runs/{run}/series?fields=pre_norm,clipped")
        assert series["pre_norm"] == [1.0, "NaN", 2.0, "Infinity", 3.0]
        assert series["clipped"] == [True, False, True, False, False]
        tensors = get(f"{old.url}/api/runs/{run}/tensors")
        assert tensors["names"] == ["w", "b"] and tensors["norms"] == norms.T.tolist()  # a row per tensor

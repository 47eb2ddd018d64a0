"""Grouped tensors are linear in tensors and groups (issue 19, item 3): no tensors x groups
matrix, a too-large answer is a 422 naming the limit, never a 500. Group norms checked
against plain NumPy; memory by tracemalloc (NumPy reports its buffers) and by the real
server's peak RSS."""
from __future__ import annotations

import tracemalloc
from pathlib import Path

import httpx
import numpy as np
import pytest

from gradwatch.server.analysis import tensor_groups as tg
from gradwatch.server.wire import parse_batch
from gradwatch.server.storage import Store, create_schema, make_engine
from tests.test_server_support import start_server


def reference_group_norms(norms, absent, index, groups):
    """Each step's L2 of the reported member norms, a loop per group: NaN if a reported member
    is NaN, else +Inf if one is infinite; missing when no member reported."""
    values = np.full((len(norms), groups), np.nan)
    missing = np.ones((len(norms), groups), bool)
    for g in range(groups):
        columns = np.flatnonzero(index == g)
        for s in range(len(norms)):
            reported = [float(norms[s, c]) for c in columns if not absent[s, c]]
            if not reported:
                continue
            missing[s, g] = False
            if any(np.isnan(r) for r in reported):
                values[s, g] = np.nan
            elif any(np.isinf(r) for r in reported):
                values[s, g] = np.inf
            else:
                values[s, g] = np.sqrt(sum(r * r for r in reported))
    return values, missing


def test_group_norms_match_a_loop_with_gaps_non_finite_and_empty_groups():
    rng = np.random.default_rng(3)
    steps, tensors, groups = 40, 23, 9       # group 8 has no member: missing everywhere
    index = rng.integers(0, 8, tensors)
    norms = rng.uniform(0.1, 3.0, (steps, tensors)).astype(np.float32)
    absent = rng.random((steps, tensors)) < 0.2
    norms[5, 3], norms[6, 4], norms[7, 5] = np.nan, np.inf, -np.inf
    absent[9, index == 2] = True            # a group none of whose tensors reported
    absent[11, 7], norms[11, 7] = True, np.nan   # an absent NaN adds nothing
    values, missing = tg.group_norms(norms, absent, index, groups, cells=50)   # several blocks
    expected, expected_missing = reference_group_norms(norms, absent, index, groups)
    np.testing.assert_array_equal(missing, expected_missing)
    assert missing[:, 8].all() and missing[9, 2]
    np.testing.assert_allclose(values[~missing], expected[~missing], rtol=1e-6)   # NaN == NaN, Inf == Inf
    assert values.dtype == np.float32


def test_sixteen_thousand_blocks_never_allocate_tensors_by_groups():
    """16,000 tensors `layers.{i}.w`, one block each: the dense one-hot was 16,000 x 16,000
    float32 (1 GB); the linear reduction allocates a few copies of the norms."""
    n, steps = 16_000, 32
    names = [f"layers.{i}.w" for i in range(n)]
    norms = np.random.default_rng(4).uniform(0.5, 2.0, (steps, n)).astype(np.float32)
    absent = np.zeros(norms.shape, bool)
    tracemalloc.start()
    try:
        answer = tg.grouped_answer(names, np.arange(steps), norms, absent, "block", points=500)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert answer["names"] == [f"layers.{i}" for i in range(n)]
    assert answer["members"] == [[name] for name in names]
    np.testing.assert_allclose(np.array(answer["norms"], dtype=np.float64), norms.T, rtol=1e-6)
    assert peak < 64 * 2**20, f"grouping 16,000 tensors peaked at {peak / 2**20:.0f} MiB"


def test_an_answer_over_the_group_norm_limit_is_refused_naming_it(tmp_path, monkeypatch):
    engine = make_engine(f"sqlite:///{tmp_path / 'limit.db'}")
    create_schema(engine)
    store = Store(engine)
    names = [f"layers.{i}.w" for i in range(50)]
    store.ingest("wide", parse_batch({"step": list(range(20)), "pre_norm": [1.0] * 20,
                                      "tensor_norms": {"names": names, "norms": [[1.0] * 50] * 20}}))
    run_id = store.run_id("wide")
    monkeypatch.setattr(tg, "MAX_GROUP_NORMS", 999)    # 20 steps x 50 blocks = 1,000
    with pytest.raises(tg.TooManyGroupNorms, match="over the limit of 999") as refused:
        tg.grouped_json(store, run_id, None, None, "block", 500)
    assert refused.value.status == 422
    monkeypatch.setattr(tg, "MAX_GROUP_NORMS", 1000)
    assert len(tg.orjson.loads(tg.grouped_json(store, run_id, None, None, "block", 500))["names"]) == 50
    engine.dispose()


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _post_names(client: httpx.Client, run: str, count: int, steps: int, rng) -> np.ndarray:
    norms = np.round(rng.uniform(0.5, 2.0, (steps, count)), 3)
    body = {"step": list(range(steps)), "pre_norm": [1.0] * steps,
            "tensor_norms": {"names": [f"layers.{i}.w" for i in range(count)], "norms": norms.tolist()}}
    answer = client.post(f"/api/runs/{run}/steps", json=body)
    assert answer.status_code == 200, answer.text
    return norms


@pytest.mark.slow
def test_many_tensor_names_grouped_through_the_server(tmp_path):
    """The issue's probe: 16,000 names over 32 steps answer within +100 MB of server peak RSS
    (it took +990 MB), each block's row its one tensor's norms; 100,000 names answer (or a
    4xx naming a limit), never a 500."""
    server = start_server(f"sqlite:///{tmp_path / 'names.db'}", tmp_path)
    pid = server.process.pid
    rng = np.random.default_rng(5)
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            sent = _post_names(client, "names16k", 16_000, 32, rng)
            Path(f"/proc/{pid}/clear_refs").write_text("5")     # reset the peak RSS to the current
            before = _rss_kib(pid)
            answer = client.get("/api/runs/names16k/tensors", params={"group": "block"})
            assert answer.status_code == 200, answer.text
            grown_mib = (_peak_rss_kib(pid) - before) / 1024
            data = answer.json()
            assert data["names"] == [f"layers.{i}" for i in range(16_000)]
            assert data["members"] == [[f"layers.{i}.w"] for i in range(16_000)]
            assert data["step"] == list(range(32))
            np.testing.assert_allclose(np.array(data["norms"], dtype=np.float64), sent.T, rtol=1e-6)
            assert grown_mib <= 100, f"+{grown_mib:.0f} MiB"
            print(f"16,000 names grouped: server peak RSS +{grown_mib:.0f} MiB")

            _post_names(client, "names100k", 100_000, 4, rng)
            answer = client.get("/api/runs/names100k/tensors", params={"group": "block"})
            assert answer.status_code == 200 or (400 <= answer.status_code < 500 and
                                                 "limit" in answer.json()["detail"]), answer.text
            if answer.status_code == 200:
                assert len(answer.json()["names"]) == 100_000
    finally:
        server.stop()

"""Two real ranks (MLX ring backend on localhost): every rank computes the same global norm,
only rank 0 streams by default; `all_ranks=True` streams each rank as `<run>-rank<r>`."""
from __future__ import annotations

import json
import textwrap
import urllib.request
from pathlib import Path

import pytest

from tests.procs import ServerProcess, launch_two_ranks

ROOT = Path(__file__).resolve().parent.parent

RANK_SCRIPT = textwrap.dedent("""
    import sys
    import mlx.core as mx
    import numpy as np
    from gradwatch.agent import GradWatch
    from gradwatch.clip import GlobalNorm

    url, spool_root, all_ranks = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    group = mx.distributed.init(strict=True)
    rank = group.rank()
    rng = np.random.default_rng(rank)
    shards = [{"w": mx.array(rng.standard_normal(4 + rank).astype(np.float32))} for _ in range(20)]
    with GradWatch("dist", url=url, clipper=GlobalNorm(1.0, group=group), all_ranks=all_ranks,
                   spool_dir=f"{spool_root}/rank{rank}") as watch:
        for shard in shards:
            mx.eval(watch.step(shard, loss=mx.array(float(rank))))
        assert watch.flush(timeout=30)
    print(f"rank {rank} recorded={watch.stats.recorded} acked={watch.stats.acked} run={watch.run}", flush=True)
""")


def series(server: ServerProcess, run: str) -> dict:
    with urllib.request.urlopen(f"{server.url}/api/runs/{run}/series?points=1000&fields=pre_norm,loss",
                                timeout=30) as answer:
        return json.loads(answer.read())


@pytest.mark.slow
@pytest.mark.parametrize("all_ranks", [False, True])
def test_only_rank_zero_streams_unless_all_ranks(tmp_path, all_ranks):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    with ServerProcess(f"sqlite:///{tmp_path / 'db.sqlite'}") as server:
        result = launch_two_ranks(script, server.url, str(tmp_path / "spool"), "1" if all_ranks else "0",
                                  cwd=ROOT)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-3000:]
        with urllib.request.urlopen(server.url + "/api/runs", timeout=30) as answer:
            runs = {run["name"]: run for run in json.loads(answer.read())}
        if not all_ranks:
            assert set(runs) == {"dist"} and runs["dist"]["steps"] == 20
            assert "rank 1 recorded=0" in output
        else:
            assert set(runs) == {"dist-rank0", "dist-rank1"}, output[-3000:]
            zero, one = series(server, "dist-rank0"), series(server, "dist-rank1")
            # The same global norm on every rank; each rank's own loss.
            assert zero["pre_norm"] == one["pre_norm"] and len(zero["step"]) == 20
            assert set(zero["loss"]) == {0.0} and set(one["loss"]) == {1.0}
            with urllib.request.urlopen(server.url + "/api/runs/dist-rank1", timeout=30) as answer:
                meta = json.loads(answer.read())["meta"]
            assert meta["rank"] == 1 and meta["world_size"] == 2

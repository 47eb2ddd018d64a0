"""`group=`: two real ranks over MLX's ring backend on localhost, each with its own shard."""
from __future__ import annotations

from pathlib import Path

from tests.procs import launch_two_ranks

ROOT = Path(__file__).resolve().parent.parent


def run_two_ranks(script: str):
    return launch_two_ranks(ROOT / "tests" / script, cwd=ROOT, timeout=120)


def test_global_norm_over_two_ranks_equals_numpy_norm_of_all_shards():
    result = run_two_ranks("dist_global_norm.py")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "rank 0/2" in output and "rank 1/2" in output, output
    assert output.count(" OK") == 2 and "MISMATCH" not in output, output

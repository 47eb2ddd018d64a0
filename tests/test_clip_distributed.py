"""`group=`: two real ranks over MLX's ring backend on localhost, each with its own shard."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.procs import free_port

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = Path(sys.executable).with_name("mlx.launch")


def run_two_ranks(script: str) -> subprocess.CompletedProcess:
    command = [str(LAUNCH) if LAUNCH.exists() else sys.executable, "-n", "2", "--backend", "ring",
               "--python", sys.executable, str(ROOT / "tests" / script)]
    if not LAUNCH.exists():
        command[1:1] = ["-m", "mlx.launch"]
    for _ in range(3):  # the ring listens on port and port + 1; retry if another process took one
        port = free_port()
        result = subprocess.run(command[:-1] + ["--starting-port", str(port), command[-1]],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
        if result.returncode == 0 or "ddress already in use" not in result.stderr:
            return result
    return result


def test_global_norm_over_two_ranks_equals_numpy_norm_of_all_shards():
    result = run_two_ranks("dist_global_norm.py")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "rank 0/2" in output and "rank 1/2" in output, output
    assert output.count(" OK") == 2 and "MISMATCH" not in output, output

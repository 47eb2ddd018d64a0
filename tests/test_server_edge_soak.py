"""`benchmarks/edge_soak.py --short` in CI: every fault case of issue 19 against a real
server, at a small size, answered right with a normal client served meanwhile."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_edge_soak_short_answers_every_case_right(tmp_path):
    rows_file = tmp_path / "rows.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "edge_soak.py"), "--short",
                             "--json", str(rows_file)], capture_output=True, text=True, timeout=580, cwd=ROOT)
    import json

    rows = json.loads(rows_file.read_text())
    assert len(rows) == 9, result.stdout + result.stderr
    wrong = [(row["case"], row["detail"], row["normal"]) for row in rows
             if not row["right"] or not row["normal"].startswith("yes")]
    assert wrong == [], result.stdout
    assert result.returncode == 0, result.stdout + result.stderr

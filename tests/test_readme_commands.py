"""The README's commands run as written: its curl lines right after `gradwatch demo`, and its
mlx-lm snippet with mlx-lm's real trainer. Both are read from README.md, not copied here."""
from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests.procs import ServerProcess
from tests.test_cli_demo_process import Demo, port_is_free

README = Path(__file__).resolve().parent.parent / "README.md"


def code_block(after_heading: str, language: str) -> str:
    """The first ```language block after the heading line `after_heading`."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n{after_heading}\n")
    block = re.compile(rf"```{language}\n(.*?)```", re.S).search(text, start)
    assert block, f"no {language} block after {after_heading!r}"
    return block.group(1)


@pytest.mark.slow
def test_readme_curl_lines_run_against_a_demo_run(tmp_path):
    script = code_block("## The REST API", "bash")
    assert re.search(r"^RUN=\S+", script, re.M) and script.count("curl ") >= 10
    demo = Demo(tmp_path, "--steps", "300")
    try:
        run = demo.wait_for("run name: ").removeprefix("run name: ")
        demo.wait_for("serving http://127.0.0.1:")
        # As a reader does: RUN set to the name the demo printed; only the port is the test's own.
        lines = re.sub(r"^RUN=\S+", f"RUN={run}", script, flags=re.M).replace("localhost:8765",
                                                                              f"localhost:{demo.port}")
        prelude = ("set -euo pipefail\nWRITE_TOKEN=\n"
                   "curl() { command curl --fail --show-error --max-time 60 \"$@\"; }\n")
        done = subprocess.run(["bash", "-c", prelude + lines], capture_output=True, text=True, timeout=300,
                              cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f'"name":"{run}"' in done.stdout and '"threshold"' in done.stdout
        assert '"accepted":2' in done.stdout and '"deleted":"my-run"' in done.stdout
        with open(tmp_path / f"{run}.csv", newline="") as exported:
            rows = list(csv.reader(exported))
        assert rows[0][0] == "step" and len(rows) == 1 + 300
        demo.process.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=120) == 128 + signal.SIGTERM
        assert port_is_free(demo.port)
    finally:
        demo.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_readme_mlx_lm_snippet_runs_with_mlx_lms_trainer(tmp_path):
    from tests.test_integration_mlx_lm import dataset, tiny_llama

    snippet = code_block("### mlx-lm's trainer", "python")
    assert "import" in snippet and "url=" in snippet
    with ServerProcess(f"sqlite:///{tmp_path / 'lm.db'}") as server:
        # The reader's own model and datasets; a short run; the test server's address.
        code = (snippet.replace("iters=1000", "iters=6")
                .replace('"adapters.safetensors"', repr(str(tmp_path / "adapters.safetensors")))
                .replace("http://127.0.0.1:8765", server.url))
        assert code != snippet
        namespace = {"model": tiny_llama(), "train_set": dataset(), "val_set": dataset(8, seed=1)}
        previous = os.getcwd()
        os.chdir(tmp_path)  # the spool folder, if any, goes here
        try:
            exec(compile(code, "README.md (mlx-lm)", "exec"), namespace)
        finally:
            os.chdir(previous)
        import httpx

        series = httpx.get(f"{server.url}/api/runs/lora/series", params={"fields": "pre_norm"}, timeout=30).json()
    assert series["step"] == list(range(6))  # one record per optimizer update, all acknowledged at close

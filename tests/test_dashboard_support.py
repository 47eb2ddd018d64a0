"""Helpers shared by the dashboard tests and benchmarks/dashboard_bench.py (no tests here)."""
from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

import numpy as np

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
TENSOR_NAMES = [f"layers.{i}.weight" for i in range(6)] + ["embed.weight", "head.bias"]
SPIKY_TENSOR = "layers.3.weight"


def post_steps(url: str, run: str, batch: dict, token: str | None = None) -> dict:
    body = json.dumps(batch).encode()
    request = urllib.request.Request(f"{url}/api/runs/{urllib.parse.quote(run, safe='')}/steps", data=body,
                                     headers={"Content-Type": "application/json"}, method="POST")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read())


def get_json(url: str, path: str, token: str | None = None):
    request = urllib.request.Request(url + path, headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read())


@dataclass
class SyntheticRun:
    """A run's columns as posted, kept to compare what the page shows with numpy."""
    steps: np.ndarray
    pre_norm: np.ndarray  # NaN where non-finite
    threshold: float
    spike_steps: list[int] = field(default_factory=list)
    nonfinite_steps: list[int] = field(default_factory=list)

    @property
    def finite_norms(self) -> np.ndarray:
        return self.pre_norm[np.isfinite(self.pre_norm)]


def synthetic_batch(start: int, count: int, seed: int = 0, threshold: float = 2.0,
                    spike_every: int = 400, nonfinite_every: int = 700, tensors: bool = True):
    """Log-normal norms with a decaying warm-up, spikes every `spike_every` steps (driven by
    SPIKY_TENSOR), a NaN every `nonfinite_every` steps. Returns (wire batch, SyntheticRun)."""
    rng = np.random.default_rng(seed + start)
    steps = np.arange(start, start + count, dtype=np.int64)
    pre = np.exp(rng.normal(0.0, 0.3, count)) * (1.0 + 2.0 * np.exp(-steps / 300.0))
    spike = (steps % spike_every) == spike_every // 2
    pre[spike] *= 25.0
    nonfinite = (steps % nonfinite_every) == nonfinite_every - 1
    pre[nonfinite] = np.nan
    clipped = np.where(np.isfinite(pre), pre > threshold, False)
    loss = 3.0 * np.exp(-steps / 800.0) + 0.1 + rng.normal(0, 0.01, count)
    batch = {
        "step": steps.tolist(),
        "pre_norm": ["NaN" if not np.isfinite(v) else float(v) for v in pre],
        "post_norm": ["NaN" if not np.isfinite(v) else float(min(v, threshold)) for v in pre],
        "threshold": [threshold] * count,
        "clipped": clipped.tolist(),
        "loss": loss.tolist(),
        "spike": spike.tolist(),
        "nonfinite": nonfinite.tolist(),
    }
    if tensors:
        norms = np.abs(rng.normal(1.0, 0.05, (count, len(TENSOR_NAMES))))
        norms[spike, TENSOR_NAMES.index(SPIKY_TENSOR)] *= 40.0
        norms[nonfinite, :] = np.nan
        batch["tensor_norms"] = {"names": TENSOR_NAMES,
                                 "norms": [["NaN" if not np.isfinite(v) else float(v) for v in row] for row in norms]}
    run = SyntheticRun(steps, pre, threshold, steps[spike].tolist(), steps[nonfinite].tolist())
    return batch, run


def wait_until(page, expression: str, timeout: float = 15.0, what: str | None = None):
    """Poll a JS expression with page.evaluate (which CSP allows; Playwright's
    wait_for_function evaluates strings inside the page, which `script-src 'self'` forbids)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = page.evaluate(expression)
        if last:
            return last
        time.sleep(0.03)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or expression} (last value {last!r})")


def launch_chromium(playwright, executable_path: str):
    return playwright.chromium.launch(executable_path=executable_path, args=CHROMIUM_ARGS)

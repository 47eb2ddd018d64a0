"""Run every gradwatch benchmark and print one table of figures.

    python -m benchmarks            # all of them
    python -m benchmarks clip agent # a subset, by short name

Each benchmark module exposes `main() -> dict` of figures and prints its own
details. Every benchmark runs in its own process (fresh memory, no state
shared between them); this script collects the dicts and prints them as one
table, with the machine they ran on.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = {
    "clip": "benchmarks.clip_bench",
    "agent": "benchmarks.agent_bench",
    "ingest": "benchmarks.ingest_bench",
    "server": "benchmarks.server_bench",
    "dashboard": "benchmarks.dashboard_bench",
}
_RUNNER = (
    "import importlib, json, sys\n"
    "module, out_path = sys.argv[1:3]\n"
    "sys.argv = [module]  # benchmarks that parse their own flags see none: their defaults\n"
    "figures = importlib.import_module(module).main()\n"
    "open(out_path, 'w').write(json.dumps(figures, default=str))\n"
)


def machine_description() -> str:
    import mlx.core as mx

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}), "
            f"Python {platform.python_version()}, MLX {mx.__version__} ({mx.default_device()})")


def run_one(module: str) -> tuple[dict | None, float, str]:
    """Run one benchmark module in a child process; returns (figures, seconds, error)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out_path = handle.name
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _RUNNER, module, out_path], cwd=ROOT)
    elapsed = time.perf_counter() - started
    try:
        if result.returncode != 0:
            return None, elapsed, f"exit code {result.returncode}"
        return json.loads(Path(out_path).read_text()), elapsed, ""
    finally:
        os.unlink(out_path)


def format_value(value) -> str:
    if isinstance(value, float):
        if value != value or abs(value) >= 1e5 or (value and abs(value) < 1e-3):
            return f"{value:.4g}"
        return f"{value:,.3f}".rstrip("0").rstrip(".")
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_table(results: dict[str, tuple[dict | None, float, str]]) -> None:
    rows = [("benchmark", "figure", "value")]
    for name, (figures, elapsed, error) in results.items():
        if figures is None:
            rows.append((name, "FAILED", error))
            continue
        for key, value in figures.items():
            rows.append((name, key, format_value(value)))
        rows.append((name, "(benchmark wall time, s)", f"{elapsed:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    line = "+".join("-" * (w + 2) for w in widths)
    print()
    print(f"gradwatch benchmarks on {machine_description()}")
    print(line)
    for index, row in enumerate(rows):
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        if index == 0:
            print(line)
    print(line)


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or list(BENCHMARKS)
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}",
              file=sys.stderr)
        return 2
    results = {}
    for name in names:
        print(f"== {name} ({BENCHMARKS[name]})", flush=True)
        results[name] = run_one(BENCHMARKS[name])
    print_table(results)
    return 0 if all(figures is not None for figures, _, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

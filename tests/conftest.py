"""Shared test fixtures: free ports, a throwaway PostgreSQL cluster, Chromium.

Everything here starts real processes. Nothing is mocked: PostgreSQL is a
real cluster under a temporary folder, Chromium is Debian's binary. When a
piece is missing, tests that need it fail with a message saying what to
install (under `GRADWATCH_CI=1`, set by `.ci/run`) or are skipped with that
message when a developer runs a subset locally without it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.procs import free_port

IN_CI = os.environ.get("GRADWATCH_CI") == "1"
CHROMIUM = os.environ.get("GRADWATCH_CHROMIUM", "/usr/bin/chromium")
OUTPUT_DIR = Path(__file__).resolve().parent.parent / "test-output"


def missing(what: str) -> None:
    """Fail in CI, skip elsewhere: CI must run every test."""
    if IN_CI:
        pytest.fail(f"{what} (CI must run this test)")
    pytest.skip(what)


def _postgres_bin() -> Path | None:
    for version_dir in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (version_dir / "postgres").exists():
            return version_dir
    return None


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A SQLAlchemy URL for a fresh PostgreSQL database on 127.0.0.1.

    `GRADWATCH_TEST_POSTGRES_URL` points at an existing server; otherwise a
    temporary cluster is initialised and started for this test session.
    """
    given = os.environ.get("GRADWATCH_TEST_POSTGRES_URL")
    if given:
        yield given
        return
    bin_dir = _postgres_bin()
    if bin_dir is None:
        missing("PostgreSQL server binaries not found (apt-get install -y postgresql)")
    # Not under pytest's temp folder: that is 0700 and initdb runs as `postgres`.
    data_dir = Path(tempfile.mkdtemp(prefix="gradwatch-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(data_dir, "postgres")
        os.chmod(data_dir, 0o700)
        run_as = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run(run_as + [str(bin_dir / "initdb"), "-D", str(data_dir), "-A", "trust",
                             "-U", "postgres", "--no-sync"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(run_as + [str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-w", "-l",
                             str(data_dir / "server.log"), "-o",
                             f"-h 127.0.0.1 -p {port} -k {data_dir} -c fsync=off "
                             f"-c max_connections=200", "start"],
                   check=True, stdout=subprocess.DEVNULL)
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(run_as + [str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-m", "immediate",
                                 "stop"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def chromium_path() -> str:
    if not Path(CHROMIUM).exists():
        missing(f"{CHROMIUM} not found (apt-get install -y chromium)")
    return CHROMIUM


@pytest.fixture(scope="session")
def output_dir() -> Path:
    """Where tests keep artefacts worth looking at (screenshots, reports)."""
    OUTPUT_DIR.mkdir(exist_ok=True)
    return OUTPUT_DIR

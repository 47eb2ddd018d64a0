"""The distribution installs the four folders under the `gradwatch` namespace only."""
import importlib
import subprocess
import sys


def test_subpackages_import_under_gradwatch_namespace():
    for name in ("gradwatch.clip", "gradwatch.agent", "gradwatch.server", "gradwatch.dashboard"):
        importlib.import_module(name)


def test_no_bare_top_level_modules_installed(tmp_path):
    # Run from an empty folder so the checkout itself is not on sys.path.
    code = (
        "import importlib.util, sys;"
        "sys.exit(any(importlib.util.find_spec(m) for m in ('clip', 'agent', 'server', 'dashboard')))"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=tmp_path).returncode == 0


def test_cli_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "gradwatch.server.cli", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for command in ("serve", "demo", "recommend", "push", "report"):
        assert command in out

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
    out = subprocess.run([sys.executable, "-m", "gradwatch.server.commands.cli", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for command in ("serve", "demo", "recommend", "push", "report"):
        assert command in out


def test_server_never_imports_the_agent_clip_or_mlx():
    """docs/architecture.md: the wire format is the only contract between agent and server. The
    one piece of `clip` the server may share is the spike rule in plain NumPy (`clip/spike_rule.py`),
    loaded without MLX."""
    code = (
        "import sys, gradwatch.server.app.factory, gradwatch.server.commands.cli, gradwatch.server.commands.demo, "
        "gradwatch.server.commands.report, gradwatch.server.commands.recommend\n"
        "shared = {'gradwatch.clip', 'gradwatch.clip.spike_rule'}\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('gradwatch.agent', 'gradwatch.clip', 'mlx'))"
        " and m not in shared)\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_demo_steps_must_be_positive():
    result = subprocess.run([sys.executable, "-m", "gradwatch.server.commands.cli", "demo", "--steps", "0"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "must be at least 1, got 0" in result.stderr

"""server/ in rooms (issue 23): the wheel holds every module and each imports from it; no module
of agent/ or server/ is over 500 lines; imports go one way (analysis knows nothing of HTTP or of
the app room; storage and the wire know nothing of the rooms above them).

The wheel is built from a copy of what the Dockerfile copies (pyproject.toml, README.md and the
four folders), installed with `pip install --no-deps --target`, and every module is imported in a
subprocess with that folder first on sys.path; each module's `__file__` must lie in it, so the
checkout (an editable install) cannot stand in for a package the wheel lacks.
"""
from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / "server"
MAX_LINES = 500
ROOMS = ("wire", "app", "analysis", "storage", "alerts", "commands")
# Alembic's env.py runs only inside Alembic (it reads `context.config` at import).
NOT_IMPORTABLE_ALONE = {"gradwatch.server.storage.migrations.env"}


def python_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: Path) -> str:
    rel = path.relative_to(SERVER).with_suffix("")
    parts = ["gradwatch", "server", *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports (top level or inside functions), relative ones resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def room_imports(room: str) -> dict[str, set[str]]:
    return {str(p.relative_to(ROOT)): imported_modules(p) for p in python_files(SERVER / room)}


def test_every_room_is_a_package_with_a_docstring():
    for room in ROOMS:
        init = SERVER / room / "__init__.py"
        assert init.is_file(), f"server/{room}/ is not a package"
        assert ast.get_docstring(ast.parse(init.read_text())), f"server/{room}/__init__.py has no docstring"
    top = sorted(p.name for p in SERVER.iterdir() if p.suffix == ".py")
    assert top == ["__init__.py"], f"modules outside the rooms: {top}"


def test_no_module_of_agent_or_server_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for folder in ("agent", "server")
            for p in python_files(ROOT / folder)
            if (n := p.read_text().count("\n")) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_analysis_knows_nothing_of_http_or_the_app_room():
    for path, modules in room_imports("analysis").items():
        bad = sorted(m for m in modules if m.split(".")[0] in ("fastapi", "starlette", "uvicorn")
                     or m == "gradwatch.server.app" or m.startswith("gradwatch.server.app.")
                     or m.startswith(("gradwatch.server.commands", "gradwatch.server.alerts")))
        assert not bad, f"{path} imports {bad}"
    # and loading the whole room pulls none of them in either
    names = [module_name(p) for p in python_files(SERVER / "analysis")]
    code = ("import json, sys\n" + "".join(f"import {n}\n" for n in names)
            + "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
              "('fastapi', 'starlette', 'uvicorn') or m.startswith('gradwatch.server.app'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_storage_and_wire_know_nothing_of_the_rooms_above():
    above = ("gradwatch.server.app", "gradwatch.server.analysis", "gradwatch.server.alerts",
             "gradwatch.server.commands")
    for room in ("storage", "wire"):
        for path, modules in room_imports(room).items():
            bad = sorted(m for m in modules if m.startswith(above) or m.split(".")[0] in ("fastapi", "starlette"))
            assert not bad, f"{path} imports {bad}"


@pytest.mark.slow
def test_wheel_holds_every_module_and_each_imports_from_it(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("clip", "agent", "server", "dashboard"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    wheels, target = tmp_path / "wheels", tmp_path / "target"
    subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
                    "--quiet", "-w", str(wheels)], cwd=source, check=True, capture_output=True)
    (wheel,) = wheels.glob("gradwatch-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)

    with zipfile.ZipFile(wheel) as archive:
        members = archive.namelist()
    in_wheel = {m[:-3].replace("/", ".").removesuffix(".__init__") for m in members if m.endswith(".py")}
    expected = {"gradwatch." + str(p.relative_to(ROOT).with_suffix("")).replace("/", ".").removesuffix(".__init__")
                for folder in ("clip", "agent", "server", "dashboard") for p in python_files(ROOT / folder)}
    assert expected - in_wheel == set(), f"missing from the wheel: {sorted(expected - in_wheel)}"
    assert "gradwatch/server/storage/migrations/script.py.mako" in members
    assert "gradwatch/dashboard/index.html" in members

    names = sorted(in_wheel - NOT_IMPORTABLE_ALONE)
    code = (
        "import importlib, json, sys\n"
        f"sys.path.insert(0, {str(target)!r})\n"
        f"names = {names!r}\n"
        "bad = {}\n"
        "for name in names:\n"
        "    try:\n"
        "        module = importlib.import_module(name)\n"
        f"        if not str(getattr(module, '__file__', '')).startswith({str(target)!r}):\n"
        "            bad[name] = 'imported from ' + str(getattr(module, '__file__', None))\n"
        "    except Exception as exc:\n"
        "        bad[name] = f'{type(exc).__name__}: {exc}'\n"
        "print(json.dumps(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}

    # the entry point names a module the wheel holds
    with zipfile.ZipFile(wheel) as archive:
        entry = next(archive.read(m).decode() for m in members if m.endswith("entry_points.txt"))
    assert "gradwatch = gradwatch.server.commands.cli:main" in entry

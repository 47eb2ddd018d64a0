"""The docs name only what the repository has and say what the server says."""
from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

from tests.procs import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("agent", "clip", "server", "dashboard", "docs", "tests", "benchmarks", "examples")


def text_files():
    yield ROOT / "README.md"
    for folder in ("docs", "server", "tests", "dashboard", "examples", "agent", "clip"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".md", ".js", ".html", ".txt") and "__pycache__" not in path.parts:
                yield path


def test_no_reference_to_files_the_repository_does_not_contain():
    missing_design = "DESIGN" + ".md"  # spelled apart so that this file does not name it
    assert not (ROOT / missing_design).exists()
    naming = [str(path.relative_to(ROOT)) for path in text_files()
              if missing_design in path.read_text(encoding="utf-8", errors="replace")]
    assert naming == []


def test_every_path_in_the_architecture_page_exists():
    page = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    paths = {match for match in re.findall(r"`([\w./-]+)`", page)
             if "/" in match and match.split("/")[0] in FOLDERS}
    assert len(paths) > 40
    absent = sorted(path for path in paths if not (ROOT / path).exists())
    assert absent == []
    # The page is structured by folder: one section per top-level folder.
    for folder in ("clip", "agent", "server", "dashboard"):
        assert f"### `{folder}/`" in page


def test_install_lines_work_from_a_clone():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "pip install 'gradwatch[" not in readme and "pip install gradwatch" not in readme
    extras = re.findall(r"pip install -e '\.\[([\w,-]+)\]'", readme)
    declared = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert {"dev", "mlx-lm", "postgres"} <= set(extras)
    for extra in extras:
        assert re.search(rf"^{re.escape(extra)} = \[", declared, re.M), extra


def test_wire_page_lists_healthz_once_as_the_server_answers_it(tmp_path):
    page = (ROOT / "docs" / "wire.md").read_text(encoding="utf-8")
    entries = re.findall(r"^- `GET /healthz` → `(\{.*?\})`", page, re.M)
    assert len(entries) == 1 and page.count("GET /healthz") == 1
    documented = json.loads(entries[0].replace('"sqlite" | "postgresql"', '"sqlite"'))
    with ServerProcess(f"sqlite:///{tmp_path / 'h.db'}") as server:
        with urllib.request.urlopen(server.url + "/healthz", timeout=30) as answer:
            said = json.loads(answer.read())
    assert {key: said.get(key) for key in documented} == documented
    # A field the server adds is documented on the page too.
    assert [key for key in said if f"`{key}" not in page and f'"{key}"' not in page] == []

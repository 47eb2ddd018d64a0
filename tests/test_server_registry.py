"""One column registry: the agent's and the dashboard's column lists must equal it.

The agent (`agent/wire.py`) must not import the server, and the dashboard is
plain JavaScript, so each keeps its own list; this test is what holds them
together: a column added in one place only fails here.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

from gradwatch.server.storage import registry

ROOT = Path(__file__).resolve().parent.parent
# The agent names these two from the record itself, outside its value-column lists
# (agent/sender.py builds "step" and "time" first).
AGENT_RECORD_FIELDS = {"step": "int", "time": "float"}


def agent_columns() -> dict[str, str]:
    """FLOAT_COLUMNS / BOOL_COLUMNS of agent/wire.py, read as source (no import of the agent)."""
    tree = ast.parse((ROOT / "agent" / "wire.py").read_text())
    found: dict[str, tuple] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("FLOAT_COLUMNS", "BOOL_COLUMNS"):
                found[node.targets[0].id] = ast.literal_eval(node.value)
    assert set(found) == {"FLOAT_COLUMNS", "BOOL_COLUMNS"}, found
    out = dict(AGENT_RECORD_FIELDS)
    for kind, names in (("float", found["FLOAT_COLUMNS"]), ("bool", found["BOOL_COLUMNS"])):
        for name in names:
            assert name not in out, f"agent lists {name!r} twice"
            out[name] = kind
    return out


def dashboard_columns() -> dict[str, str]:
    """`export const STEP_COLUMNS = { name: 'type', ... };` of dashboard/columns.js, parsed as text."""
    text = (ROOT / "dashboard" / "columns.js").read_text()
    match = re.search(r"export const STEP_COLUMNS = \{(.*?)\};", text, re.S)
    assert match, "dashboard/columns.js must export STEP_COLUMNS as an object literal"
    entries = [line.strip() for line in match.group(1).splitlines() if line.strip()]
    out: dict[str, str] = {}
    for entry in entries:
        item = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*): '(int|float|bool)',?", entry)
        assert item, f"unexpected line in dashboard/columns.js: {entry!r}"
        assert item.group(1) not in out, f"dashboard lists {item.group(1)!r} twice"
        out[item.group(1)] = item.group(2)
    return out


def registry_columns() -> dict[str, str]:
    return {column.name: column.type for column in registry.STEP_COLUMNS}


def test_agent_columns_equal_the_registry():
    assert agent_columns() == registry_columns()


def test_dashboard_columns_equal_the_registry_in_order():
    assert list(dashboard_columns().items()) == list(registry_columns().items())


def test_dashboard_takes_its_column_types_from_columns_js():
    """The module that parses series imports the types; no module lists the booleans again."""
    series = (ROOT / "dashboard" / "series.js").read_text()
    assert "from './columns.js'" in series
    for path in (ROOT / "dashboard").glob("*.js"):
        if path.name.endswith(".min.js"):
            continue
        assert not re.search(r"BOOL_COLUMNS = new Set\(\[", path.read_text()), f"{path.name} lists booleans"


def test_every_registry_column_is_stored_as_its_own_chunk_column(tmp_path):
    """A batch with every registry column lands as one `chunk_columns` row per column (and the
    steps), each holding the storage its type asks for, read here with plain sqlite3."""
    import sqlite3

    import numpy as np

    from gradwatch.server.storage.chunks import column_storage
    from gradwatch.server.wire import parse_batch
    from gradwatch.server.storage import Store, create_schema, make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    create_schema(engine)
    batch = {"step": [0, 1, 2]}
    for column in registry.STEP_COLUMNS[1:]:
        batch[column.name] = {"float": [0.5, 1.5, 2.5], "bool": [True, False, True], "int": [1, 2, 3]}[column.type]
    Store(engine).ingest("r", parse_batch(batch))
    engine.dispose()
    with sqlite3.connect(tmp_path / "r.db") as connection:
        stored = dict(connection.execute("SELECT name, data FROM chunk_columns").fetchall())
    assert set(stored) == set(registry.COLUMNS)
    expected = {"float": "float32", "bool": "bool", "int": "int32"}
    for column in registry.STEP_COLUMNS[1:]:
        assert column_storage(stored[column.name]) == expected[column.type], column.name
    assert np.array_equal(np.frombuffer(stored["step"][1:], "<u2"), [0, 1, 2])


def test_nan_bits_keep_their_positions():
    """A float's bit in `nan_mask` is stored data: appending a column must not move one."""
    assert registry.NAN_BITS == {"pre_norm": 1, "post_norm": 2, "scale": 4, "threshold": 8, "loss": 16,
                                 "lr": 32, "z": 64, "ema": 128, "time": 256, "robust_z": 512}
    assert max(registry.NAN_BITS.values()) < 2**15  # nan_mask is a SMALLINT


def test_the_new_diagnostics_columns_and_event_kinds_are_registered():
    assert registry_columns()["skipped"] == "bool" and registry_columns()["level_shift"] == "bool"
    assert registry_columns()["robust_z"] == "float"
    assert all(registry.column(name).optional for name in ("skipped", "robust_z", "level_shift"))
    assert {"level_shift", "skipped", "loss_spike", "alert"} <= set(registry.EVENT_KIND_NAMES)
    assert [c.name for c in registry.STEP_COLUMNS if not c.optional] == ["step", "pre_norm"]
    assert registry.column("pre_norm").nonfinite == "strings" and registry.column("clipped").nonfinite is None

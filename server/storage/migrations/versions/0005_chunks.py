"""Schema 4 -> 5: steps and per-tensor norms move from a row per step into chunks.

Creates `chunks`, `chunk_columns`, `chunk_summaries`, `tensor_chunks` and
`tensor_summaries`, then copies every run: `steps` is read in pages of
100,000 rows ordered by step, a page's rows become chunks (the rows of its
last, possibly unfinished chunk wait for the next page), and the chunks and
their summaries are written with the run's `version`; per-tensor norms the
same way from `tensor_norms` + `tensor_layouts`. The copy checks that it wrote
as many steps as `runs.steps` says, prints its progress on stderr (a large
database takes a while: about 9 s per million steps here, benchmarks/migrate_bench.py), and drops the
old tables. One transaction with the rest of the upgrade: a failure leaves the
database at schema 4.

The old layout is spelled out here (its columns and their NaN bits), so this
revision does not change when the registry grows.

Revision ID: 0005
Revises: 0004
"""
import json
import sys
import time

import numpy as np
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

PAGE = 100_000
# The step columns at schema 4, in table order, and the float columns' bits in nan_mask.
OLD_COLUMNS = (("pre_norm", "float"), ("post_norm", "float"), ("scale", "float"), ("threshold", "float"),
               ("clipped", "bool"), ("loss", "float"), ("lr", "float"), ("z", "float"), ("ema", "float"),
               ("spike", "bool"), ("nonfinite", "bool"), ("time", "float"), ("skipped", "bool"),
               ("robust_z", "float"), ("level_shift", "bool"))
OLD_FLOATS = tuple(name for name, kind in OLD_COLUMNS if kind == "float")
NAN_BITS = {name: 1 << index for index, name in enumerate(OLD_FLOATS)}
OLD_SPEC = dict(OLD_COLUMNS)


def _create_tables() -> None:
    fk = sa.ForeignKey("runs.id")
    op.create_table("chunks",
                    sa.Column("run_id", sa.Integer, fk, primary_key=True),
                    sa.Column("chunk_id", sa.BigInteger, primary_key=True),
                    sa.Column("n", sa.Integer, nullable=False),
                    sa.Column("version", sa.BigInteger, nullable=False),
                    sa.Column("segments", sa.Integer, nullable=False),
                    sqlite_with_rowid=False)
    op.create_table("chunk_columns",
                    sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), primary_key=True),
                    sa.Column("name", sa.String(40), primary_key=True),
                    sa.Column("chunk_id", sa.BigInteger, primary_key=True),
                    sa.Column("seg", sa.Integer, primary_key=True),
                    sa.Column("data", sa.LargeBinary, nullable=False),
                    sqlite_with_rowid=False)
    op.create_table("chunk_summaries",
                    sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), primary_key=True),
                    sa.Column("width", sa.Integer, primary_key=True),
                    sa.Column("chunk_id", sa.BigInteger, primary_key=True),
                    sa.Column("data", sa.LargeBinary, nullable=False),
                    sqlite_with_rowid=False)
    op.create_table("tensor_chunks",
                    sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), primary_key=True),
                    sa.Column("chunk_id", sa.BigInteger, primary_key=True),
                    sa.Column("seg", sa.Integer, primary_key=True),
                    sa.Column("n", sa.Integer, nullable=False),
                    sa.Column("version", sa.BigInteger, nullable=False),
                    sa.Column("data", sa.LargeBinary, nullable=False))
    op.create_table("tensor_summaries",
                    sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), primary_key=True),
                    sa.Column("chunk_id", sa.BigInteger, primary_key=True),
                    sa.Column("seg", sa.Integer, primary_key=True),
                    sa.Column("data", sa.LargeBinary, nullable=False))


def _columns_of(rows: list[tuple]) -> tuple[np.ndarray, dict]:
    """Old rows (step, *OLD_COLUMNS, nan_mask) as steps and {name: (values, missing)}."""
    table = np.array(rows, dtype=np.float64)  # None -> NaN
    steps = np.array([row[0] for row in rows], dtype=np.int64)  # exact beyond 2**53
    nan_mask = np.array([row[-1] for row in rows], dtype=np.int64)
    columns = {}
    for position, (name, kind) in enumerate(OLD_COLUMNS, start=1):
        values = np.ascontiguousarray(table[:, position])
        null = np.array([row[position] is None for row in rows], dtype=bool)
        if kind == "float":
            missing = null & ((nan_mask & NAN_BITS[name]) == 0)
        else:
            missing = null
        columns[name] = (values, missing if missing.any() else None)
    return steps, columns


class _Progress:
    def __init__(self, runs: int, steps: int):
        self.runs, self.steps, self.done, self.started, self.said = runs, steps, 0, time.monotonic(), 0.0

    def add(self, steps: int, run: str, index: int) -> None:
        self.done += steps
        now = time.monotonic()
        if now - self.said >= 2.0 or self.done == self.steps:
            self.said = now
            print(f"gradwatch: moving steps into chunks: run {index}/{self.runs} ({run}), "
                  f"{self.done:,}/{self.steps:,} steps, {now - self.started:.0f} s", file=sys.stderr, flush=True)


def _copy_steps(cursor, rows_io, sql, run_id: int, version: int, progress: _Progress, run: str,
                index: int) -> int:
    from gradwatch.server.storage.chunks import series_from_arrays
    from gradwatch.server.storage.chunks.codec import CHUNK

    names = ", ".join(name for name, _ in OLD_COLUMNS)
    written = 0
    pending: list[tuple] = []
    after = -1
    while True:
        cursor.execute(sql(f"SELECT step, {names}, nan_mask FROM steps WHERE run_id = ? AND step > ? "
                           f"ORDER BY step LIMIT {PAGE}"), (run_id, after))
        page = cursor.fetchall()
        rows = pending + page
        if not rows:
            break
        if page:
            after = page[-1][0]
            last_chunk = after // CHUNK
            cut = next((i for i, row in enumerate(rows) if row[0] // CHUNK == last_chunk), len(rows))
            rows, pending = rows[:cut], rows[cut:]
        else:
            pending = []
        if rows:
            steps, columns = _columns_of(rows)
            rows_io.write(cursor, run_id, version, series_from_arrays(steps, OLD_SPEC, columns))
            written += len(rows)
            progress.add(len(rows), run, index)
        if not page:
            break
    return written


def _copy_tensors(cursor, rows_io, sql, run_id: int, version: int) -> None:
    from gradwatch.server.storage.chunks import merge_tensors
    from gradwatch.server.storage.chunks.codec import CHUNK

    cursor.execute(sql("SELECT id, names FROM tensor_layouts WHERE run_id = ?"), (run_id,))
    layouts = {layout_id: json.loads(names) for layout_id, names in cursor.fetchall()}
    if not layouts:
        return
    after, chunk = -1, None
    while True:
        cursor.execute(sql(f"SELECT step, layout_id, norms FROM tensor_norms WHERE run_id = ? AND step > ? "
                           f"ORDER BY step LIMIT {PAGE // 10}"), (run_id, after))
        page = cursor.fetchall()
        if not page:
            break
        after = page[-1][0]
        start = 0
        while start < len(page):   # runs of one chunk and one layout
            chunk_id, layout_id = page[start][0] // CHUNK, page[start][1]
            end = start
            while end < len(page) and page[end][0] // CHUNK == chunk_id and page[end][1] == layout_id:
                end += 1
            if chunk is not None and chunk.chunk_id != chunk_id:
                rows_io.write_tensors(cursor, run_id, version, [(0, chunk)])
                chunk = None
            names = layouts[layout_id]
            steps = np.array([row[0] for row in page[start:end]], dtype=np.int64)
            norms = np.frombuffer(b"".join(row[2] for row in page[start:end]), dtype="<f4")
            chunk = merge_tensors(chunk, chunk_id, steps, names, norms.reshape(len(steps), len(names)))
            start = end
    if chunk is not None:
        rows_io.write_tensors(cursor, run_id, version, [(0, chunk)])


def upgrade() -> None:
    from gradwatch.server.storage.chunk_rows import ChunkRows

    _create_tables()
    bind = op.get_bind()
    sqlite = bind.dialect.name == "sqlite"

    def sql(statement: str) -> str:
        return statement if sqlite else statement.replace("?", "%s")

    rows_io = ChunkRows(sql, summary_segments=False)   # chunk_summaries as this revision makes it
    cursor = bind.connection.cursor()
    cursor.execute("SELECT id, name, steps, version FROM runs ORDER BY id")
    runs = cursor.fetchall()
    progress = _Progress(len(runs), sum(int(run[2]) for run in runs))
    for index, (run_id, name, steps, version) in enumerate(runs, start=1):
        written = _copy_steps(cursor, rows_io, sql, run_id, int(version), progress, name, index)
        if written != int(steps):
            raise RuntimeError(f"run {name!r}: copied {written} steps into chunks, the run counts {steps}")
        _copy_tensors(cursor, rows_io, sql, run_id, int(version))
    cursor.close()
    op.drop_table("tensor_norms")
    op.drop_table("tensor_layouts")
    op.drop_index("ix_steps_clipped", table_name="steps")
    op.drop_table("steps")
    op.execute("UPDATE schema_version SET version = 5")


def downgrade() -> None:
    raise NotImplementedError("schema 5 (chunks) cannot be downgraded: restore a backup taken before upgrading")

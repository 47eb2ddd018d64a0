"""Chunked columnar storage, storage-independent: codec, merge, summaries, overview, tensor norms.

Pure NumPy; no database, no other server module. The storage package wires
these to tables (one row per (run, chunk)); see each module's docstring.

Not wired yet (issue 12). The proposed layout:

- `step_chunks(run_id, chunk_id, n, version, steps blob, one blob per registry
  column, PK (run_id, chunk_id))`: a read fetches only the columns it needs.
- `step_summaries(run_id, chunk_id, width, blob, PK (run_id, chunk_id, width))`
  for widths 64, 512 and 4096 (`LEVELS`); `tensor_chunks(run_id, chunk_id,
  blob, summary blob)`.
- Ingest, one transaction per batch: read the touched chunks locked
  (`SELECT ... FOR UPDATE` / `BEGIN IMMEDIATE`), `merge_batch`, summarize and
  encode the changed chunks, upsert them with `executemany` (`INSERT ... ON
  CONFLICT DO UPDATE`: a handful of rows per 2,000-step batch); the row
  `version` guards several servers writing one run.
- Alembic data migration: stream `steps` per run in 4096-step slices into
  chunks with `series_from_arrays`, print progress, verify counts, keep the old
  table as `steps_legacy` for one release.
"""
from .codec import (BLOCK, CHUNK, Chunk, CodecError, check_spec, chunk_ids, column_storage, decode_chunk,
                    decode_column, decode_steps, encode_chunk, encode_column, encode_steps, fits_float32,
                    pack_arrays, split_by_chunk, unpack_arrays)
from .downsample import (LEVELS, ChunkSource, Grid, MemorySource, Series, bucket_grid, overview,
                         series_from_arrays)
from .merge import BatchMerge, Conflict, MergeResult, merge_batch, merge_chunk, normalize
from .summaries import (FlagStats, NumStats, Summary, combine, concat, decode_summaries, decode_summary,
                        encode_summary,
                        group_by, slice_steps, summarize)
from .tensors import (Heatmap, TensorChunk, TensorSummary, decode_tensor_summary, decode_tensors,
                      encode_tensor_summary, encode_tensors, heatmap, merge_tensors, summarize_tensors)

__all__ = [name for name in dir() if not name.startswith("_")]

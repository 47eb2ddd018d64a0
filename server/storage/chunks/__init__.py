"""Chunked columnar storage, storage-independent: codec, merge, summaries, overview, tensor norms.

Pure NumPy; no database, no other server module. `server/storage/chunk_rows.py`
moves these blobs in and out of the tables (`chunks`, `chunk_columns` with a
row per column and segment, `chunk_summaries` with the 64-step summaries and
each chunk's kept rows, `tensor_chunks`, `tensor_summaries`); ingest merges a
batch into the chunks it touches (`merge_batch`), reads decode the columns
they need or answer from the summaries (`overview`, `heatmap`). Alembic
revision 0005 moved the row-per-step tables into this layout.
"""
from .codec import (BLOCK, CHUNK, Chunk, CodecError, check_spec, chunk_ids, column_storage, decode_chunk,
                    decode_column, decode_segments, decode_steps, encode_chunk, encode_column, encode_steps, fits_float32,
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

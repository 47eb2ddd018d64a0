"""Chunked columnar storage, storage-independent: codec, merge, summaries, overview, tensor norms.

Pure NumPy; no database, no other server module. The storage package wires
these to tables (one row per (run, chunk)); see each module's docstring.
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

__all__ = [name for name in dir() if not name.startswith("_")]
from .tensors import (Heatmap, TensorChunk, TensorSummary, decode_tensor_summary, decode_tensors,  # noqa: E402
                      encode_tensor_summary, encode_tensors, heatmap, merge_tensors, summarize_tensors)

__all__ = [name for name in dir() if not name.startswith("_")]

"""Per-tensor norms grouped by module path: the heatmap of a real model.

A 7B Llama has ~291 gradient tensors; people think in blocks (`layers.12`,
`model.layers.12`) and the modules inside them (`self_attn`, `mlp`,
`input_layernorm`). A group's norm at a step is the L2 norm of its tensors'
norms at that step, sqrt(sum of squares), which is exactly the gradient norm of
the group's parameters. It must be computed per step, before downsampling:
the max of per-tensor bucket maxima is not the norm of any step.

Which groups spike: each group's norm judged against its own recent history by
the spike detector's rule (`spike_flags`, exact and vectorised). The route asks
`grouped_json`, which keeps the latest encoded answers per run state.

Pure NumPy, except `grouped_json`, which reads the run's tensor chunks one at a
time through the store (`Reader.iter_tensor_steps`) and reduces each to its
groups (`streamed_groups`) before reading the next, and the run's version.

Memory and time are linear in tensors and in groups (never a tensors x groups
matrix): 16,000 tensors `layers.{i}.w` (16,000 blocks) over 32 steps take about
+30 MB and half a second. An answer that would hold more than `MAX_GROUP_NORMS`
per-step group norms is refused (`TooManyGroupNorms`, a 422 naming the limit).
"""
from __future__ import annotations

import re
import threading
import weakref
from collections import OrderedDict
from contextlib import closing
from dataclasses import dataclass

import numpy as np
import orjson

from gradwatch.clip import spike_rule as rule   # the shared rule, pure NumPy (loads no MLX)
from gradwatch.server.wire import BatchError

LEVELS = ("block", "module", "tensor")
# The first `<name>.<integer>` in a path ends the block: `layers.3`, `model.layers.12`, `h.0`.
_BLOCK = re.compile(r"^((?:[^.]+\.)*?[^.]+\.\d+)(?:\.|$)")
# The shared spike rule's bound (gradwatch.clip.spike_rule, its defaults): a group spikes when its
# log norm > median + k·max(1.4826·MAD, min_scale) of its previous `history` finite log norms, with
# k adapted to that window's tail (SPIKE_K None; a number fixes k).
SPIKE_K = rule.K
SPIKE_HISTORY = rule.HISTORY
SPIKE_WARMUP = rule.WARMUP
MIN_SCALE = rule.MIN_SCALE
MAD_TO_SIGMA = rule.MAD_TO_SIGMA
TINY = rule.TINY       # log floor, as the detector's
SLACK = 1e-5           # log units: covers float32 rounding in the spike bounds
BLOCK_CELLS = 1 << 20  # norms group_norms reduces at a time (~8 MB per float64 copy)
# Most group norms (steps x groups) one answer holds before downsampling (5 bytes each, held
# twice while the pieces are joined): 100,000 steps of 300 groups fit; more is refused.
MAX_GROUP_NORMS = 1 << 25


class TooManyGroupNorms(BatchError):
    """A grouped answer over `MAX_GROUP_NORMS` per-step group norms: narrow the range."""


def block_of(name: str) -> str:
    """`model.layers.12.self_attn.q_proj.weight` -> `model.layers.12`; a path without an
    index belongs to its module (`model.embed_tokens.weight` -> `model.embed_tokens`)."""
    match = _BLOCK.match(name)
    if match:
        return match.group(1)
    return name.rsplit(".", 1)[0] if "." in name else name


def module_of(name: str) -> str:
    """The block plus the first component inside it, when that is a module and not the
    parameter itself: `layers.0.mlp.up.weight` -> `layers.0.mlp`, `layers.0.weight` -> `layers.0`."""
    block = block_of(name)
    rest = name[len(block) + 1:].split(".") if name.startswith(block + ".") else []
    return f"{block}.{rest[0]}" if len(rest) >= 2 else block


def group_of(name: str, level: str) -> str:
    if level == "block":
        return block_of(name)
    if level == "module":
        return module_of(name)
    return name


@dataclass
class Grouping:
    names: list[str]          # group names, in order of first appearance
    members: list[list[str]]  # tensor names of each group
    parents: list[str]        # each group's block
    index: np.ndarray         # tensor column -> group row


def grouping(tensor_names: list[str], level: str) -> Grouping:
    names: list[str] = []
    position: dict[str, int] = {}
    members: list[list[str]] = []
    index = np.empty(len(tensor_names), dtype=np.intp)
    for column, tensor in enumerate(tensor_names):
        group = group_of(tensor, level)
        if group not in position:
            position[group] = len(names)
            names.append(group)
            members.append([])
        index[column] = position[group]
        members[position[group]].append(tensor)
    return Grouping(names, members, [block_of(m[0]) if level != "block" else n for n, m in zip(names, members)], index)


def group_norms(norms: np.ndarray, absent: np.ndarray, index: np.ndarray, groups: int,
                cells: int = BLOCK_CELLS) -> tuple[np.ndarray, np.ndarray]:
    """Per-step group norms: (values[steps, groups] float32, missing[steps, groups]).

    Linear in tensors and groups (no tensors x groups matrix): the tensors are put in
    group order once, and each group's squared norms are summed with `np.add.reduceat`
    over its run of columns, in float64. A tensor a step did not report adds nothing; a
    group none of whose tensors reported at a step is missing there (NaN); a non-finite
    member makes the group NaN (or +Inf when only Infs): the news. About `cells` norms
    at a time, so the squares never cost a second copy of the norms."""
    norms = np.asarray(norms)
    steps = len(norms)
    out = np.full((steps, groups), np.nan, dtype=np.float32)
    missing = np.ones((steps, groups), dtype=bool)
    if steps == 0 or len(index) == 0:
        return out, missing
    order = np.argsort(index, kind="stable")
    present, starts = np.unique(index[order], return_index=True)   # groups with members, their first column
    rows_at_once = max(1, cells // len(index))
    for begin in range(0, steps, rows_at_once):
        rows = slice(begin, begin + rows_at_once)
        out[rows, present], missing[rows, present] = _group_block(norms[rows][:, order], absent[rows][:, order], starts)
    return out, missing


def _group_block(norms: np.ndarray, absent: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """norms[steps, tensors] with each group's tensors side by side from `starts`: each
    group's L2 per step (float32) and whether none of its tensors reported there."""
    values = np.asarray(norms, dtype=np.float64)
    bad = ~np.isfinite(values) | absent
    squares = np.square(values)
    if bad.any():
        squares[bad] = 0.0
    out = np.sqrt(np.add.reduceat(squares, starts, axis=1)).astype(np.float32)
    missing = np.logical_and.reduceat(absent, starts, axis=1)
    if bad.any():
        reported = ~absent
        inf = np.logical_or.reduceat(np.isinf(values) & reported, starts, axis=1)
        nan = np.logical_or.reduceat(np.isnan(values) & reported, starts, axis=1)
        out[inf] = np.inf
        out[nan] = np.nan
    out[missing] = np.nan
    return out, missing


def downsample_max(steps: np.ndarray, values: np.ndarray, missing: np.ndarray, points: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Equal buckets of consecutive steps, each keeps its largest value (a NaN wins), labelled
    by its first step: the same rule as the per-tensor answer, so spikes survive."""
    total = len(steps)
    size = max(-(-total // max(points, 1)), 1)
    if size == 1:
        return steps, values, missing
    cuts = np.arange(0, total, size)
    nan = np.isnan(values)
    filled = np.where(nan | missing, -np.inf, values)
    highest = np.maximum.reduceat(filled, cuts, axis=0)
    any_nan = np.logical_or.reduceat(nan & ~missing, cuts, axis=0)
    all_missing = np.logical_and.reduceat(missing, cuts, axis=0)
    highest[any_nan] = np.nan
    return steps[cuts], highest, all_missing


def _medians(rows: np.ndarray, counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(median, MAD) of each row as NumPy's median computes them (mean of the two middle
    values); with `counts`, of each row's first counts[i] entries only."""
    if counts is None:
        center = np.median(rows, axis=1)
        return center, np.median(np.abs(rows - center[:, None]), axis=1)
    width = rows.shape[1]
    valid = np.arange(width)[None, :] < counts[:, None]
    low, high = ((counts - 1) // 2)[:, None], (counts // 2)[:, None]

    def middle(values: np.ndarray) -> np.ndarray:
        ordered = np.sort(np.where(valid, values, np.inf), axis=1)
        return (np.take_along_axis(ordered, low, 1) + np.take_along_axis(ordered, high, 1))[:, 0] / 2

    center = middle(rows)
    return center, middle(np.abs(rows - center[:, None]))


def _fences(rows: np.ndarray, counts: np.ndarray | None = None, k: float | None = SPIKE_K) -> np.ndarray:
    """median + k·max(1.4826·MAD, MIN_SCALE) of each row (its first counts[i] entries), k fixed
    or (None) the shared rule's adaptive k from the row's own tail (rule.adaptive_k)."""
    if k is not None:
        center, mad = _medians(rows, counts)
        return center + k * np.maximum(MAD_TO_SIGMA * mad, MIN_SCALE)
    width = rows.shape[1]
    n = np.full(len(rows), width) if counts is None else np.asarray(counts)
    valid = np.arange(width)[None, :] < n[:, None]
    low, high = ((n - 1) // 2)[:, None], (n // 2)[:, None]
    ordered = np.sort(np.where(valid, rows, np.inf), axis=1)
    center = (np.take_along_axis(ordered, low, 1) + np.take_along_axis(ordered, high, 1))[:, 0] / 2
    dev = np.sort(np.where(valid, np.abs(rows - center[:, None]), np.inf), axis=1)
    mad = (np.take_along_axis(dev, low, 1) + np.take_along_axis(dev, high, 1))[:, 0] / 2
    num, den = rule.quantile_fraction(rule.TAIL_QUANTILE)
    count = n - n * num // den   # the top values the tail is the mean of: n - ⌊q·n⌋, as the rule's
    columns = np.arange(width)[None, :]
    top = (np.where((columns >= (n - count)[:, None]) & valid, ordered, 0.0).sum(axis=1)
           / np.maximum(count, 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        adaptive = np.clip(rule.K_GAUSS * ((top - center) / np.where(mad > 0, mad, 1.0) / rule.tail_gauss())
                           ** rule.TAIL_POWER, rule.K_MIN, rule.K_MAX)
    k_rows = np.where((n >= rule.TAIL_MIN) & (mad > 0), adaptive, rule.K_MAX)
    return center + k_rows * np.maximum(MAD_TO_SIGMA * mad, MIN_SCALE)


def spike_flags(norms: np.ndarray, k: float = SPIKE_K, history: int = SPIKE_HISTORY,
                warmup: int = SPIKE_WARMUP, grid: int = 20) -> np.ndarray:
    """Which finite norms are spikes by the robust rule, each column (a group's sequence of
    finite norms, in step order) on its own: with l = log(max(norm, TINY)) in float64,
    l[j] > median + k·max(1.4826·MAD, MIN_SCALE) of l[j-history:j], once `warmup` values
    came before. norms: [n] or [n, columns]; flags of the same shape.

    Exact, and vectorised without a median per step: the windows ending at grid points J
    (every `grid` values, and the last; with 40, not 20, 3.3% of Gaussian noise passed the
    bound: 0.50 s, not 0.29, for 250,000 steps x 16 groups) are sorted once. A window j at most d = grid/2
    values from J shares all but d values with it, so its lower middle value is >= the
    (history/2 - d)-th smallest of J's, and its MAD >= half the shortest interval holding
    history/2 - d of J's values (median ± MAD holds half of window j). That is a lower
    bound on j's fence; only norms above it (about 0.1% of Gaussian noise, plus the real
    spikes) get their exact median and MAD, the same flags as a median per step
    (tests/test_dashboard_groups.py). The first windows, shorter than `history`, are exact.
    The bounds need no logarithm of every norm: the log is monotone, so J's windows are
    sorted as norms, and only their few order statistics (and ratios) are logged."""
    one = norms.ndim == 1
    table = np.ascontiguousarray(np.asarray(norms).reshape(len(norms), -1).T)  # [columns, n]
    flags = _spike_rows(table, k, history, warmup, grid)
    return flags[0] if one else flags.T


def _spike_rows(table: np.ndarray, k: float, history: int, warmup: int, grid: int = 20) -> np.ndarray:
    """spike_flags on rows: table[columns, n] of finite norms (float32 or float64), flags[columns, n]."""
    columns, n = table.shape
    flags = np.zeros((columns, n), dtype=bool)
    if n <= warmup or not columns:
        return flags
    # An adaptive k is at least K_MIN: the bounds below hold with it, the exact fences adapt.
    k_low = rule.K_MIN if k is None else k
    lin = np.maximum(table, TINY)
    # Bounds and first guesses are computed in float32 (sorts 3x faster, SIMD); SLACK (in log
    # units) covers its rounding: a bound never excludes a spike, and a first guess this close
    # to its fence is redone exactly.
    short = np.arange(warmup, min(n, history))
    if len(short) and k is None:   # adaptive: the first windows' fences exactly, in float64
        first = np.full((columns, history), np.inf)
        first[:, :min(n, history)] = np.log(lin[:, :history].astype(np.float64))
        rows = np.broadcast_to(first[:, None, :], (columns, len(short), history)).reshape(-1, history)
        fence = _fences(rows, np.tile(short, columns), None).reshape(columns, len(short))
        flags[:, short] = first[:, short] > fence
    elif len(short):  # every row padded to `history`; _medians masks each past its count
        first = np.full((columns, history), np.inf)
        first[:, :min(n, history)] = np.log(lin[:, :history].astype(np.float64))
        rough = np.broadcast_to(first.astype(np.float32)[:, None, :], (columns, len(short), history))
        fence = _fences(rough.reshape(-1, history), np.tile(short, columns), k).reshape(columns, len(short))
        values = first[:, short]
        flags[:, short] = values > fence
        c, i = np.nonzero(np.abs(values - fence) <= SLACK * (1.0 + np.abs(fence)))
        if len(c):
            flags[c, short[i]] = values[c, i] > _fences(first[c], short[i], k)
    if n <= history:
        return flags
    d = grid // 2
    rank = (history - 1) // 2 - d       # 0-based index of the bound on the lower middle value
    cover = (history - 1) // 2 + 1 - d  # values of J's window the interval must hold
    if rank < 0 or cover < 2:
        raise ValueError(f"grid ({grid}) too coarse for a history of {history}")
    windows = np.lib.stride_tricks.sliding_window_view(lin, history, axis=1)  # [c, i] = lin[c, i:i+h]
    coarse = np.lib.stride_tricks.sliding_window_view(lin.astype(np.float32, copy=False), history, axis=1)
    points = np.arange(history, n + 1, grid)
    if points[-1] != n:
        points = np.append(points, n)
    nearest = np.minimum((np.arange(history, n) - history + d) // grid, len(points) - 1)  # at most d away
    biggest = np.finfo(np.float32).max
    chunk = max(1, 4_000_000 // (len(points) * history))  # columns per sort, ~16 MB
    for first_column in range(0, columns, chunk):
        part = slice(first_column, first_column + chunk)
        ordered = np.sort(coarse[part, points - history], axis=2)          # [columns, points, history]
        with np.errstate(over="ignore"):  # an overflowed ratio: log(max float32) is still a lower bound
            ratio = (ordered[:, :, cover - 1:] / ordered[:, :, :history - cover + 1]).min(axis=2)
        shortest = np.log(np.minimum(ratio, biggest).astype(np.float64))
        bound = np.log(ordered[:, :, rank].astype(np.float64)) + k_low * np.maximum(MAD_TO_SIGMA * shortest / 2,
                                                                                    MIN_SCALE)
        bound = np.exp(bound - SLACK * (1.0 + np.abs(bound)))
        column, position = np.nonzero(lin[part, history:] > bound[:, nearest])
        column += first_column
        position += history
        # exact fences a few thousand at a time (each works on ~6 [rows, history] float64 matrices)
        for pick in np.array_split(np.arange(len(column)), max(1, len(column) // CANDIDATES_AT_ONCE)):
            c, j = column[pick], position[pick]
            logs = np.log(windows[c, j - history].astype(np.float64))
            flags[c, j] = np.log(lin[c, j].astype(np.float64)) > _fences(logs, None, k)
    return flags


CANDIDATES_AT_ONCE = 4_000   # windows whose exact fence _spike_rows computes in one go
GROUPS_AT_ONCE = 4        # spike_counts works on at least this many groups' sequences at a time,
SPIKE_CELLS = 500_000     # and on more while their working cells (about `_spike_cells` each) fit this


def _spike_cells(steps: int, history: int) -> int:
    """About how many cells `_spike_rows` works on per row of `steps` values."""
    return min(steps, history) * history + 8 * steps


def spike_counts(values: np.ndarray, missing: np.ndarray, k: float = SPIKE_K,
                 history: int = SPIKE_HISTORY, warmup: int = SPIKE_WARMUP) -> tuple[np.ndarray, np.ndarray]:
    """How often each group's norm is an outlier against its own recent history, by the
    shared robust rule's bound (gradwatch.clip.spike_rule: k adapted to the window's tail,
    history=200, warm-up 25, min_scale 0.01) on each group's own sequence of finite norms, per step.

    A non-finite group norm counts as a spike (as the detector reports it) and never
    enters the history; a missing one is skipped. Not modelled: the detector keeping a
    flagged value out of its history (here the window is the previous 200 finite norms;
    a few spikes among 200 move neither the median nor the MAD, and sit above the tail
    quantile's rank) and its level-shift rule (a lasting jump counts as spikes until the
    rolling median has followed it).
    Returns (counts[groups], index of the latest spike per group or -1)."""
    steps, groups = values.shape
    counts = np.zeros(groups, dtype=np.int64)
    latest = np.full(groups, -1, dtype=np.int64)
    if steps == 0:
        return counts, latest
    # Groups in rows ([groups, steps], contiguous): each group's sequence is one row.
    values = np.ascontiguousarray(np.asarray(values).T)
    present = ~np.ascontiguousarray(np.asarray(missing, dtype=bool).T)
    finite = np.isfinite(values) & present
    flagged = present & ~finite                    # a non-finite norm is a spike
    whole = np.flatnonzero(finite.all(axis=1))    # groups with a finite norm at every step: a few at once
    at_once = max(GROUPS_AT_ONCE, SPIKE_CELLS // _spike_cells(steps, history))  # bounds the working memory
    for begin in range(0, len(whole), at_once):
        rows = whole[begin:begin + at_once]
        flagged[rows] = _spike_rows(values[rows], k, history, warmup)
    for g in np.flatnonzero(~finite.all(axis=1)).tolist():   # the others on their own finite sequence
        rows = np.flatnonzero(finite[g])
        flagged[g, rows[_spike_rows(values[g, rows][None, :], k, history, warmup)[0]]] = True
    counts = np.count_nonzero(flagged, axis=1).astype(np.int64)
    hit = counts > 0
    latest[hit] = steps - 1 - np.argmax(flagged[:, ::-1], axis=1)[hit]
    return counts, latest


def _encode_rows(shown: np.ndarray, missing: np.ndarray) -> list:
    """Group rows for JSON: a row without NaN/Inf/missing stays a float32 array (orjson
    writes it natively, shortest float32 digits: a third of the bytes of float64 lists);
    the others as lists with the wire's "NaN"/"Infinity" strings and null for missing."""
    rows = np.ascontiguousarray(shown.T)
    gaps = np.ascontiguousarray(missing.T)
    bad_rows = (~np.isfinite(rows) | gaps).any(axis=1)
    out: list = list(rows)
    for g in np.flatnonzero(bad_rows).tolist():
        values = rows[g].tolist()
        for index in np.flatnonzero(~np.isfinite(rows[g]) | gaps[g]).tolist():
            value = values[index]
            if gaps[g, index]:
                values[index] = None
            elif value != value:
                values[index] = "NaN"
            else:
                values[index] = "Infinity" if value > 0 else "-Infinity"
        out[g] = values
    return out


def grouped_answer(tensor_names: list[str], steps: np.ndarray, norms: np.ndarray, absent: np.ndarray,
                   level: str, points: int) -> dict:
    """The `/tensors?group=` answer from per-step norms[steps, tensors]: group rows, each the
    per-step L2 of its members then the max per bucket, with members, parents and spike counts.
    Rows may be float32 arrays: encode with `encode_answer` (or orjson's numpy option)."""
    if level not in LEVELS:
        raise ValueError(f"group must be one of {', '.join(LEVELS)}")
    plan = grouping(list(tensor_names), level)
    values, missing = group_norms(np.asarray(norms), np.asarray(absent, dtype=bool), plan.index, len(plan.names))
    return answer_from_groups(plan, np.asarray(steps, dtype=np.int64), values, missing, level, points)


def streamed_groups(pieces, level: str) -> tuple[Grouping, np.ndarray, np.ndarray, np.ndarray]:
    """(plan, steps, values[steps, groups], missing) from pieces (steps, tensor names,
    norms[steps, names], absent[steps, names] or None) in step order, e.g. one per stored
    chunk: each piece is reduced to its groups before the next is read, so a long run's
    per-tensor norms are never held whole (a group's norm depends only on its members'
    names, so the groups of the pieces seen so far are those of the whole)."""
    tensors: list[str] = []
    seen: set[str] = set()
    groups: dict[str, int] = {}
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    total = 0
    for steps, names, norms, absent in pieces:
        for name in names:
            if name not in seen:
                seen.add(name)
                tensors.append(name)
                groups.setdefault(group_of(name, level), len(groups))
        total += len(steps)
        if total * len(groups) > MAX_GROUP_NORMS:
            raise TooManyGroupNorms(
                f"grouping by {level} needs at least {total:,} steps x {len(groups):,} groups of norms, over "
                f"the limit of {MAX_GROUP_NORMS:,}: ask for fewer steps (start, end) or a coarser group")
        index = np.array([groups[group_of(name, level)] for name in names], dtype=np.intp)
        absent = np.zeros(norms.shape, bool) if absent is None else absent
        values, missing = group_norms(norms, absent, index, len(groups))
        parts.append((np.asarray(steps, dtype=np.int64), values, missing))
    plan = grouping(tensors, level)
    order = np.array([groups[name] for name in plan.names], dtype=np.intp)   # plan rows in our columns
    steps = np.zeros(total, np.int64)
    values = np.full((total, len(plan.names)), np.nan, np.float32)
    missing = np.ones((total, len(plan.names)), bool)
    row = 0
    for part_steps, part_values, part_missing in parts:
        rows = slice(row, row + len(part_steps))
        width = part_values.shape[1]
        take = np.flatnonzero(order < width)          # groups that existed when the piece was read
        steps[rows] = part_steps
        values[rows, take] = part_values[:, order[take]]
        missing[rows, take] = part_missing[:, order[take]]
        row += len(part_steps)
    return plan, steps, values, missing


def answer_from_groups(plan: Grouping, steps: np.ndarray, values: np.ndarray, missing: np.ndarray,
                       level: str, points: int) -> dict:
    counts, latest = spike_counts(values, missing)
    labels, shown, shown_missing = downsample_max(steps, values, missing, points)
    return {
        "group": level,
        "names": plan.names,
        "members": plan.members,
        "parents": plan.parents,
        "step": labels.tolist(),
        "norms": _encode_rows(shown, shown_missing),
        "spikes": counts.tolist(),
        "latest_spike": [int(steps[i]) if i >= 0 else None for i in latest.tolist()],
        "steps_total": int(len(steps)),
        "spike_rule": (f"log norm > median + k·1.4826·MAD of the group's previous {SPIKE_HISTORY} "
                       f"finite norms (after {SPIKE_WARMUP}), k adapted to that window's tail "
                       f"({rule.K_MIN:g}-{rule.K_MAX:g}, {rule.K_GAUSS:g} for normal noise), as the spike "
                       f"detector; a non-finite norm counts"),
    }


def encode_answer(answer: dict) -> bytes:
    return orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)


class AnswerCache:
    """The encoded answers of the latest grouped requests, keyed by the request and the
    run's counters (stored steps, last step, creation time: a batch that stores steps
    changes them, a deleted and re-created run too). A dashboard reload, a second tab or
    a resize back asks again for the same answer; reading 100,000 x 300 norms again is
    most of its cost. Thread-safe: routes run in a thread pool."""

    def __init__(self, entries: int = 8):
        self.entries = entries
        self._answers: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            body = self._answers.get(key)
            if body is not None:
                self._answers.move_to_end(key)
            return body

    def put(self, key: tuple, body: bytes) -> None:
        with self._lock:
            self._answers[key] = body
            self._answers.move_to_end(key)
            while len(self._answers) > self.entries:
                self._answers.popitem(last=False)


_CACHES: "weakref.WeakKeyDictionary[object, AnswerCache]" = weakref.WeakKeyDictionary()
MAX_CACHED_BYTES = 16 * 2**20  # a page asks for ~1,000 columns (under 3 MB); a huge `points` is not kept


def grouped_json(store, run_id: int, start: int | None, end: int | None, level: str, points: int) -> bytes:
    """The `/tensors?group=` answer as JSON bytes, from the store's answer cache when the
    run has not changed since (one small query for its version: every batch that stores
    steps or tensor norms moves it), else computed and kept."""
    cache = _CACHES.setdefault(store, AnswerCache())
    key = (run_id, store.reader.run_version(run_id), start, end, level, points)
    body = cache.get(key)
    if body is None:
        if level not in LEVELS:
            raise ValueError(f"group must be one of {', '.join(LEVELS)}")
        with closing(store.reader.iter_tensor_steps(run_id, start, end)) as pieces:  # closed here when refused
            plan, steps, values, missing = streamed_groups(pieces, level)
        body = encode_answer(answer_from_groups(plan, steps, values, missing, level, points))
        if len(body) <= MAX_CACHED_BYTES:
            cache.put(key, body)
    return body

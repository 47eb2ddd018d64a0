"""Per-tensor norms grouped by module path: the heatmap of a real model.

A 7B Llama has ~291 gradient tensors; people think in blocks (`layers.12`,
`model.layers.12`) and the modules inside them (`self_attn`, `mlp`,
`input_layernorm`). A group's norm at a step is the L2 norm of its tensors'
norms at that step, sqrt(sum of squares), which is exactly the gradient norm of
the group's parameters. It must be computed per step, before downsampling:
the max of per-tensor bucket maxima is not the norm of any step.

Pure NumPy, except `read_step_norms`, the one function that reads the tables.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

LEVELS = ("block", "module", "tensor")
# The first `<name>.<integer>` in a path ends the block: `layers.3`, `model.layers.12`, `h.0`.
_BLOCK = re.compile(r"^((?:[^.]+\.)*?[^.]+\.\d+)(?:\.|$)")
SPIKE_K = 5.0          # outlier when log norm > median + k * 1.4826 * MAD (the detector's rule)
SPIKE_HISTORY = 128    # steps of a group's own history that define "usual"
MAD_FLOOR = 0.05       # log-space MAD floor: a perfectly steady group is not a spike at +1%


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


def group_norms(norms: np.ndarray, absent: np.ndarray, index: np.ndarray, groups: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Per-step group norms: (values[steps, groups] float32, missing[steps, groups]).

    One float32 matrix product of the squared norms with a tensor->group one-hot
    matrix (BLAS: 100,000 x 300 in tens of ms). A tensor a step did not report adds
    nothing; a non-finite member makes the group NaN (or +Inf when only Infs): the news."""
    one_hot = np.zeros((len(index), groups), dtype=np.float32)
    one_hot[np.arange(len(index)), index] = 1.0
    values = np.asarray(norms, dtype=np.float32)
    bad = ~np.isfinite(values) | absent
    rows_bad = np.flatnonzero(bad.any(axis=1))
    squares = np.square(values)
    if len(rows_bad):
        squares[rows_bad] = np.where(bad[rows_bad], 0.0, squares[rows_bad])
    out = np.sqrt(squares @ one_hot)
    missing = np.zeros(out.shape, dtype=bool)
    if len(rows_bad):
        sub = values[rows_bad]
        nan = (np.isnan(sub) & ~absent[rows_bad]).astype(np.float32) @ one_hot > 0
        inf = (np.isinf(sub) & ~absent[rows_bad]).astype(np.float32) @ one_hot > 0
        block = out[rows_bad]
        block[inf] = np.inf
        block[nan] = np.nan
        out[rows_bad] = block
        missing[rows_bad] = (~absent[rows_bad]).astype(np.float32) @ one_hot == 0
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


def spike_counts(values: np.ndarray, missing: np.ndarray, k: float = SPIKE_K,
                 history: int = SPIKE_HISTORY) -> tuple[np.ndarray, np.ndarray]:
    """How often each group's norm is an outlier against its own recent history.

    The detector's robust rule in log space: above median + k * 1.4826 * MAD of the
    group's previous `history` steps. The baseline is taken per block of `history`
    steps (each block judged against the block before it), so a 100,000-step,
    300-group run is one vectorised median over the run, not one per step.
    Returns (counts[groups], index of the latest spike per group or -1)."""
    steps, groups = values.shape
    counts = np.zeros(groups, dtype=np.int64)
    latest = np.full(groups, -1, dtype=np.int64)
    blocks = steps // history
    if blocks < 2 or groups == 0:
        return counts, latest
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log(values[:blocks * history].astype(np.float32))
    bad = missing[:blocks * history] | ~np.isfinite(logs)
    if bad.any():  # a neutral value keeps np.median (partition) instead of the slow nanmedian
        neutral = np.nanmedian(np.where(bad, np.nan, logs), axis=0) if (~bad).any() else np.zeros(groups)
        logs = np.where(bad, np.nan_to_num(neutral).astype(np.float32)[None, :], logs)
    shaped = logs.reshape(blocks, history, groups)
    center = np.median(shaped, axis=1)                                   # [blocks, groups]
    mad = np.median(np.abs(shaped - center[:, None, :]), axis=1)
    fence = center + k * 1.4826 * np.maximum(mad, MAD_FLOOR)
    above = (shaped[1:] > fence[:-1, None, :]) & ~bad.reshape(blocks, history, groups)[1:]
    above = above.reshape(-1, groups)
    counts = above.sum(axis=0)
    hit = above.any(axis=0)
    latest[hit] = history + (above.shape[0] - 1 - np.argmax(above[::-1], axis=0))[hit]
    return counts, latest


def read_step_norms(store, run_id: int, start: int | None, end: int | None
                    ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(names, steps, norms[steps, tensors] float32, absent) of every step in range, from the
    store's tensor chunks: the only storage-aware part of this module."""
    return store.reader.tensor_steps(run_id, start, end)


def _encode(values: np.ndarray, missing: np.ndarray) -> list:
    """float64 as JSON items: NaN/Inf as the wire's strings, missing as null."""
    out = values.tolist()
    for index in np.flatnonzero(~np.isfinite(values) | missing).tolist():
        value = out[index]
        if missing[index]:
            out[index] = None
        elif value != value:
            out[index] = "NaN"
        else:
            out[index] = "Infinity" if value > 0 else "-Infinity"
    return out


def grouped_answer(tensor_names: list[str], steps: np.ndarray, norms: np.ndarray, absent: np.ndarray,
                   level: str, points: int) -> dict:
    """The `/tensors?group=` answer from per-step norms[steps, tensors]: group rows, each the
    per-step L2 of its members then the max per bucket, with members, parents and spike counts."""
    if level not in LEVELS:
        raise ValueError(f"group must be one of {', '.join(LEVELS)}")
    plan = grouping(list(tensor_names), level)
    values, missing = group_norms(np.asarray(norms), np.asarray(absent, dtype=bool), plan.index, len(plan.names))
    counts, latest = spike_counts(values, missing)
    steps = np.asarray(steps, dtype=np.int64)
    labels, shown, shown_missing = downsample_max(steps, values, missing, points)
    return {
        "group": level,
        "names": plan.names,
        "members": plan.members,
        "parents": plan.parents,
        "step": labels.tolist(),
        "norms": [_encode(shown[:, g], shown_missing[:, g]) for g in range(len(plan.names))],
        "spikes": counts.tolist(),
        "latest_spike": [int(steps[i]) if i >= 0 else None for i in latest.tolist()],
        "steps_total": int(len(steps)),
        "spike_rule": f"log norm > median + {SPIKE_K:g}·1.4826·MAD of the group's previous block of {SPIKE_HISTORY} steps",
    }

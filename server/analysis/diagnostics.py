"""Spikes, level shifts, loss spikes and the clip-threshold recommendation, from stored numbers.

Pure NumPy. The spike rule is ``gradwatch.clip.spike_rule``, the one
implementation the agent's host detector runs too (docs/diagnostics.md);
importing it loads no MLX. Runs sent over HTTP, runs recorded with ``detectors=[]`` and old runs have no
agent flags, and the agent's flags are shown, not trusted: the server finds
the spikes itself.

The rule (``gradwatch.clip.spike_rule``): per finite value, the robust z-score
against the median and MAD of the last 200 unflagged values (log norms; losses
in linear space), a bound whose k adapts to that history's tail (about 3.25 for
normal noise, up to 6 for heavy tails), and a level shift only for a new level
that persists (a burst and its aftermath never make one). Non-finite values are
spikes and enter nothing.

Why the recommendation is not a raw percentile: the p99 of all norms lands
on the spikes whenever they are >= 1% of steps, so the threshold it gives
never clips the steps clipping exists for; whole-run percentiles are also
dominated by early training, when norms are largest. ``recommend`` works on a
recent window of *clean* steps (spikes, level-shift transitions and
non-finite values left out) and takes exp(median + k·1.4826·MAD) of the log
norms, kept within 1-10× the median (Pascanu et al. 2013: half to ten times
the average norm still trains).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

# The rule itself lives in one pure-NumPy module shared with the agent (it loads no MLX).
from gradwatch.clip.spike_rule import MAD_TO_SIGMA, TINY, RobustSpikes, burst_runs, robust_spikes
from gradwatch.clip.spike_rule import robust_loop as _robust_loop

__all__ = ["MAD_TO_SIGMA", "TINY", "RobustSpikes", "RECOMMENDATION_KEYS", "_robust_loop", "default_window",
           "loss_spikes", "recommend", "robust_spikes"]
MIN_WINDOW = 100
MIN_CLEAN = 100
HISTORY_BEFORE_WINDOW = 400   # steps before the window the robust rule reads as history
DEFAULT_WINDOW_FRACTION = 0.10
DEFAULT_MIN_WINDOW = 500
DEFAULT_MAX_WINDOW = 20_000   # recent enough to be the regime the threshold is for; bounds the work
MAX_BURSTS_LISTED = 50       # the answer lists the newest bursts it left out, and counts them all
PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p95", 95.0), ("p99", 99.0), ("p99.9", 99.9))
SIGN_BASED_QUANTILE = 0.01   # a sign-based optimizer: τ at the clean window's 1st percentile


def is_sign_based(optimizer: str | None) -> bool:
    """Whether an optimizer's name is a sign-based one (Lion, signSGD, Signum), whose step has
    the same size whatever the gradient's norm: "Lion", "optim.Lion", "lion8bit", "SignSGD"."""
    if not optimizer:
        return False
    name = "".join(ch for ch in str(optimizer).lower().rsplit(".", 1)[-1] if ch.isalnum())
    return name.startswith("lion") or name.startswith("sign")


# -- the recommendation ----------------------------------------------------------------
def default_window(count: int) -> int:
    """The last 10% of the run, but at least 500 and at most 20,000 steps (the whole run when shorter)."""
    size = max(DEFAULT_MIN_WINDOW, int(math.ceil(DEFAULT_WINDOW_FRACTION * count)))
    return min(count, DEFAULT_MAX_WINDOW, size)


def _rate(values: np.ndarray, threshold: float | None) -> float | None:
    """Fraction of ``values`` strictly above ``threshold`` (None when either is missing)."""
    if threshold is None or len(values) == 0:
        return None
    return float(np.count_nonzero(values > threshold) / len(values))


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _pct(r: float | None) -> str:
    return "n/a" if r is None else f"{100 * r:.2f}%".replace(".00%", "%")


def recommend(steps: Sequence[int] | np.ndarray, pre_norm: Sequence[float] | np.ndarray, *,
              window: int | None = None, target_clip_rate: float | None = None,
              current_threshold: float | None = None, k: float = 3.0,
              optimizer: str | None = None) -> dict[str, Any]:
    """A clip threshold from a run's stored pre-clip norms, with what a user needs to decide.

    Args:
        steps, pre_norm: the run's steps (ascending) and pre-clip norms, as
            stored (NaN/inf allowed, None = NaN).
        window: how many of the last steps to work on (default: the last 10%
            of the run, at least 500 and at most 20,000; the whole run when
            shorter); >= 100.
        target_clip_rate: when given (r in [0, 1)), τ is the (1 - r) quantile
            of the clean window instead of the robust rule.
        current_threshold: the run's clip threshold, to report its clip rate.
        k: τ = exp(median + k·1.4826·MAD) of the clean window's log norms.
        optimizer: the run's optimizer by name, when known. For a sign-based one (Lion,
            signSGD: :func:`is_sign_based`) τ is the clean window's 1st percentile instead
            (method ``"sign-based"``): such a step has the same size whatever the gradient's
            norm, so clipping costs no step size and only sets how much each batch weighs in
            the momentum; clipping (nearly) every step weighs every batch the same, and a burst
            of bad batches no more than as many good ones (``benchmarks/tau_quality.py
            --family shards``: docs/diagnostics.md). ``target_clip_rate`` still wins.

    Spikes are found with :func:`robust_spikes` (the agent's rule and defaults) over
    the window and the ``2·200`` steps before it (history), and again backwards in
    time over the same steps (a burst-aware pass: the steps after a burst are its
    history there, so a burst that the forward pass let into its history, or one
    right after a level shift, is still left out). Both passes' spikes, the forward
    pass's level-shift transitions and non-finite norms are left out; the answer
    counts the steps the backward pass added (``backward_left_out``) and lists the
    bursts (runs of >= 2 consecutive steps left out as spikes: ``bursts_left_out``,
    the newest 50, ``burst_count``, ``burst_steps_left_out``).
    When a level shift happened in the window and at least 100 clean steps
    follow it, only those are used (the new regime is what the threshold is for).

    Returns a plain dict (JSON-ready), see ``RECOMMENDATION_KEYS``.
    Raises ValueError for ``target_clip_rate`` outside [0, 1) or ``window`` < 100.
    """
    if target_clip_rate is not None:
        r = float(target_clip_rate)
        if not (0.0 <= r < 1.0) or math.isnan(r):
            raise ValueError(f"target_clip_rate must be in [0, 1), got {target_clip_rate!r}")
    if window is not None and (isinstance(window, bool) or int(window) != window or window < MIN_WINDOW):
        raise ValueError(f"window must be an integer >= {MIN_WINDOW}, got {window!r}")
    if current_threshold is not None and not math.isfinite(current_threshold):
        current_threshold = None
    steps_arr = np.asarray(steps, dtype=np.int64)
    norms = np.asarray([np.nan if v is None else v for v in pre_norm]
                       if not isinstance(pre_norm, np.ndarray) else pre_norm, dtype=np.float64)
    if steps_arr.shape != norms.shape:
        raise ValueError("steps and pre_norm must have the same length")
    count = len(norms)
    size = default_window(count) if window is None else min(int(window), count)
    start = count - size
    lead = max(0, start - HISTORY_BEFORE_WINDOW)
    found = robust_spikes(norms[lead:])
    offset = start - lead
    w_norms = norms[start:]
    w_steps = steps_arr[start:]
    w_spike = found.spike[offset:]
    w_transition = found.transition[offset:]
    w_shift = found.level_shift[offset:]
    finite = np.isfinite(w_norms)
    # The burst-aware pass: the same rule backwards in time (its level-shift transitions are
    # the forward pass's business and are not taken).
    backward = robust_spikes(norms[lead:][::-1]).spike[::-1][offset:]
    w_backward = backward & finite & ~w_spike & ~w_transition
    clean_mask = finite & ~w_spike & ~w_transition & ~w_backward
    shift_steps = [int(s) for s in w_steps[w_shift]]
    regime_note = ""
    if shift_steps:
        after = np.arange(size) >= int(np.flatnonzero(w_shift)[-1])
        if np.count_nonzero(clean_mask & after) >= MIN_CLEAN:
            clean_mask &= after
            regime_note = f" (only the steps since the level shift at {shift_steps[-1]:,})"
    clean = w_norms[clean_mask]
    raw = w_norms[finite]
    spikes_left_out = int(np.count_nonzero(w_spike & finite))
    bursts = [run for run in burst_runs((w_spike | w_backward) & finite & ~w_transition, w_steps) if run[2] >= 2]
    result: dict[str, Any] = {
        "threshold": None, "reason": None,
        "method": "target_clip_rate" if target_clip_rate is not None else (
            "sign-based" if is_sign_based(optimizer) else "robust"),
        "optimizer": optimizer or None,
        "k": float(k), "target_clip_rate": None if target_clip_rate is None else float(target_clip_rate),
        "median": None, "ratio_to_median": None,
        "clip_rate_clean": None, "clip_rate_raw": None,
        "current_threshold": None if current_threshold is None else float(current_threshold),
        "current_clip_rate_clean": None, "current_clip_rate_raw": None,
        "clip_rate_at_1_clean": None, "clip_rate_at_1_raw": None,
        "spikes_left_out": spikes_left_out,
        "nonfinite_left_out": int(np.count_nonzero(~finite)),
        "transition_left_out": int(np.count_nonzero(w_transition)),
        "backward_left_out": int(np.count_nonzero(w_backward)),
        "burst_count": len(bursts), "burst_steps_left_out": int(sum(run[2] for run in bursts)),
        "bursts_left_out": [{"start": a, "end": b, "steps": n} for a, b, n in bursts[-MAX_BURSTS_LISTED:]],
        "level_shift": bool(shift_steps), "level_shift_steps": shift_steps,
        "rationale": "",
        "window": {"start": int(w_steps[0]) if size else None, "end": int(w_steps[-1]) if size else None,
                   "steps": int(size), "clean_steps": int(len(clean)),
                   "clean_start": int(w_steps[clean_mask][0]) if len(clean) else None},
        "percentiles_over": "clean window",
        "percentiles": {},
        "candidates": [],
    }
    if len(clean) < MIN_CLEAN:
        why = (f"only {len(clean)} clean steps in the window of {size} "
               f"({spikes_left_out} spikes, {result['nonfinite_left_out']} non-finite and "
               f"{result['transition_left_out']} level-shift steps left out); "
               f"at least {MIN_CLEAN} are needed")
        result["reason"] = why
        result["rationale"] = f"No recommendation yet: {why}."
        return result

    logs = np.log(np.maximum(clean, TINY))
    median_log = float(np.median(logs))
    mad = float(np.median(np.abs(logs - median_log)))
    median = float(np.median(clean))
    if result["method"] == "robust":
        tau = math.exp(median_log + k * MAD_TO_SIGMA * mad)
        tau = min(max(tau, median), 10 * median)
    elif result["method"] == "sign-based":
        tau = float(np.quantile(clean, SIGN_BASED_QUANTILE))
    else:
        tau = float(np.quantile(clean, 1.0 - float(target_clip_rate)))
    percentiles = {name: float(np.percentile(clean, q)) for name, q in PERCENTILES}
    result.update(
        threshold=tau, median=median, ratio_to_median=tau / median if median > 0 else None,
        clip_rate_clean=_rate(clean, tau), clip_rate_raw=_rate(raw, tau),
        current_clip_rate_clean=_rate(clean, current_threshold),
        current_clip_rate_raw=_rate(raw, current_threshold),
        clip_rate_at_1_clean=_rate(clean, 1.0), clip_rate_at_1_raw=_rate(raw, 1.0),
        percentiles=percentiles)
    candidates = [("recommended", tau)] + list(percentiles.items()) + [
        ("2x median", 2 * median), ("1.0", 1.0)]
    if current_threshold is not None:
        candidates.append(("current", float(current_threshold)))
    result["candidates"] = [{"label": label, "threshold": float(t), "clip_rate": _rate(clean, t),
                             "clip_rate_raw": _rate(raw, t), "over": "clean window"}
                            for label, t in candidates]
    if result["method"] == "robust":
        how = f"median × exp({k:g}·1.4826·MAD) of the log norms"
    elif result["method"] == "sign-based":
        how = (f"the 1st percentile, as {optimizer} is sign-based (its step has the same size whatever "
               f"the norm, so clipping nearly every step only gives every batch, a bad one too, the same "
               f"weight in its momentum)")
    else:
        how = f"the {100 * (1 - float(target_clip_rate)):.4g}th percentile"
    shift = (f"; a level shift happened at step {shift_steps[-1]:,}" if shift_steps else "")
    result["rationale"] = (
        f"Clip at {_fmt(tau)} ({_fmt(tau / median) if median > 0 else 'n/a'}× the median norm "
        f"{_fmt(median)}): {how} over {len(clean):,} clean steps of {w_steps[0]:,}–{w_steps[-1]:,}"
        f"{regime_note}, with {spikes_left_out + result['backward_left_out']} spike(s)"
        f"{_bursts_text(bursts)} and {result['nonfinite_left_out']} "
        f"non-finite step(s) left out{shift}; it would have clipped {_pct(result['clip_rate_clean'])} "
        f"of the clean steps and {_pct(result['clip_rate_raw'])} of all steps in the window.")
    return result


def _bursts_text(bursts: list[tuple[int, int, int]]) -> str:
    """" (12 of them in 3 bursts, the last at 1,200–1,204)" for the rationale; "" without bursts."""
    if not bursts:
        return ""
    steps = sum(run[2] for run in bursts)
    last = bursts[-1]
    return (f" ({steps} of them in {len(bursts)} burst{'s' if len(bursts) > 1 else ''}, "
            f"the last at {last[0]:,}–{last[1]:,})")


RECOMMENDATION_KEYS = (
    "threshold", "reason", "method", "optimizer", "k", "target_clip_rate", "median", "ratio_to_median",
    "clip_rate_clean", "clip_rate_raw", "current_threshold", "current_clip_rate_clean",
    "current_clip_rate_raw", "clip_rate_at_1_clean", "clip_rate_at_1_raw", "spikes_left_out",
    "nonfinite_left_out", "transition_left_out", "backward_left_out", "burst_count", "burst_steps_left_out",
    "bursts_left_out", "level_shift", "level_shift_steps", "rationale",
    "window", "percentiles_over", "percentiles", "candidates")


# -- loss spikes ---------------------------------------------------------------------------
def _steps_text(steps: Sequence[int]) -> str:
    texts = [f"{s:,}" for s in steps]
    if len(texts) == 1:
        return f"the gradient spike at {texts[0]}"
    return "the gradient spikes at " + ", ".join(texts[:-1]) + " and " + texts[-1]


def _wire_spelling(value: float) -> str:
    """NaN and +-Inf as the wire spells them (docs/wire.md): "NaN", "Infinity", "-Infinity"."""
    return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")


def loss_spikes(steps: Sequence[int] | np.ndarray, loss: Sequence[float | None] | np.ndarray,
                grad_spike_steps: Sequence[int], *, lookback: int = 5, k: float = 5.0,
                history: int = 200, warmup: int = 25, min_scale: float = 0.01) -> list[dict]:
    """``loss_spike`` events: the robust rule on the loss, in linear space, one-sided.

    Steps whose loss is None (not recorded) are left out; a NaN/inf loss is a
    spike. Each event names the gradient spikes in the ``lookback`` steps up to
    and including its step (a corrupted batch spikes both at once; a bad update
    shows in the next steps' loss)::

        {"kind": "loss_spike", "step": 1810,
         "message": "loss spike at 1,810 followed the gradient spike at 1,807",
         "detail": {"grad_steps": [1807], "loss": 4.2, "score": 9.1}}
    """
    pairs = [(int(s), v) for s, v in zip(steps, loss) if v is not None]
    if not pairs:
        return []
    kept_steps = np.array([s for s, _ in pairs], dtype=np.int64)
    values = np.array([v for _, v in pairs], dtype=np.float64)
    found = robust_spikes(values, log=False, k=k, history=history, warmup=warmup, min_scale=min_scale)
    grads = np.unique(np.asarray(list(grad_spike_steps), dtype=np.int64))
    events = []
    for i in np.flatnonzero(found.spike):
        step = int(kept_steps[i])
        lo, hi = np.searchsorted(grads, step - lookback), np.searchsorted(grads, step, side="right")
        linked = [int(g) for g in grads[lo:hi]]
        message = f"loss spike at {step:,}"
        if linked:
            message += f" followed {_steps_text(linked)}"
        value = float(values[i])
        events.append({"kind": "loss_spike", "step": step, "message": message,
                       "detail": {"grad_steps": linked,
                                  "loss": value if math.isfinite(value) else _wire_spelling(value),
                                  "score": float(found.score[i]) if math.isfinite(found.score[i]) else None}})
    return events

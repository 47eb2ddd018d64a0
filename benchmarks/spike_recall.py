"""Spike recall, false positives and level shifts of the robust rule on real traces with injected spikes.

    python benchmarks/spike_recall.py            # the shared rule vs the old k = 5 rule (about 1 minute)
    python benchmarks/spike_recall.py --quick    # one injection seed
    python benchmarks/spike_recall.py --heldout  # the same on the held-out real traces

Real traces: ``benchmarks/real_traces.py`` (tiny MLX models trained here with
SGD, AdamW and Lion, warm-up + decay, an LR instability and a batch-size
change; cached in benchmarks/data/). Into what a watch would see, spikes are
injected: each event is isolated or a burst of 2-6 consecutive steps, every
step of it ``f`` times the *local median norm* (a centred 51-step rolling
median of the clean trace), ``f`` log-uniform in one of three bands (3-6×,
6-15×, 15-50×; events cycle through the bands, each band gets well over 100
spikes). Events start after step 300 (past the LR warm-up), at least 60 steps apart, and none falls
in the 300 steps after a genuine change (those steps measure the flags a
genuine change costs).

``--heldout``: the same measurements on the held-out real traces
(``real_traces.HELDOUT_SPECS``, benchmarks/data/real_traces_heldout.npz: 10 traces the
rule's defaults were not tuned on, other seeds and other kinds: batch 2, 8 and 64,
higher and lower learning rates, SGD without momentum, AdamW on the transformer at
batch 4, Lion at batch 8, a batch-size change 64 -> 4 and a learning-rate jump that
makes the regression diverge slowly); the generated sequences stay as they are.

Also measured:
- bursts after bursts: on every trace, a burst of 3-6 (15-50×) followed by 8 steps of
  "aftermath" at 2-4× the local median, then 10-40 steps later a second burst of 3-6 at
  50-70× (the case of issue 21): the second burst's recall and any level shift declared;
- the generated sequences of benchmarks/tau_quality.py (drift + regime change,
  Student-t(4) log noise, a permanent 5× level shift; 4,000 steps, 2% spikes of 10-100×).

Goals (issue 21): real traces pooled recall >= 0.97 on 3-50×, >= 0.90 on 3-6×, false
positives <= 0.3% of clean steps, <= 25 flags in the 300 steps after a genuine change,
no level shift declared for a burst, the burst after a burst flagged; generated sequences:
recall >= 0.95, false positives <= 0.5%, <= 50 flags after the 5× shift.
"""
from __future__ import annotations

import argparse
import sys
import time
import zlib
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from benchmarks.real_traces import load, spec_of

BANDS = ((3.0, 6.0), (6.0, 15.0), (15.0, 50.0))
BAND_NAMES = ("3-6x", "6-15x", "15-50x")
WARMUP = 25
AFTER_CHANGE = 300
FIRST_EVENT = 300   # after the LR warm-up (norms move 2-3x in its first 150 steps)
Rule = Callable[[np.ndarray], dict]


def local_median(norms: np.ndarray, width: int = 51) -> np.ndarray:
    logs = np.log(norms)
    half = width // 2
    return np.exp(np.median(sliding_window_view(np.pad(logs, half, mode="edge"), width), axis=1))


def inject(norms: np.ndarray, change: int, seed: int):
    """(norms with spikes, band index per step or -1, burst id per step or -1)."""
    rng = np.random.default_rng(seed)
    out = norms.copy()
    local = local_median(norms)
    band = np.full(len(norms), -1)
    burst = np.full(len(norms), -1)
    step, event = FIRST_EVENT + int(rng.integers(0, 40)), 0
    while step < len(norms) - 10:
        length = 1 if rng.random() < 0.4 else int(rng.integers(2, 7))
        if change and change - 10 <= step + length and step <= change + AFTER_CHANGE:
            step = change + AFTER_CHANGE + 1
            continue
        b = event % 3
        lo, hi = BANDS[b]
        for j in range(step, min(step + length, len(norms))):
            out[j] = local[j] * float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
            band[j], burst[j] = b, event
        event += 1
        step += length + 60 + int(rng.integers(0, 40))
    return out, band, burst


def burst_after_burst(norms: np.ndarray, change: int, seed: int):
    """Bursts with aftermath, each followed by a second burst; (norms, first mask, second mask)."""
    rng = np.random.default_rng(seed)
    out = norms.copy()
    local = local_median(norms)
    first = np.zeros(len(norms), bool)
    second = np.zeros(len(norms), bool)
    step = FIRST_EVENT
    while step < len(norms) - 80:
        if change and change - 80 <= step <= change + AFTER_CHANGE:
            step = change + AFTER_CHANGE + 1
            continue
        n1 = int(rng.integers(3, 7))
        for j in range(step, step + n1):
            out[j] = local[j] * float(np.exp(rng.uniform(np.log(15), np.log(50))))
            first[j] = True
        for j in range(step + n1, step + n1 + 8):   # genuine aftermath: elevated, not corrupted
            out[j] = local[j] * float(np.exp(rng.uniform(np.log(2), np.log(4))))
        gap = int(rng.integers(10, 41))
        start2 = step + n1 + 8 + gap
        for j in range(start2, start2 + int(rng.integers(3, 7))):
            out[j] = local[j] * float(np.exp(rng.uniform(np.log(50), np.log(70))))
            second[j] = True
        step = start2 + 150 + int(rng.integers(0, 50))
    return out, first, second


def old_rule(values: np.ndarray) -> dict:
    """The issue-9 rule (k = 5, spikes enter the history capped, a level shift when more than
    10 of the last 20 finite steps were flagged, the history refilled with those 20 raw values)."""
    from benchmarks.rule_lab import old_rule_loop
    return old_rule_loop(values)


def default_rule() -> tuple[str, Rule]:
    from gradwatch.clip.spike_rule import robust_spikes

    def rule(values: np.ndarray) -> dict:
        found = robust_spikes(values)
        return {"spike": found.spike, "level_shift": found.level_shift, "transition": found.transition}
    return "adaptive (shared rule)", rule


def evaluate(rule: Rule | None, quick: bool = False, seeds: tuple[int, ...] | None = None,
             generated_seeds: tuple[int, ...] = (0, 1, 2),
             traces: dict[str, np.ndarray] | None = None) -> dict:
    """Every measurement of the module docstring for one rule (None: the old rule). ``seeds``:
    the injection seeds (default 0 and 1, or 0 alone when ``quick``); ``generated_seeds``: those
    of the generated sequences; ``traces``: {name: clean norms} of traces ``spec_of`` knows
    (default: ``load()``, the real traces; ``load(heldout=True)``: the held-out ones)."""
    rule = rule or old_rule
    seeds = seeds if seeds is not None else ((0,) if quick else (0, 1))
    traces = load() if traces is None else traces
    hits = np.zeros(3)
    totals = np.zeros(3)
    fp = clean = 0
    after_change: dict[str, int] = {}
    shifts_outside = 0
    per_trace: dict[str, tuple] = {}
    for name, norms in traces.items():
        change = spec_of(name).change
        t_hits = t_tot = t_fp = t_clean = 0
        for seed in seeds:
            values, band, _ = inject(norms, change, 1000 * seed + zlib.crc32(name.encode()) % 997)
            found = rule(values)
            flags = found["spike"] | found["transition"]
            steps = np.arange(len(values))
            scored = steps >= WARMUP
            in_change = (steps >= change) & (steps < change + AFTER_CHANGE) if change else np.zeros(len(values), bool)
            for b in range(3):
                sel = (band == b) & scored
                hits[b] += flags[sel].sum()
                totals[b] += sel.sum()
            truth = band >= 0
            sel_clean = scored & ~truth & ~in_change
            fp += int(flags[sel_clean].sum())
            clean += int(sel_clean.sum())
            t_hits += int(flags[truth & scored].sum())
            t_tot += int((truth & scored).sum())
            t_fp += int(flags[sel_clean].sum())
            t_clean += int(sel_clean.sum())
            shift_at = np.flatnonzero(found["level_shift"])
            shifts_outside += int(np.sum(~in_change[shift_at])) if len(shift_at) else 0
            if change:
                after_change[f"{name} (seed {seed})"] = int((flags | found["level_shift"])[in_change].sum())
        per_trace[name] = (t_hits / max(t_tot, 1), t_fp / max(t_clean, 1))
    # bursts after bursts
    second_hits = second_total = first_hits = first_total = bab_shifts = 0
    for name, norms in traces.items():
        change = spec_of(name).change
        for seed in seeds:
            values, first, second = burst_after_burst(norms, change, 7 + seed)
            found = rule(values)
            flags = found["spike"] | found["transition"]
            first_hits += int(flags[first].sum())
            first_total += int(first.sum())
            second_hits += int(found["spike"][second].sum())
            second_total += int(second.sum())
            steps = np.arange(len(values))
            in_change = (steps >= change) & (steps < change + AFTER_CHANGE) if change else np.zeros(len(values), bool)
            bab_shifts += int(np.sum(~in_change[np.flatnonzero(found["level_shift"])]))
    # generated sequences (tau_quality's, unchanged)
    from benchmarks.tau_quality import SEQUENCES, generated
    gen = {}
    for kind in SEQUENCES:
        rows = []
        for seed in generated_seeds:
            n = 4000
            values, truth = generated(kind, n, seed)
            found = rule(values)
            flags = found["spike"] | found["transition"]
            sl = slice(WARMUP, None)
            recall = float(flags[sl][truth[sl]].mean())
            fpr = float(flags[sl][~truth[sl]].mean())
            after = int((flags & ~truth)[n // 2:].sum()) if kind == "5x level shift" else None
            rows.append((recall, fpr, after))
        gen[kind] = (float(np.mean([r[0] for r in rows])), float(np.mean([r[1] for r in rows])),
                     None if rows[0][2] is None else max(r[2] for r in rows))
    return {"band_recall": hits / totals, "band_count": totals, "recall": hits.sum() / totals.sum(),
            "fp": fp, "clean": clean, "fpr": fp / clean, "after_change": after_change,
            "shifts_outside": shifts_outside, "second_recall": second_hits / max(second_total, 1),
            "second_total": second_total, "first_recall": first_hits / max(first_total, 1),
            "bab_shifts": bab_shifts, "generated": gen, "per_trace": per_trace}


def print_summary(label: str, r: dict, detail: bool = False) -> None:
    bands = "  ".join(f"{name} {rec:.3f} ({int(c)})" for name, rec, c in
                      zip(BAND_NAMES, r["band_recall"], r["band_count"]))
    worst_after = max(r["after_change"].values()) if r["after_change"] else 0
    print(f"\n== {label}")
    print(f"real traces: recall 3-50x {r['recall']:.3f}  [{bands}]  false pos. {r['fp']}/{r['clean']} "
          f"= {100 * r['fpr']:.2f}%  flags in 300 steps after a change (max) {worst_after}  "
          f"shifts declared outside changes {r['shifts_outside']}")
    print(f"burst after burst: first bursts flagged {r['first_recall']:.3f}, second bursts flagged "
          f"{r['second_recall']:.3f} ({r['second_total']} steps), level shifts declared {r['bab_shifts']}")
    for kind, (recall, fpr, after) in r["generated"].items():
        print(f"generated {kind:<24} recall {recall:.3f}  false pos. {100 * fpr:.2f}%"
              + ("" if after is None else f"  flags after shift {after}"))
    if detail:
        for name, count in r["after_change"].items():
            print(f"  flags in the 300 steps after the change, {name}: {count}")
        for name, (recall, fpr) in r["per_trace"].items():
            print(f"  {name:<26} recall {recall:.3f}  false pos. {100 * fpr:.2f}%")


def goals(r: dict) -> dict[str, bool]:
    gen = r["generated"]
    return {
        "real recall 3-50x >= 0.97": r["recall"] >= 0.97,
        "real recall 3-6x >= 0.90": r["band_recall"][0] >= 0.90,
        "real false positives <= 0.3%": r["fpr"] <= 0.003,
        "<= 25 flags after a change": max(r["after_change"].values(), default=0) <= 25,
        "no burst declared a shift": r["shifts_outside"] == 0 and r["bab_shifts"] == 0,
        "burst after burst flagged": r["second_recall"] == 1.0,
        "generated recall >= 0.95, fp <= 0.5%": all(v[0] >= 0.95 and v[1] <= 0.005 for v in gen.values()),
        "<= 50 flags after the 5x shift": gen["5x level shift"][2] <= 50,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=None,
                        help="injection seeds 0..N-1 and generated-sequence seeds 0..N-1 (default: 2 and 3); "
                             "more seeds are cases the defaults were not tuned on")
    parser.add_argument("--heldout", action="store_true",
                        help="the held-out real traces (benchmarks/data/real_traces_heldout.npz) "
                             "instead of the ones the defaults were tuned on")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    label, rule = default_rule()
    seeds = None if args.seeds is None else tuple(range(args.seeds))
    generated_seeds = (0, 1, 2) if args.seeds is None else tuple(range(args.seeds))
    traces = None
    if args.heldout:
        traces = load(heldout=True)
        print(f"held-out real traces ({len(traces)}): " + ", ".join(traces))
    results = {name: evaluate(r, args.quick, seeds, generated_seeds, traces=traces)
               for name, r in (("old rule (k = 5, count-based shift)", None), (label, rule))}
    for name, r in results.items():
        print_summary(name, r, detail=True)
        print("goals: " + ", ".join(f"{g}: {'PASS' if ok else 'MISS'}" for g, ok in goals(r).items()))
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    return results


if __name__ == "__main__":
    main()

// The page's state, in plain objects: what lasts across runs (`app`) and what
// belongs to one opened run (`RunState`, created fresh each time a run opens).
// Each opened run owns one AbortController: opening another run aborts every
// request the previous one still had in flight, so no answer lands in the wrong run.
'use strict';

import { emptySeries, marksFromEvents } from './series.js';

export function createRunState(name) {
  const controller = new AbortController();
  const kinds = new Map();
  return {
    name,
    controller,
    series: emptySeries(),
    view: null, // {start, end} when zoomed, null for the whole run
    liveTail: [],
    liveTailPoints: 0,
    appendedSinceFetch: 0,
    maxStep: -Infinity,
    marks: marksFromEvents([]),
    events: [],
    stats: null,
    recommendation: null,
    histogram: null,
    tensors: null, // {blocks, modules, level}
    expanded: new Set(),
    selectedStep: null,
    contributions: null,
    whatifTouched: false,
    loaded: Promise.resolve(true), // the first loadSeries of this run (app.js)
    /**
     * A signal for one kind of request ("series", "events", ...): a newer request of
     * the same kind aborts the older one, and closing the run aborts them all.
     */
    signal(kind) {
      if (kinds.has(kind)) kinds.get(kind).abort();
      const own = new AbortController();
      kinds.set(kind, own);
      return AbortSignal.any([controller.signal, own.signal]);
    },
    close() {
      controller.abort();
    },
  };
}

/** State that outlives one run: the run list, overlays, user choices. */
export const app = {
  run: null, // the opened RunState
  runs: [],
  overlay: new Set(),
  overlaySeries: new Map(),
  window: null,
  scale: 'auto',
  level: 'block',
  normDrawn: false,
  runsRead: false, // a run list came from the server (panel-runs.js)
};

/** Close the opened run (aborting its requests) and start a fresh state for `name`. */
export function openRunState(name) {
  if (app.run) app.run.close();
  app.run = createRunState(name);
  return app.run;
}

/** Read by tests and benchmarks/dashboard_bench.py as `window.gradwatch`. */
export const probe = {
  firstNormChartMs: null,
  renders: { norm: 0, histogram: 0, heatmap: 0, contributions: 0, groupSpikes: 0 },
  live: 'off',
  livePoints: 0,
  whatif: null,
  run: null,
  scale: null,
  tensorsMs: null,
  tensorsFetchMs: null,
  marks: { appStart: performance.now() },
};

// Errors by source ("runs", "series", ...): a source that works again clears its own.
const errors = new Map();

export function showError(source, message) {
  if (message) errors.set(source, message);
  else errors.delete(source);
  const banner = document.getElementById('error-banner');
  banner.textContent = [...errors.values()].join(' · ');
  banner.hidden = errors.size === 0;
}

export function hasError(source) {
  return errors.has(source);
}

export function clearErrors() {
  errors.clear();
  showError('', '');
}

/**
 * Cross-panel actions (openRun, selectStep, jumpTo, viewChanged, ...), filled in by
 * app.js: panels call them without importing each other.
 */
export const actions = {};

/** A failed request as a banner line; an aborted one (a newer request, another run) is silent. */
export function reportError(source, error, what) {
  if (error && error.name === 'AbortError') return;
  let text = error && error.message ? error.message : String(error);
  if (error && error.status !== undefined && error.detail !== undefined) text = `${error.detail || error.status}`;
  else if (error instanceof TypeError) text = 'the server did not answer';
  showError(source, `${what}: ${text}`);
}

// The norm chart panel: the run's series (downsampled by the server), its marks,
// overlays of other runs, zoom (refetch of the range), the scale choice.
'use strict';

import { wireNumber, formatInt, debounce, throttle } from './util.js';
import { getJSON, runPath } from './api.js';
import { parseSeries, lastStep, mergeSteps } from './series.js';
import { normFigure } from './charts.js';
import { plotly, PLOT_CONFIG } from './plot.js';
import { chartPoints, seriesURL, takeEarlySeries, SERIES_FIELDS } from './boot.js';
import { app, actions, probe, showError, reportError } from './state.js';
import { currentRunInfo, renderSummary } from './panel-runs.js';

const $ = (id) => document.getElementById(id);
// SERIES_FIELDS: every column the server has, so a column added later (skipped, robust_z,
// level_shift) shows up by itself. chartPoints: about two per pixel. Both in boot.js, which
// asks for the opened run's series before the other modules have even loaded.
export { chartPoints };

/** The series answer: boot.js's early request when it asked for this URL (and got a 200), else getJSON. */
async function fetchSeries(run, params, signal) {
  const early = params.start === undefined ? takeEarlySeries(seriesURL(run.name)) : null;
  if (early) {
    try {
      const response = await early;
      if (response.ok) {
        const raw = await response.json();
        probe.marks.earlySeries = performance.now();
        return raw;
      }
    } catch {
      // Asked again below, where errors and the token prompt are handled.
    }
    if (signal.aborted) throw new DOMException('aborted', 'AbortError');
  }
  return getJSON(runPath(run.name, '/series'), params, { signal });
}

/** Fetch the run's series (or the zoomed range) and draw it. False when the run is unknown. */
export async function loadSeries() {
  const run = app.run;
  const signal = run.signal('series');
  const view = run.view;
  const tailFrom = run.liveTail.length;
  const params = { fields: SERIES_FIELDS, points: chartPoints() };
  if (view) { params.start = view.start; params.end = view.end; }
  let raw;
  try {
    raw = await fetchSeries(run, params, signal);
    showError('series', '');
  } catch (error) {
    if (signal.aborted) return true;
    reportError('series', error, `Run "${run.name}"`);
    return false;
  }
  if (signal.aborted) return true;
  if (probe.marks.seriesReceived === undefined) probe.marks.seriesReceived = performance.now();
  let series = parseSeries(raw);
  if (!view) {
    // Live points that arrived while this request was in flight may be missing from it.
    for (const chunk of run.liveTail) series = mergeSteps(series, chunk);
    run.liveTail = run.liveTail.slice(tailFrom);
    run.liveTailPoints = run.liveTail.reduce((sum, chunk) => sum + chunk.step.length, 0);
  }
  run.series = series;
  run.appendedSinceFetch = 0;
  if (!view) run.maxStep = Math.max(run.maxStep, lastStep(series));
  await renderNorm();
  renderSummary();
  return true;
}

export const loadSeriesSoon = debounce(() => { loadSeries(); }, 150);
export const refetchWholeRun = throttle(() => { if (app.run && !app.run.view) loadSeries(); }, 3000);

// Draws are serialised: each one builds its figure from the state at the time it runs.
let chain = Promise.resolve();
let queued = false;

export function scheduleRenderNorm() {
  if (queued) return;
  queued = true;
  window.requestAnimationFrame(() => {
    queued = false;
    renderNorm();
  });
}

export function renderNorm() {
  const next = chain.then(draw, draw);
  chain = next.catch(() => {});
  return next;
}

/** The figure the page draws now; `gradwatch report` builds the same one from the same inputs. */
export function currentFigure() {
  const run = app.run;
  const overlays = [...app.overlay].filter((name) => app.overlaySeries.has(name))
    .map((name) => ({ run: name, series: app.overlaySeries.get(name) }));
  const recommendation = run.recommendation || {};
  return normFigure({
    series: run.series,
    marks: run.marks,
    overlays,
    scale: app.scale,
    recommended: wireNumber(recommendation.threshold),
    cleanWindow: recommendation.clean_window || null,
    selectedStep: run.selectedStep,
    uirevision: run.name, // the x zoom survives a scale change ...
    scaleRevision: `${run.name}#${app.scale}`, // ... the y axis is redrawn for the new scale
  });
}

async function draw() {
  const Plotly = await plotly();
  if (!app.run) return;
  const element = $('norm-chart');
  const fig = currentFigure();
  probe.scale = { type: fig.scale.type, range: fig.scale.range, reason: fig.scale.reason };
  $('scale-note').textContent = app.scale === 'auto' ? `auto: ${fig.scale.reason}` : '';
  if (!app.normDrawn) {
    probe.marks.newPlotStart = performance.now();
    await Plotly.newPlot(element, fig.data, fig.layout, PLOT_CONFIG);
    app.normDrawn = true;
    if (probe.firstNormChartMs === null) {
      probe.firstNormChartMs = performance.now();
      performance.mark('gradwatch:first-norm-chart');
    }
    element.on('plotly_relayout', onRelayout);
    element.on('plotly_click', onClick);
  } else {
    await Plotly.react(element, fig.data, fig.layout, PLOT_CONFIG);
  }
  probe.renders.norm += 1;
}

function onRelayout(event) {
  const run = app.run;
  if (!event || !run) return;
  if (event['xaxis.autorange'] === true) {
    if (run.view) { run.view = null; actions.viewChanged(); }
    return;
  }
  let start = event['xaxis.range[0]'];
  let end = event['xaxis.range[1]'];
  if (Array.isArray(event['xaxis.range'])) [start, end] = event['xaxis.range'];
  if (start === undefined || end === undefined) return;
  run.view = { start: Math.max(0, Math.floor(Number(start))), end: Math.ceil(Number(end)) };
  $('chart-note').textContent = `steps ${formatInt(run.view.start)}–${formatInt(run.view.end)}`;
  actions.viewChanged();
}

function onClick(event) {
  const point = event && event.points && event.points[0];
  if (!point || typeof point.x !== 'number') return;
  actions.selectStep(Math.round(point.x));
}

export function jumpTo(step) {
  const run = app.run;
  const element = $('norm-chart');
  const info = currentRunInfo();
  const total = info && Number.isFinite(info.steps) ? info.steps : run.series.step.length;
  const half = Math.max(50, Math.min(2000, Math.round(total / 40)));
  actions.selectStep(step);
  if (app.normDrawn) {
    plotly().then((Plotly) => Plotly.relayout(element, {
      'xaxis.range': [Math.max(0, step - half), step + half], 'yaxis2.autorange': true,
    }));
  }
  element.scrollIntoView({ block: 'nearest', behavior: 'smooth' });
}

export async function resetZoom() {
  const Plotly = await plotly();
  if (!app.run) return;
  app.run.view = null;
  $('chart-note').textContent = '';
  if (app.normDrawn) await Plotly.relayout($('norm-chart'), { 'xaxis.autorange': true });
  actions.viewChanged();
}

export function setScale(mode) {
  app.scale = mode;
  if (app.normDrawn) scheduleRenderNorm();
}

// ---------------------------------------------------------------- overlays

export function toggleOverlay(name, on) {
  if (on) {
    app.overlay.add(name);
    loadOverlay(name);
  } else {
    app.overlay.delete(name);
    app.overlaySeries.delete(name);
    scheduleRenderNorm();
  }
}

export async function loadOverlay(name) {
  const run = app.run;
  const params = { fields: 'pre_norm', points: chartPoints() };
  if (run && run.view) { params.start = run.view.start; params.end = run.view.end; }
  try {
    const raw = await getJSON(runPath(name, '/series'), params, { signal: run ? run.signal(`overlay:${name}`) : undefined });
    if (!app.overlay.has(name)) return;
    app.overlaySeries.set(name, parseSeries(raw));
    scheduleRenderNorm();
  } catch (error) {
    reportError(`overlay:${name}`, error, `Overlay "${name}"`);
  }
}

export function refreshOverlays() {
  for (const name of app.overlay) loadOverlay(name);
}

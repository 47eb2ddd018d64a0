// The gradwatch dashboard: wires the panels (panel-*.js), the live feed
// (live.js) and the per-run state (state.js). Plain ES modules, no build step.
// Every string from the server reaches the page as text (util.el), never as HTML.
'use strict';

import { debounce, throttle } from './util.js';
import { adoptTokenFromAddress, currentToken, runPath } from './api.js';
import { plotly } from './plot.js';
import { app, actions, probe, openRunState, clearErrors, showError, hasError } from './state.js';
import { loadRuns, renderRuns, renderSummary, mostRecentRun } from './panel-runs.js';
import {
  loadSeries, loadSeriesSoon, refetchWholeRun, scheduleRenderNorm, chartPoints, jumpTo, resetZoom, setScale,
  toggleOverlay, loadOverlay, refreshOverlays,
} from './panel-norm.js';
import { loadThreshold, wireThreshold } from './panel-threshold.js';
import { loadTensors, loadTensorsSoon, loadTensorsLive, renderHeatmap, selectStep, wireTensors } from './panel-tensors.js';
import { loadMarks, loadEvents, loadEventsSoon, renderEvents, wireEvents } from './panel-events.js';
import { connectLive } from './live.js';
import { lastStep } from './series.js';

window.gradwatch = probe;
const $ = (id) => document.getElementById(id);
plotly().then(() => { probe.marks.plotlyReady = performance.now(); },
  (error) => showError('plotly', `${error.message}: charts cannot be drawn.`));

function openRun(name, { push } = { push: false }) {
  const run = openRunState(name);
  probe.run = name;
  app.overlay.delete(name);
  $('run-title').textContent = name;
  document.title = `${name} · gradwatch`;
  updateExportLink();
  clearErrors();
  if (push) {
    const url = new URL(window.location.href);
    url.searchParams.set('run', name);
    window.history.pushState({ run: name }, '', url.toString());
  }
  $('chart-note').textContent = '';
  renderRuns();
  renderSummary();
  $('contrib-title').textContent = 'Click a spike (chart marker or event) to see which tensors contributed';
  plotly().then((Plotly) => Plotly.purge($('contributions'))).catch(() => {});
  run.loaded = loadSeries();
  run.loaded.then((ok) => {
    if (run !== app.run) return;
    // The live feed after the first read, asking for what was stored since its last step.
    connectLive(name, ok ? lastStep(run.series) : null);
    // An unknown run: one message, not one per panel; the live feed brings it in if it starts.
    if (!ok) return;
    loadMarks();
    loadEvents();
    loadThreshold();
    loadTensors();
  });
}

const loadThresholdSoon = throttle(() => { if (app.run) loadThreshold(); }, 5000);
const loadRunsSoon = throttle(() => loadRuns(), 2000);

Object.assign(actions, {
  openRun,
  selectStep,
  jumpTo,
  toggleOverlay,
  loadOverlay,
  viewChanged() { loadSeriesSoon(); loadTensorsSoon(); refreshOverlays(); },
  stepSelected() { scheduleRenderNorm(); renderEvents(); },
  marksChanged() { scheduleRenderNorm(); renderSummary(); },
  resync() {
    if (hasError('series')) { openRun(app.run.name, { push: false }); return; }
    loadMarks();
    loadEvents();
    loadThresholdSoon();
    loadRuns();
  },
  liveResync() {
    loadSeries();
    actions.resync();
  },
  livePoints({ flagged }) {
    scheduleRenderNorm();
    if (!app.run.view && app.run.appendedSinceFetch > chartPoints()) refetchWholeRun();
    if (flagged) loadEventsSoon();
    loadThresholdSoon();
    loadRunsSoon();
    loadTensorsLive();
    renderSummary();
  },
});

/** The CSV download of the current run; a link cannot send a header, so the token rides in the query. */
function updateExportLink() {
  const token = currentToken();
  $('export-csv').href = app.run
    ? runPath(app.run.name, '/export.csv') + (token ? `?token=${encodeURIComponent(token)}` : '') : '#';
}

function wireControls() {
  $('export-csv').addEventListener('click', updateExportLink);
  $('y-scale').addEventListener('change', (event) => setScale(event.target.value));
  $('reset-zoom').addEventListener('click', () => resetZoom());
  wireThreshold();
  wireTensors();
  wireEvents();
  window.addEventListener('popstate', () => {
    const run = new URL(window.location.href).searchParams.get('run');
    if (run && (!app.run || run !== app.run.name)) openRun(run, { push: false });
  });
  window.addEventListener('resize', debounce(() => { if (app.run && app.run.tensors) renderHeatmap(); }, 300));
  setInterval(() => { renderRuns(); renderSummary(); }, 5000);
}

async function start() {
  adoptTokenFromAddress();
  wireControls();
  const requested = new URL(window.location.href).searchParams.get('run');
  if (requested) {
    openRun(requested, { push: false });
    // The run list after the first chart: its request and table are not on the chart's path.
    await app.run.loaded.catch(() => {});
  }
  const runs = await loadRuns();
  if (!requested && !app.run) {
    const recent = mostRecentRun(runs);
    if (recent) openRun(recent.name, { push: false });
  }
  setInterval(loadRuns, 5000);
}

start();

// The gradwatch dashboard: run list, norm chart with live updates, threshold
// panel, per-tensor view, events. Plain ES module, no build step. Every string
// from the server is put into the page with textContent (see util.el), never
// parsed as HTML.
'use strict';

import {
  wireNumber, truthy, el, formatNumber, formatInt, formatRate, parseTime, formatAgo, formatDate,
  median, throttle, debounce,
} from './util.js';
import {
  getJSON, runPath, liveSocketURL, adoptTokenFromAddress, askForToken, currentToken, AUTH_CLOSE_CODES, ApiError,
} from './api.js';
import { normFigure, histogramFigure, heatmapFigure, contributionFigure } from './charts.js';
import { STEP_COLUMNS } from './columns.js';

const SERIES_FIELDS = 'pre_norm,threshold,clipped,loss,spike,nonfinite';
const SERIES_COLUMNS = ['step', 'pre_norm', 'threshold', 'clipped', 'loss', 'spike', 'nonfinite'];
const BOOL_COLUMNS = new Set(Object.keys(STEP_COLUMNS).filter((name) => STEP_COLUMNS[name] === 'bool'));
const TENSOR_POINTS = 300;
const CONTRIBUTION_CONTEXT = 200; // steps before a selected step that define "usual"
const EVENT_LIMIT = 1000;
const LIVE_TAIL_LIMIT = 200000; // points kept to merge into a refetch that raced them
const PLOT_CONFIG = { responsive: true, displaylogo: false, modeBarButtonsToRemove: ['select2d', 'lasso2d'] };

// Read by tests and benchmarks/dashboard_bench.py.
const probe = {
  firstNormChartMs: null,
  renders: { norm: 0, histogram: 0, heatmap: 0, contributions: 0 },
  live: 'off',
  livePoints: 0,
  whatif: null,
  run: null,
  marks: { appStart: performance.now() }, // ms since navigation, for the benchmark's breakdown
};
window.gradwatch = probe;

const $ = (id) => document.getElementById(id);

const state = {
  generation: 0,
  run: null,
  runs: [],
  overlay: new Set(),
  overlaySeries: new Map(),
  series: emptySeries(),
  view: null, // {start, end} when zoomed, null for the whole run
  liveTail: [],
  liveTailPoints: 0,
  appendedSinceFetch: 0,
  maxStep: -Infinity, // highest step seen (fetch or live)
  seriesSeq: 0,
  marks: { spike: [], nonfinite: [] },
  events: [],
  stats: null,
  recommendation: null,
  histogram: null,
  window: null,
  log: false,
  selectedStep: null,
  whatifTouched: false,
  normDrawn: false,
};

// ---------------------------------------------------------------- series model

function emptySeries() {
  return Object.fromEntries(SERIES_COLUMNS.map((name) => [name, []]));
}

/** The API's columnar answer with floats parsed ("NaN" → NaN) and every column present. */
function parseSeries(raw) {
  const steps = (raw && raw.step) || [];
  const series = { step: steps.map(Number) };
  for (const name of SERIES_COLUMNS.slice(1)) {
    const column = raw && Array.isArray(raw[name]) ? raw[name] : null;
    if (!column) series[name] = new Array(steps.length).fill(null);
    else if (BOOL_COLUMNS.has(name)) series[name] = column.map(truthy);
    else series[name] = column.map(wireNumber);
  }
  return series;
}

function lastStep(series) {
  return series.step.length ? series.step[series.step.length - 1] : -Infinity;
}

/** Points of `chunk` after `after`, appended to `series` (new object, columns copied lazily). */
function appendAfter(series, chunk, after) {
  let from = 0;
  while (from < chunk.step.length && chunk.step[from] <= after) from += 1;
  if (from >= chunk.step.length) return series;
  const out = {};
  for (const name of SERIES_COLUMNS) out[name] = series[name].concat(chunk[name].slice(from));
  return out;
}

// ---------------------------------------------------------------- plotly

function plotlyLoaded() {
  return new Promise((resolve, reject) => {
    const check = () => {
      if (window.Plotly) { resolve(window.Plotly); return; }
      const script = $('plotly-script');
      if (!script) { document.addEventListener('DOMContentLoaded', check, { once: true }); return; }
      script.addEventListener('load', () => resolve(window.Plotly), { once: true });
      script.addEventListener('error', () => reject(new Error('/static/plotly.min.js did not load')), { once: true });
    };
    check();
  });
}
const plotly = plotlyLoaded();
plotly.then(() => { probe.marks.plotlyReady = performance.now(); }, () => {});

// ---------------------------------------------------------------- errors

// Errors by source ("runs", "series", ...): a source that works again clears its own.
const errors = new Map();

function showError(source, message) {
  if (message) errors.set(source, message);
  else errors.delete(source);
  const banner = $('error-banner');
  banner.textContent = [...errors.values()].join(' · ');
  banner.hidden = errors.size === 0;
}

function reportError(source, error, what) {
  if (error && error.name === 'AbortError') return;
  let text = error && error.message ? error.message : String(error);
  if (error instanceof ApiError) text = `${error.detail || error.status}`;
  else if (error instanceof TypeError) text = 'the server did not answer';
  showError(source, `${what}: ${text}`);
}

// ---------------------------------------------------------------- runs

function mostRecentRun(runs) {
  let best = null;
  let bestTime = -Infinity;
  for (const run of runs) {
    const updated = parseTime(run.updated);
    const time = updated ? updated.getTime() : -Infinity;
    if (best === null || time >= bestTime) { best = run; bestTime = time; }
  }
  return best;
}

function currentRunInfo() {
  return state.runs.find((run) => run.name === state.run) || null;
}

async function loadRuns() {
  let runs;
  try {
    runs = await getJSON('/api/runs');
    showError('runs', '');
  } catch (error) {
    reportError('runs', error, 'Run list');
    return state.runs;
  }
  const previous = new Map(state.runs.map((run) => [run.name, run]));
  state.runs = Array.isArray(runs) ? runs : [];
  renderRuns();
  renderSummary();
  for (const name of state.overlay) {
    const before = previous.get(name);
    const now = state.runs.find((run) => run.name === name);
    if (now && (!before || before.last_step !== now.last_step)) loadOverlay(name);
  }
  return state.runs;
}

function renderRuns() {
  const body = $('run-rows');
  const now = Date.now();
  const sorted = [...state.runs].sort((a, b) => {
    const ta = parseTime(a.updated);
    const tb = parseTime(b.updated);
    return (tb ? tb.getTime() : 0) - (ta ? ta.getTime() : 0);
  });
  const rows = sorted.map((run) => {
    const current = run.name === state.run;
    const checkbox = el('input', {
      type: 'checkbox', checked: current || state.overlay.has(run.name), disabled: current,
      title: current ? 'shown' : 'overlay this run on the norm chart',
    });
    checkbox.setAttribute('aria-label', `overlay ${run.name}`);
    checkbox.addEventListener('change', () => toggleOverlay(run.name, checkbox.checked));
    const link = el('a', { href: `?run=${encodeURIComponent(run.name)}` }, run.name);
    link.addEventListener('click', (event) => {
      if (event.metaKey || event.ctrlKey || event.shiftKey || event.button !== 0) return;
      event.preventDefault();
      openRun(run.name, { push: true });
    });
    const updated = parseTime(run.updated);
    const spikes = el('td', { className: 'num' }, formatInt(run.spikes));
    if (run.nonfinite > 0) {
      spikes.append(' ', el('span', { className: 'badge badge-bad', title: `${run.nonfinite} non-finite steps` }, 'NaN'));
    }
    return el('tr', { className: current ? 'current' : '' },
      el('td', {}, checkbox),
      el('td', { className: 'name' }, link),
      el('td', { className: 'num' }, formatInt(run.steps)),
      el('td', { className: 'num' }, formatInt(run.last_step)),
      el('td', { title: formatDate(updated) }, formatAgo(updated, now)),
      el('td', { className: 'num' }, formatRate(run.clip_rate)),
      spikes);
  });
  body.replaceChildren(...rows);
  $('no-runs').hidden = state.runs.length > 0;
}

function figure(label, value, tone, title) {
  return el('div', { className: `figure ${tone || ''}`, title: title || '' },
    el('div', { className: 'label' }, label), el('div', { className: 'value' }, value));
}

function renderSummary() {
  const summary = $('summary');
  if (!state.run) { summary.replaceChildren(); return; }
  const info = currentRunInfo() || {};
  const series = state.series;
  const n = series.step.length;
  const latestNorm = n ? series.pre_norm[n - 1] : null;
  const latestThreshold = n ? series.threshold[n - 1] : null;
  const stats = state.stats || {};
  const percentiles = stats.percentiles || {};
  const updated = parseTime(info.updated);
  const last = Math.max(info.last_step ?? -Infinity, state.view ? -Infinity : lastStep(series));
  const nonfinite = info.nonfinite ?? stats.nonfinite ?? 0;
  const clipRate = info.clip_rate ?? stats.clip_rate;
  summary.replaceChildren(
    figure('last step', formatInt(Number.isFinite(last) ? last : null)),
    figure('steps', formatInt(info.steps)),
    figure('latest norm', formatNumber(latestNorm),
      latestNorm !== null && !Number.isFinite(latestNorm) ? 'bad' : ''),
    figure('threshold', formatNumber(latestThreshold)),
    figure('p50 / p99', `${formatNumber(percentiles.p50)} / ${formatNumber(percentiles.p99)}`),
    figure('clip rate', formatRate(clipRate), clipRate > 0.05 ? 'warn' : ''),
    figure('spikes', formatInt(info.spikes), info.spikes > 0 ? 'warn' : ''),
    figure('non-finite', formatInt(nonfinite), nonfinite > 0 ? 'bad' : ''),
    figure('updated', formatAgo(updated), '', formatDate(updated)));

  const banner = $('nonfinite-banner');
  if (nonfinite > 0) {
    const latest = state.marks.nonfinite[0];
    const parts = [`⚠ ${formatInt(nonfinite)} step(s) with non-finite gradients (NaN/Inf)`];
    if (latest) parts.push(`, latest at step ${formatInt(latest.step)} `);
    banner.replaceChildren(parts.join(''));
    if (latest) {
      const show = el('button', { type: 'button', className: 'link' }, 'show');
      show.addEventListener('click', () => jumpTo(latest.step));
      banner.append(show);
    }
    banner.hidden = false;
  } else {
    banner.hidden = true;
  }
}

// ---------------------------------------------------------------- opening a run

function openRun(name, { push } = { push: false }) {
  state.generation += 1;
  state.run = name;
  probe.run = name;
  state.overlay.delete(name);
  state.series = emptySeries();
  state.view = null;
  state.liveTail = [];
  state.liveTailPoints = 0;
  state.appendedSinceFetch = 0;
  state.maxStep = -Infinity;
  state.marks = { spike: [], nonfinite: [] };
  state.events = [];
  state.stats = null;
  state.recommendation = null;
  state.histogram = null;
  state.selectedStep = null;
  state.whatifTouched = false;
  $('run-title').textContent = name;
  updateExportLink();
  document.title = `${name} · gradwatch`;
  errors.clear();
  showError('', '');
  if (push) {
    const url = new URL(window.location.href);
    url.searchParams.set('run', name);
    window.history.pushState({ run: name }, '', url.toString());
  }
  renderRuns();
  renderSummary();
  $('contrib-title').textContent = 'Click a spike (chart marker or event) to see which tensors contributed';
  plotly.then((Plotly) => Plotly.purge($('contributions'))).catch(() => {});
  connectLive(name);
  const generation = state.generation;
  loadSeries().then((ok) => {
    // An unknown run: one message, not one per panel; the live feed brings it in if it starts.
    if (!ok || generation !== state.generation) return;
    loadMarks();
    loadEvents();
    loadThreshold();
    loadTensors();
  });
}

// ---------------------------------------------------------------- norm chart

function chartPoints() {
  const width = $('norm-chart').clientWidth || 1000;
  return Math.max(1000, Math.min(4000, Math.round(width * 2)));
}

async function loadSeries() {
  const generation = state.generation;
  const seq = ++state.seriesSeq;
  const view = state.view;
  const tailFrom = state.liveTail.length;
  const params = { fields: SERIES_FIELDS, points: chartPoints() };
  if (view) { params.start = view.start; params.end = view.end; }
  let raw;
  try {
    raw = await getJSON(runPath(state.run, '/series'), params);
    showError('series', '');
  } catch (error) {
    if (generation === state.generation) reportError('series', error, `Run "${state.run}"`);
    return false;
  }
  if (generation !== state.generation || seq !== state.seriesSeq) return true;
  if (probe.marks.seriesReceived === undefined) probe.marks.seriesReceived = performance.now();
  let series = parseSeries(raw);
  if (!view) {
    // Live points that arrived while this request was in flight may be missing from it.
    for (const chunk of state.liveTail) series = appendAfter(series, chunk, lastStep(series));
    state.liveTail = state.liveTail.slice(tailFrom);
    state.liveTailPoints = state.liveTail.reduce((sum, chunk) => sum + chunk.step.length, 0);
  }
  state.series = series;
  state.appendedSinceFetch = 0;
  if (!view) state.maxStep = Math.max(state.maxStep, lastStep(series));
  await renderNorm();
  renderSummary();
  return true;
}

const loadSeriesSoon = debounce(() => { loadSeries(); }, 150);
const refetchWholeRun = throttle(() => { if (!state.view) loadSeries(); }, 3000);

// Draws are serialised: each one builds its figure from the state at the time it runs.
let normChain = Promise.resolve();
let renderQueued = false;

function scheduleRenderNorm() {
  if (renderQueued) return;
  renderQueued = true;
  window.requestAnimationFrame(() => {
    renderQueued = false;
    renderNorm();
  });
}

function renderNorm() {
  const next = normChain.then(drawNorm, drawNorm);
  normChain = next.catch(() => {});
  return next;
}

async function drawNorm() {
  const Plotly = await plotly;
  const element = $('norm-chart');
  const overlays = [...state.overlay]
    .filter((name) => state.overlaySeries.has(name))
    .map((name) => ({ run: name, series: state.overlaySeries.get(name) }));
  const fig = normFigure({
    series: state.series,
    marks: state.marks,
    overlays,
    log: state.log,
    recommended: state.recommendation ? wireNumber(state.recommendation.threshold) : null,
    selectedStep: state.selectedStep,
    uirevision: `${state.run}#${state.generation}`,
  });
  if (!state.normDrawn) {
    probe.marks.newPlotStart = performance.now();
    await Plotly.newPlot(element, fig.data, fig.layout, PLOT_CONFIG);
    state.normDrawn = true;
    if (probe.firstNormChartMs === null) {
      probe.firstNormChartMs = performance.now();
      performance.mark('gradwatch:first-norm-chart');
    }
    element.on('plotly_relayout', onNormRelayout);
    element.on('plotly_click', onNormClick);
  } else {
    await Plotly.react(element, fig.data, fig.layout, PLOT_CONFIG);
  }
  probe.renders.norm += 1;
}

function onNormRelayout(event) {
  if (!event) return;
  if (event['xaxis.autorange'] === true) {
    if (state.view) { state.view = null; loadSeriesSoon(); loadTensorsSoon(); refreshOverlays(); }
    return;
  }
  let start = event['xaxis.range[0]'];
  let end = event['xaxis.range[1]'];
  if (Array.isArray(event['xaxis.range'])) [start, end] = event['xaxis.range'];
  if (start === undefined || end === undefined) return;
  state.view = { start: Math.max(0, Math.floor(Number(start))), end: Math.ceil(Number(end)) };
  $('chart-note').textContent = `steps ${formatInt(state.view.start)}–${formatInt(state.view.end)}`;
  loadSeriesSoon();
  loadTensorsSoon();
  refreshOverlays();
}

function onNormClick(event) {
  const point = event && event.points && event.points[0];
  if (!point || typeof point.x !== 'number') return;
  selectStep(Math.round(point.x));
}

function jumpTo(step) {
  const element = $('norm-chart');
  const info = currentRunInfo();
  const total = info && Number.isFinite(info.steps) ? info.steps : state.series.step.length;
  const half = Math.max(50, Math.min(2000, Math.round(total / 40)));
  selectStep(step);
  if (state.normDrawn) {
    plotly.then((Plotly) => Plotly.relayout(element, {
      'xaxis.range': [Math.max(0, step - half), step + half], 'yaxis.autorange': true, 'yaxis2.autorange': true,
    }));
  }
  element.scrollIntoView({ block: 'nearest', behavior: 'smooth' });
}

// ---------------------------------------------------------------- overlays

function toggleOverlay(name, on) {
  if (on) {
    state.overlay.add(name);
    loadOverlay(name);
  } else {
    state.overlay.delete(name);
    state.overlaySeries.delete(name);
    scheduleRenderNorm();
  }
}

async function loadOverlay(name) {
  const params = { fields: 'pre_norm', points: chartPoints() };
  if (state.view) { params.start = state.view.start; params.end = state.view.end; }
  try {
    const raw = await getJSON(runPath(name, '/series'), params);
    if (!state.overlay.has(name)) return;
    state.overlaySeries.set(name, parseSeries(raw));
    scheduleRenderNorm();
  } catch (error) {
    reportError(`overlay:${name}`, error, `Overlay "${name}"`);
  }
}

function refreshOverlays() {
  for (const name of state.overlay) loadOverlay(name);
}

// ---------------------------------------------------------------- live updates

const live = { socket: null, run: null, attempt: 0, timer: null, everOpened: false };

function setIndicator(mode, text) {
  const indicator = $('live-indicator');
  indicator.className = `indicator indicator-${mode}`;
  $('live-text').textContent = text;
  probe.live = mode === 'live' ? 'live' : mode === 'wait' ? 'connecting' : 'disconnected';
  indicator.dataset.state = probe.live;
}

function connectLive(run) {
  clearTimeout(live.timer);
  if (live.socket) {
    const old = live.socket;
    live.socket = null;
    old.close(1000);
  }
  live.run = run;
  live.attempt = 0;
  live.everOpened = false;
  openSocket();
}

function openSocket() {
  const run = live.run;
  setIndicator('wait', 'connecting…');
  let socket;
  try {
    // After a disconnect, ask the server for what was stored meanwhile.
    const since = live.everOpened && Number.isFinite(state.maxStep) ? state.maxStep : null;
    socket = new WebSocket(liveSocketURL(run, since));
  } catch {
    scheduleReconnect();
    return;
  }
  live.socket = socket;
  const tokenUsed = currentToken();
  socket.addEventListener('open', () => {
    if (socket !== live.socket) return;
    const reconnected = live.everOpened;
    live.everOpened = true;
    live.attempt = 0;
    setIndicator('live', 'live');
    if (reconnected) resync();
  });
  socket.addEventListener('message', (event) => {
    if (socket !== live.socket) return;
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      return;
    }
    if (message && message.type === 'points' && (message.run === undefined || message.run === run)) {
      onLivePoints(message.data || {});
    }
  });
  socket.addEventListener('close', (event) => {
    if (socket !== live.socket) return;
    live.socket = null;
    if (AUTH_CLOSE_CODES.has(event.code)) {
      if (currentToken() !== tokenUsed) { openSocket(); return; } // a token arrived meanwhile
      setIndicator('off', 'disconnected: needs read token');
      askForToken('The live feed needs the read token (gradwatch serve --read-token).').then(() => {
        if (live.run === run) openSocket();
      });
      return;
    }
    scheduleReconnect();
  });
}

function scheduleReconnect() {
  const base = Math.min(10000, 500 * 2 ** live.attempt);
  const delay = Math.round(base * (0.75 + Math.random() * 0.5));
  live.attempt += 1;
  setIndicator('off', `disconnected, retrying in ${Math.max(1, Math.round(delay / 1000))} s`);
  clearTimeout(live.timer);
  live.timer = setTimeout(() => {
    if (live.run !== null) openSocket();
  }, delay);
}

/** After a reconnect: the socket's `since` brings the missed points; refresh the rest. */
function resync() {
  if (errors.has('series')) openRun(state.run, { push: false });
  loadMarks();
  loadEvents();
  loadThresholdSoon();
  loadRuns();
}

const loadThresholdSoon = throttle(() => loadThreshold(), 5000);
const loadEventsSoon = throttle(() => { loadMarks(); loadEvents(); }, 2000);
const loadRunsSoon = throttle(() => loadRuns(), 2000);
const loadTensorsLive = throttle(() => { if (!state.view) loadTensors(); }, 15000);

function onLivePoints(data) {
  const chunk = parseSeries(data);
  if (!chunk.step.length) return;
  if (errors.has('series')) { // the run did not exist when the page opened; now it does
    openRun(state.run, { push: false });
    return;
  }
  probe.livePoints += chunk.step.length;
  state.maxStep = Math.max(state.maxStep, lastStep(chunk));
  state.liveTail.push(chunk);
  state.liveTailPoints += chunk.step.length;
  while (state.liveTailPoints > LIVE_TAIL_LIMIT && state.liveTail.length > 1) {
    state.liveTailPoints -= state.liveTail.shift().step.length;
  }
  const before = state.series.step.length;
  state.series = appendAfter(state.series, chunk, lastStep(state.series));
  state.appendedSinceFetch += state.series.step.length - before;
  scheduleRenderNorm();
  if (!state.view && state.appendedSinceFetch > chartPoints()) refetchWholeRun();
  if (chunk.spike.some(Boolean) || chunk.nonfinite.some(Boolean) || chunk.clipped.some(Boolean)) loadEventsSoon();
  loadThresholdSoon();
  loadRunsSoon();
  loadTensorsLive();
  renderSummary();
}

// ---------------------------------------------------------------- events

async function loadMarks() {
  const generation = state.generation;
  const run = state.run;
  try {
    const [spikes, nonfinite] = await Promise.all([
      getJSON(runPath(run, '/events'), { kind: 'spike', limit: EVENT_LIMIT }),
      getJSON(runPath(run, '/events'), { kind: 'nonfinite', limit: EVENT_LIMIT }),
    ]);
    if (generation !== state.generation) return;
    const mark = (event) => ({ step: eventStep(event), value: wireNumber(event.value) });
    const marks = (events) => events.map(mark).filter((item) => item.step !== null);
    state.marks = { spike: marks(spikes), nonfinite: marks(nonfinite) };
    scheduleRenderNorm();
    renderSummary();
    // Show at once which tensors made the latest spike (or NaN), without moving the chart.
    if (state.selectedStep === null) {
      const latest = [state.marks.spike[0], state.marks.nonfinite[0]].filter(Boolean)
        .sort((a, b) => b.step - a.step)[0];
      if (latest) selectStep(latest.step);
    }
  } catch (error) {
    if (generation === state.generation) reportError('events', error, 'Events');
  }
}

async function loadEvents() {
  const generation = state.generation;
  const kind = $('event-kind').value;
  try {
    const events = await getJSON(runPath(state.run, '/events'), { kind, limit: EVENT_LIMIT });
    if (generation !== state.generation || kind !== $('event-kind').value) return;
    state.events = Array.isArray(events) ? events : [];
    showError('events', '');
    renderEvents();
  } catch (error) {
    if (generation === state.generation) reportError('events', error, 'Events');
  }
}

/** An event's step, null when it has none (a drop report may not): such an event has no place on the chart. */
function eventStep(event) {
  return typeof event.step === 'number' && Number.isInteger(event.step) ? event.step : null;
}

function renderEvents() {
  const rows = state.events.map((event) => {
    const step = eventStep(event);
    const kind = String(event.kind ?? '');
    const row = el('tr', { tabIndex: 0, className: step !== null && step === state.selectedStep ? 'selected' : '',
      dataset: { step: step === null ? '' : String(step) } },
      el('td', { className: 'num' }, formatInt(step)),
      el('td', { className: `kind kind-${kind.replace(/[^a-z]/g, '')}` }, kind),
      el('td', { className: 'num' }, formatNumber(event.value)),
      el('td', { className: 'num' }, formatNumber(event.threshold)),
      el('td', { className: 'message' }, event.message == null ? '' : String(event.message)),
      el('td', { title: formatDate(parseTime(event.time)) }, formatAgo(parseTime(event.time))));
    if (step !== null) {
      row.addEventListener('click', () => jumpTo(step));
      row.addEventListener('keydown', (key) => { if (key.key === 'Enter') jumpTo(step); });
    }
    return row;
  });
  $('event-rows').replaceChildren(...rows);
  const note = state.events.length >= EVENT_LIMIT ? `newest ${formatInt(EVENT_LIMIT)}` : `${formatInt(state.events.length)} events`;
  $('event-note').textContent = note;
}

// ---------------------------------------------------------------- threshold panel

async function loadThreshold() {
  const generation = state.generation;
  const run = state.run;
  const windowSize = state.window;
  try {
    const [stats, recommendation, histogram] = await Promise.all([
      getJSON(runPath(run, '/stats'), { window: windowSize }),
      getJSON(runPath(run, '/recommendation'), { window: windowSize }),
      getJSON(runPath(run, '/histogram'), { window: windowSize, bins: 60 }),
    ]);
    if (generation !== state.generation || windowSize !== state.window) return;
    state.stats = stats;
    state.recommendation = recommendation;
    state.histogram = histogram;
    showError('threshold', '');
  } catch (error) {
    if (generation === state.generation) reportError('threshold', error, 'Threshold');
    return;
  }
  renderRecommendation();
  if (!state.whatifTouched) {
    const recommended = wireNumber(state.recommendation.threshold);
    if (recommended !== null && Number.isFinite(recommended)) setWhatif(recommended, { fromUser: false });
  } else {
    requestWhatif();
  }
  configureSlider();
  await renderHistogram();
  scheduleRenderNorm();
  renderSummary();
}

function renderRecommendation() {
  const recommendation = state.recommendation || {};
  const threshold = wireNumber(recommendation.threshold);
  $('rec-threshold').textContent = formatNumber(threshold);
  const candidates = Array.isArray(recommendation.candidates) ? recommendation.candidates : [];
  const own = candidates.find((c) => wireNumber(c.threshold) === threshold);
  const count = state.stats && Number.isFinite(state.stats.count) ? state.stats.count : null;
  const windowText = state.window ? `last ${formatInt(state.window)} steps` : 'whole run';
  $('rec-rate').textContent = own
    ? `would clip ${formatRate(own.clip_rate)} of ${count === null ? 'the' : formatInt(count)} steps (${windowText})`
    : `(${windowText})`;
  $('rec-rationale').textContent = recommendation.rationale == null ? '' : String(recommendation.rationale);
  const rows = candidates.map((candidate) => {
    const value = wireNumber(candidate.threshold);
    const row = el('tr', { className: value === threshold ? 'recommended' : '' },
      el('td', {}, candidate.label == null ? '' : String(candidate.label)),
      el('td', { className: 'num' }, formatNumber(value)),
      el('td', { className: 'num' }, formatRate(candidate.clip_rate)));
    row.title = 'try this threshold';
    if (value !== null && Number.isFinite(value)) row.addEventListener('click', () => setWhatif(value, { fromUser: true }));
    return row;
  });
  const warnings = Array.isArray(recommendation.warnings) ? recommendation.warnings : [];
  $('rec-warnings').replaceChildren(...warnings.map((warning) => el('p', { className: 'warning' }, `⚠ ${warning}`)));
  $('candidate-rows').replaceChildren(...rows);
}

async function renderHistogram() {
  const Plotly = await plotly;
  const element = $('histogram');
  const histogram = state.histogram;
  if (!histogram || !Array.isArray(histogram.edges) || histogram.edges.length < 2) {
    Plotly.purge(element);
    return;
  }
  const fig = histogramFigure({
    histogram,
    percentiles: (state.recommendation && state.recommendation.percentiles) || (state.stats && state.stats.percentiles),
    recommended: state.recommendation ? wireNumber(state.recommendation.threshold) : null,
    whatif: currentWhatif(),
  });
  await Plotly.react(element, fig.data, fig.layout, PLOT_CONFIG);
  probe.renders.histogram += 1;
}

const renderHistogramSoon = debounce(() => { renderHistogram(); }, 50);

// What-if: the number input holds the threshold; the slider maps 0..1000 onto a
// log scale between a small norm and the largest one seen.
function sliderBounds() {
  const edges = state.histogram && Array.isArray(state.histogram.edges) ? state.histogram.edges.map(Number) : [];
  const finite = edges.filter(Number.isFinite);
  let high = finite.length ? Math.max(...finite) : 10;
  let low = finite.filter((v) => v > 0).reduce((min, v) => Math.min(min, v), Infinity);
  if (!(high > 0)) high = 1;
  if (!Number.isFinite(low) || low >= high) low = high / 1000;
  low = Math.max(low, high / 1e6);
  return { low, high };
}

function sliderToValue(position) {
  const { low, high } = sliderBounds();
  return low * (high / low) ** (position / 1000);
}

function valueToSlider(value) {
  const { low, high } = sliderBounds();
  if (!(value > 0)) return 0;
  return Math.round(Math.min(1000, Math.max(0, (1000 * Math.log(value / low)) / Math.log(high / low))));
}

function configureSlider() {
  const value = currentWhatif();
  if (value !== null) $('whatif-range').value = String(valueToSlider(value));
}

function currentWhatif() {
  const value = Number($('whatif-input').value);
  return $('whatif-input').value !== '' && Number.isFinite(value) ? value : null;
}

function setWhatif(value, { fromUser }) {
  if (fromUser) state.whatifTouched = true;
  $('whatif-input').value = String(Number(value.toPrecision(4)));
  $('whatif-range').value = String(valueToSlider(value));
  requestWhatif();
}

let whatifSeq = 0;
const requestWhatif = debounce(async () => {
  const threshold = currentWhatif();
  renderHistogramSoon();
  const output = $('whatif-output');
  if (threshold === null || !state.run) { output.textContent = '–'; return; }
  const seq = ++whatifSeq;
  const generation = state.generation;
  try {
    const result = await getJSON(runPath(state.run, '/whatif'), { threshold, window: state.window });
    if (seq !== whatifSeq || generation !== state.generation) return;
    output.textContent = `would clip ${formatRate(result.clip_rate)} (${formatInt(result.clipped)} of ${formatInt(result.count)} steps)`;
    output.dataset.threshold = String(threshold);
    output.dataset.clipRate = String(result.clip_rate);
    probe.whatif = { threshold, clip_rate: result.clip_rate, clipped: result.clipped, count: result.count };
  } catch (error) {
    reportError('whatif', error, 'What-if');
  }
}, 120);

// ---------------------------------------------------------------- per-tensor view

async function loadTensors() {
  const generation = state.generation;
  const params = { points: TENSOR_POINTS };
  if (state.view) { params.start = state.view.start; params.end = state.view.end; }
  let tensors;
  try {
    tensors = await getJSON(runPath(state.run, '/tensors'), params);
  } catch (error) {
    if (generation === state.generation) reportError('tensors', error, 'Per-tensor norms');
    return;
  }
  if (generation !== state.generation) return;
  state.tensors = tensors;
  await renderHeatmap();
}

const loadTensorsSoon = debounce(() => { loadTensors(); }, 250);

let heatmapWired = false;

async function renderHeatmap() {
  const Plotly = await plotly;
  const element = $('heatmap');
  const tensors = state.tensors;
  const names = tensors && Array.isArray(tensors.names) ? tensors.names : [];
  if (!names.length || !tensors.step || !tensors.step.length) {
    Plotly.purge(element);
    heatmapWired = false;
    element.style.height = '40px';
    $('tensor-note').textContent = 'no per-tensor norms recorded for this run';
    return;
  }
  $('tensor-note').textContent = `${formatInt(names.length)} tensors`;
  element.style.height = `${Math.max(220, Math.min(700, 60 + names.length * 14))}px`;
  const fig = heatmapFigure({ tensors, selectedStep: state.selectedStep, uirevision: `${state.run}#${state.generation}` });
  await Plotly.react(element, fig.data, fig.layout, PLOT_CONFIG);
  if (!heatmapWired && element.on) {
    heatmapWired = true;
    element.on('plotly_click', (event) => {
      const point = event && event.points && event.points[0];
      if (point && typeof point.x === 'number') selectStep(Math.round(point.x));
    });
  }
  probe.renders.heatmap += 1;
}

/** Select a step: mark it on the charts and show which tensors made its norm. */
async function selectStep(step) {
  state.selectedStep = step;
  scheduleRenderNorm();
  if (state.tensors) renderHeatmap();
  renderEvents();
  const generation = state.generation;
  const title = $('contrib-title');
  title.textContent = `Step ${formatInt(step)}: loading per-tensor norms…`;
  let tensors;
  try {
    tensors = await getJSON(runPath(state.run, '/tensors'), {
      start: Math.max(0, step - CONTRIBUTION_CONTEXT), end: step, points: CONTRIBUTION_CONTEXT + 1,
    });
  } catch (error) {
    reportError('tensors', error, 'Per-tensor norms');
    return;
  }
  if (generation !== state.generation || step !== state.selectedStep) return;
  const steps = (tensors.step || []).map(Number);
  const names = tensors.names || [];
  let column = steps.lastIndexOf(step);
  const exact = column >= 0;
  if (!exact) column = steps.length - 1;
  const Plotly = await plotly;
  if (!names.length || column < 0) {
    title.textContent = `Step ${formatInt(step)}: no per-tensor norms recorded`;
    Plotly.purge($('contributions'));
    return;
  }
  const rows = names.map((name, index) => {
    const row = (tensors.norms[index] || []).map(wireNumber);
    const norm = row[column];
    const usual = median(row.slice(0, column));
    return { name, norm, ratio: usual ? norm / usual : NaN };
  });
  state.contributions = { step: steps[column], rows };
  const context = column;
  title.textContent = exact
    ? `Step ${formatInt(step)}: tensors ranked by ${$('contrib-by').value === 'norm' ? 'norm' : `norm ÷ median of the ${formatInt(context)} steps before`}`
    : `Step ${formatInt(step)} has no per-tensor norms; showing step ${formatInt(steps[column])}`;
  await renderContributions();
}

async function renderContributions() {
  if (!state.contributions) return;
  const Plotly = await plotly;
  const element = $('contributions');
  const fig = contributionFigure({ rows: state.contributions.rows, by: $('contrib-by').value });
  element.style.height = `${fig.layout.height}px`;
  await Plotly.react(element, fig.data, fig.layout, PLOT_CONFIG);
  probe.renders.contributions += 1;
}

// ---------------------------------------------------------------- controls

function applyWindowChoice() {
  const choice = $('window-select').value;
  const custom = $('window-custom');
  custom.hidden = choice !== 'custom';
  let windowSize = null;
  if (choice === 'custom') {
    const value = Math.floor(Number(custom.value));
    if (!(value > 0)) return;
    windowSize = value;
  } else if (choice) {
    windowSize = Number(choice);
  }
  state.window = windowSize;
  if (state.run) loadThreshold();
}

/** The CSV download of the current run; a link cannot send a header, so the token rides in the query. */
function updateExportLink() {
  const token = currentToken();
  $('export-csv').href = state.run
    ? runPath(state.run, '/export.csv') + (token ? `?token=${encodeURIComponent(token)}` : '') : '#';
}

function wireControls() {
  $('export-csv').addEventListener('click', updateExportLink);
  $('log-scale').addEventListener('change', async (event) => {
    state.log = event.target.checked;
    if (!state.normDrawn) return;
    const Plotly = await plotly;
    await Plotly.relayout($('norm-chart'), { 'yaxis.type': state.log ? 'log' : 'linear', 'yaxis.autorange': true });
    scheduleRenderNorm();
  });
  $('reset-zoom').addEventListener('click', async () => {
    const Plotly = await plotly;
    state.view = null;
    $('chart-note').textContent = '';
    if (state.normDrawn) await Plotly.relayout($('norm-chart'), { 'xaxis.autorange': true, 'yaxis.autorange': true });
    loadSeries();
    loadTensorsSoon();
    refreshOverlays();
  });
  $('window-select').addEventListener('change', applyWindowChoice);
  $('window-custom').addEventListener('change', applyWindowChoice);
  $('whatif-input').addEventListener('input', () => {
    const value = currentWhatif();
    state.whatifTouched = true;
    if (value !== null) $('whatif-range').value = String(valueToSlider(value));
    requestWhatif();
  });
  $('whatif-range').addEventListener('input', (event) => {
    setWhatif(sliderToValue(Number(event.target.value)), { fromUser: true });
  });
  $('event-kind').addEventListener('change', () => { if (state.run) loadEvents(); });
  $('contrib-by').addEventListener('change', () => {
    if (state.selectedStep !== null) selectStep(state.selectedStep);
  });
  window.addEventListener('popstate', () => {
    const run = new URL(window.location.href).searchParams.get('run');
    if (run && run !== state.run) openRun(run, { push: false });
  });
  setInterval(() => { renderRuns(); renderSummary(); }, 5000);
}

// ---------------------------------------------------------------- start

async function start() {
  adoptTokenFromAddress();
  wireControls();
  const requested = new URL(window.location.href).searchParams.get('run');
  if (requested) openRun(requested, { push: false });
  const runs = await loadRuns();
  if (!requested && !state.run) {
    const recent = mostRecentRun(runs);
    if (recent) openRun(recent.name, { push: false });
  }
  setInterval(loadRuns, 5000);
}

plotly.catch((error) => showError('plotly', `${error.message}: charts cannot be drawn.`));
start();

// Threshold panel: the recommendation with its rationale (and, from newer servers,
// its explanation and clean window), the histogram, the what-if control.
'use strict';

import { wireNumber, el, formatNumber, formatInt, formatRate, tidyNumbers, debounce } from './util.js';
import { getJSON, runPath } from './api.js';
import { histogramFigure } from './charts.js';
import { plotly, PLOT_CONFIG } from './plot.js';
import { app, probe, showError, reportError } from './state.js';
import { scheduleRenderNorm } from './panel-norm.js';
import { renderSummary } from './panel-runs.js';

const $ = (id) => document.getElementById(id);

export async function loadThreshold() {
  const run = app.run;
  const signal = run.signal('threshold');
  const windowSize = app.window;
  try {
    const [stats, recommendation, histogram] = await Promise.all([
      getJSON(runPath(run.name, '/stats'), { window: windowSize }, { signal }),
      getJSON(runPath(run.name, '/recommendation'), { window: windowSize }, { signal }),
      getJSON(runPath(run.name, '/histogram'), { window: windowSize, bins: 60 }, { signal }),
    ]);
    if (signal.aborted) return;
    run.stats = stats;
    run.recommendation = recommendation;
    run.histogram = histogram;
    showError('threshold', '');
  } catch (error) {
    if (!signal.aborted) reportError('threshold', error, 'Threshold');
    return;
  }
  renderRecommendation();
  if (!run.whatifTouched) {
    const recommended = wireNumber(run.recommendation.threshold);
    if (recommended !== null && Number.isFinite(recommended)) setWhatif(recommended, { fromUser: false });
  } else {
    requestWhatif();
  }
  configureSlider();
  await renderHistogram();
  scheduleRenderNorm();
  renderSummary();
}

export const loadThresholdSoon = debounce(() => { if (app.run) loadThreshold(); }, 50);

function explanationLines(recommendation) {
  // Newer servers explain the number and name the clean window; older ones do not: nothing shown.
  const lines = [];
  const explanation = recommendation.explanation;
  if (typeof explanation === 'string') lines.push(explanation);
  else if (Array.isArray(explanation)) lines.push(...explanation.map(String));
  else if (explanation && typeof explanation === 'object') {
    for (const [key, value] of Object.entries(explanation)) lines.push(`${key}: ${typeof value === 'number' ? formatNumber(value, 4) : String(value)}`);
  }
  const clean = recommendation.clean_window;
  if (clean && typeof clean === 'object') {
    const parts = [];
    if (clean.start !== undefined && clean.end !== undefined) parts.push(`steps ${formatInt(clean.start)}–${formatInt(clean.end)}`);
    if (typeof clean.steps === 'number') parts.push(`${formatInt(clean.steps)} clean steps`);
    if (typeof clean.excluded === 'number') parts.push(`${formatInt(clean.excluded)} left out`);
    if (parts.length) lines.push(`clean window: ${parts.join(', ')}`);
  }
  return lines;
}

/** "last 500 steps: 1,000–1,499" from the window the server says it used; the asked one otherwise. */
export function recommendationWindowText(recommendation, asked = null) {
  const span = recommendation && recommendation.window;
  if (span && Number.isInteger(span.steps) && Number.isInteger(span.start) && Number.isInteger(span.end)) {
    return `last ${formatInt(span.steps)} steps: ${formatInt(span.start)}–${formatInt(span.end)}`;
  }
  return asked ? `last ${formatInt(asked)} steps` : 'the server\'s default window';
}

export function renderRecommendation() {
  const run = app.run;
  const recommendation = run.recommendation || {};
  const threshold = wireNumber(recommendation.threshold);
  $('rec-threshold').textContent = formatNumber(threshold, 4);
  const candidates = Array.isArray(recommendation.candidates) ? recommendation.candidates : [];
  const own = candidates.find((c) => wireNumber(c.threshold) === threshold);
  // The candidates' clip rates are over the recommendation's clean steps, in the window it
  // names: by default the last 10% of the run (at least 500 steps), not the whole run.
  const count = Number.isFinite(recommendation.count) ? recommendation.count : null;
  const windowText = recommendationWindowText(recommendation, app.window);
  $('rec-rate').textContent = own
    ? `would clip ${formatRate(own.clip_rate)} of ${count === null ? 'the' : formatInt(count)} clean steps (${windowText})`
    : `(${windowText})`;
  $('rec-rationale').textContent = tidyNumbers(recommendation.rationale ?? '');
  $('rec-explanation').replaceChildren(...explanationLines(recommendation).map((line) => el('li', {}, tidyNumbers(line))));
  const rows = candidates.map((candidate) => {
    const value = wireNumber(candidate.threshold);
    const row = el('tr', { className: value === threshold ? 'recommended' : '' },
      el('td', {}, tidyNumbers(candidate.label ?? '')),
      el('td', { className: 'num' }, formatNumber(value, 4)),
      el('td', { className: 'num' }, formatRate(candidate.clip_rate)));
    row.title = 'try this threshold';
    if (value !== null && Number.isFinite(value)) row.addEventListener('click', () => setWhatif(value, { fromUser: true }));
    return row;
  });
  const warnings = Array.isArray(recommendation.warnings) ? recommendation.warnings : [];
  $('rec-warnings').replaceChildren(...warnings.map((warning) => el('p', { className: 'warning' }, `⚠ ${tidyNumbers(warning)}`)));
  $('candidate-rows').replaceChildren(...rows);
}

export async function renderHistogram() {
  const Plotly = await plotly();
  const run = app.run;
  const element = $('histogram');
  const histogram = run && run.histogram;
  if (!histogram || !Array.isArray(histogram.edges) || histogram.edges.length < 2) {
    Plotly.purge(element);
    return;
  }
  const fig = histogramFigure({
    histogram,
    percentiles: (run.recommendation && run.recommendation.percentiles) || (run.stats && run.stats.percentiles),
    recommended: run.recommendation ? wireNumber(run.recommendation.threshold) : null,
    whatif: currentWhatif(),
  });
  await Plotly.react(element, fig.data, fig.layout, PLOT_CONFIG);
  probe.renders.histogram += 1;
}

const renderHistogramSoon = debounce(() => { renderHistogram(); }, 50);

// What-if: the number input holds the threshold; the slider maps 0..1000 onto a
// log scale between a small norm and the largest one seen.
function sliderBounds() {
  const histogram = app.run && app.run.histogram;
  const edges = histogram && Array.isArray(histogram.edges) ? histogram.edges.map(Number) : [];
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

export function setWhatif(value, { fromUser }) {
  if (fromUser && app.run) app.run.whatifTouched = true;
  $('whatif-input').value = String(Number(value.toPrecision(4)));
  $('whatif-range').value = String(valueToSlider(value));
  requestWhatif();
}

const requestWhatif = debounce(async () => {
  const threshold = currentWhatif();
  renderHistogramSoon();
  const output = $('whatif-output');
  const run = app.run;
  if (threshold === null || !run) { output.textContent = '–'; return; }
  const signal = run.signal('whatif');
  try {
    const result = await getJSON(runPath(run.name, '/whatif'), { threshold, window: app.window }, { signal });
    if (signal.aborted) return;
    output.textContent = `would clip ${formatRate(result.clip_rate)} (${formatInt(result.clipped)} of ${formatInt(result.count)} steps)`;
    output.dataset.threshold = String(threshold);
    output.dataset.clipRate = String(result.clip_rate);
    probe.whatif = { threshold, clip_rate: result.clip_rate, clipped: result.clipped, count: result.count };
  } catch (error) {
    if (!signal.aborted) reportError('whatif', error, 'What-if');
  }
}, 120);

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
  app.window = windowSize;
  if (app.run) loadThreshold();
}

export function wireThreshold() {
  $('window-select').addEventListener('change', applyWindowChoice);
  $('window-custom').addEventListener('change', applyWindowChoice);
  $('whatif-input').addEventListener('input', () => {
    const value = currentWhatif();
    if (app.run) app.run.whatifTouched = true;
    if (value !== null) $('whatif-range').value = String(valueToSlider(value));
    requestWhatif();
  });
  $('whatif-range').addEventListener('input', (event) => {
    setWhatif(sliderToValue(Number(event.target.value)), { fromUser: true });
  });
}

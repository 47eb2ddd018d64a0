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

/** The recommendation's smallest window (the server refuses fewer: 422). */
export const MIN_RECOMMENDATION_WINDOW = 100;

/** The window the recommendation and the what-if ask for: the chosen one, at least 100 steps. */
export function recommendationWindow(windowSize = app.window) {
  return windowSize === null ? null : Math.max(windowSize, MIN_RECOMMENDATION_WINDOW);
}

export async function loadThreshold() {
  const run = app.run;
  const signal = run.signal('threshold');
  const windowSize = app.window;
  try {
    // The cards are whole-run figures, all from this one /stats read (panel-runs.js).
    const [stats, recommendation, histogram] = await Promise.all([
      getJSON(runPath(run.name, '/stats'), {}, { signal }),
      getJSON(runPath(run.name, '/recommendation'), { window: recommendationWindow(windowSize) }, { signal }),
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
    else requestWhatif();
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

/** "steps 1,500–1,999" (+ "since the level shift") of a `{start, end}` span; '' without one. */
export function spanText(span) {
  if (!span || !Number.isInteger(span.start) || !Number.isInteger(span.end)) return '';
  return `steps ${formatInt(span.start)}–${formatInt(span.end)}${span.after_level_shift ? ' (since the level shift)' : ''}`;
}

/** The span the raw clip rates are over: `rate_window` (newer servers), else `window`. */
export function rateWindow(recommendation) {
  const span = recommendation && (recommendation.rate_window || recommendation.window);
  if (!span) return null;
  return { ...span, finite: Number.isInteger(span.finite) ? span.finite : span.steps };
}

export function renderRecommendation() {
  const run = app.run;
  const recommendation = run.recommendation || {};
  const threshold = wireNumber(recommendation.threshold);
  $('rec-threshold').textContent = formatNumber(threshold, 4);
  const candidates = Array.isArray(recommendation.candidates) ? recommendation.candidates : [];
  // The headline: the RAW clip rate over the recommendation's rate window (every finite step
  // from its start, or from the first clean step after a level shift), the figure the what-if
  // box (default), `gradwatch recommend` and the report give for the same threshold. The clean
  // rate follows, labelled as such.
  const span = rateWindow(recommendation);
  const raw = wireNumber(recommendation.clip_rate_raw);
  const clean = wireNumber(recommendation.clip_rate_clean);
  const count = Number.isFinite(recommendation.count) ? recommendation.count : null;
  const rate = $('rec-rate');
  if (threshold !== null && span && raw !== null) {
    rate.textContent = `would clip ${formatRate(raw)} of the ${formatInt(span.finite)} finite ${spanText(span)}`
      + (clean !== null ? ` · ${formatRate(clean)} of its ${count === null ? '' : `${formatInt(count)} `}clean steps` : '');
    Object.assign(rate.dataset, { clipRate: String(raw), start: String(span.start), end: String(span.end), count: String(span.finite) });
  } else {
    rate.textContent = `(${recommendationWindowText(recommendation, recommendationWindow())})`;
    for (const key of ['clipRate', 'start', 'end', 'count']) delete rate.dataset[key];
  }
  $('rec-rationale').textContent = tidyNumbers(recommendation.rationale ?? '');
  $('rec-explanation').replaceChildren(...explanationLines(recommendation).map((line) => el('li', {}, tidyNumbers(line))));
  const head = $('candidate-raw-head');
  head.textContent = 'would clip';
  head.title = span ? `the finite ${spanText(span)}, as the headline and the what-if` : '';
  $('candidate-note').textContent = span && candidates.length
    ? `would clip: of the ${formatInt(span.finite)} finite ${spanText(span)}, as the headline and the what-if; `
      + `clean steps only: of its ${count === null ? '' : `${formatInt(count)} `}clean steps (spikes, non-finite and level-shift steps left out)` : '';
  const rows = candidates.map((candidate) => {
    const value = wireNumber(candidate.threshold);
    const row = el('tr', { className: value === threshold ? 'recommended' : '' },
      el('td', {}, tidyNumbers(candidate.label ?? '')),
      el('td', { className: 'num' }, formatNumber(value, 4)),
      el('td', { className: 'num', dataset: { clipRate: String(candidate.clip_rate_raw) } },
        formatRate(wireNumber(candidate.clip_rate_raw))),
      el('td', { className: 'num hint' }, formatRate(wireNumber(candidate.clip_rate))));
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
    whatif: currentWhatif() > 0 ? currentWhatif() : null, // a refused threshold is not drawn
  });
  await Plotly.react(element, fig.data, fig.layout, PLOT_CONFIG);
  probe.renders.histogram += 1;
  const shown = histogram.window || null;
  const clean = run.recommendation && run.recommendation.clean_window;
  $('hist-note').textContent = [
    shown ? `histogram: ${formatInt(histogram.count)} finite steps, ${spanText(shown)} (${app.window === null ? 'whole run' : `last ${formatInt(app.window)} steps`})` : '',
    clean && Number.isInteger(clean.steps) && clean.steps > 0
      ? `dotted lines: percentiles of the ${formatInt(clean.steps)} clean steps, ${spanText(clean)}` : '',
  ].filter(Boolean).join(' · ');
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

/** The what-if threshold: the input's number, or the exact value behind it when a threshold was
 * set from the page (the recommendation, a candidate, the slider) and shown rounded. */
function currentWhatif() {
  const input = $('whatif-input');
  if (input.value !== '' && input.value === input.dataset.shown) return Number(input.dataset.exact);
  const value = Number(input.value);
  return input.value !== '' && Number.isFinite(value) ? value : null;
}

export function setWhatif(value, { fromUser }) {
  if (fromUser && app.run) app.run.whatifTouched = true;
  const input = $('whatif-input');
  input.value = String(Number(value.toPrecision(4)));
  input.dataset.shown = input.value; // shown rounded, asked exact: the recommendation's own figure
  input.dataset.exact = String(value);
  $('whatif-range').value = String(valueToSlider(value));
  requestWhatif();
}

function showWhatif(text, data = {}) {
  const output = $('whatif-output');
  output.textContent = text;
  for (const key of ['threshold', 'clipRate', 'start', 'end', 'count', 'over']) delete output.dataset[key];
  Object.assign(output.dataset, data);
}

export const requestWhatif = debounce(async () => {
  const threshold = currentWhatif();
  renderHistogramSoon();
  const run = app.run;
  if (threshold === null || !run) { showWhatif('–'); return; }
  if (!(threshold > 0)) { // the server refuses it too (422): say so here, in words
    showWhatif('The threshold must be a number above 0.', { threshold: String(threshold) });
    probe.whatif = { threshold, clip_rate: null, refused: true };
    return;
  }
  const over = $('whatif-over').value === 'run' ? 'run' : 'window';
  const signal = run.signal('whatif');
  try {
    const params = { threshold, over, window: over === 'window' ? recommendationWindow() : null };
    const result = await getJSON(runPath(run.name, '/whatif'), params, { signal });
    if (signal.aborted) return;
    const span = result.window || {};
    const where = over === 'run' ? 'whole run' : 'the recommendation\'s window';
    showWhatif(`would clip ${formatRate(result.clip_rate)} (${formatInt(result.clipped)} of ${formatInt(result.count)} steps, `
      + `${spanText(span) || 'no steps'}: ${where})`, {
      threshold: String(threshold), clipRate: String(result.clip_rate), start: String(span.start),
      end: String(span.end), count: String(result.count), over,
    });
    showError('whatif', '');
    probe.whatif = { threshold, clip_rate: result.clip_rate, clipped: result.clipped, count: result.count,
      start: span.start, end: span.end, over };
  } catch (error) {
    if (!signal.aborted) reportError('whatif', error, 'What-if');
  }
}, 120);

function applyWindowChoice() {
  const choice = $('window-select').value;
  const custom = $('window-custom');
  custom.hidden = choice !== 'custom';
  const note = $('window-note');
  let windowSize = null;
  if (choice === 'custom') {
    const value = Math.floor(Number(custom.value));
    if (custom.value === '' || !(value >= 1)) {
      note.textContent = custom.value === '' ? '' : 'The window must be a whole number of steps, at least 1.';
      note.hidden = custom.value === '';
      return;
    }
    windowSize = value;
  } else if (choice) {
    windowSize = Number(choice);
  }
  note.hidden = !(windowSize !== null && windowSize < MIN_RECOMMENDATION_WINDOW);
  note.textContent = note.hidden ? '' : `The recommendation and the what-if need at least ${MIN_RECOMMENDATION_WINDOW} steps: `
    + `they use the last ${MIN_RECOMMENDATION_WINDOW}; the histogram shows the last ${formatInt(windowSize)}.`;
  app.window = windowSize;
  if (app.run) loadThreshold();
}

export function wireThreshold() {
  $('window-select').addEventListener('change', applyWindowChoice);
  $('window-custom').addEventListener('change', applyWindowChoice);
  $('whatif-over').addEventListener('change', () => requestWhatif());
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

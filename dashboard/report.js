// `gradwatch report`: draws the offline report from the data the command embedded
// (a <script type="application/json"> element), with the page's own chart code
// (charts.js). report.py inlines this module and the ones it imports.
'use strict';

import { el, formatNumber, formatInt, formatRate, tidyNumbers, wireNumber } from './util.js';
import { parseSeries, marksFromEvents, eventStep } from './series.js';
import { normFigure, histogramFigure, heatmapFigure, tensorRows, groupSpikeFigure } from './charts.js';

const CONFIG = { displaylogo: false, responsive: true };

/** The figures of a report, from the same inputs the page passes to the same builders. */
export function reportFigures(data) {
  const series = parseSeries(data.series);
  const marks = marksFromEvents(data.events);
  const exact = marksFromEvents([...(data.spikes || []), ...(data.nonfinite || [])]);
  marks.spike = exact.spike;
  marks.nonfinite = exact.nonfinite;
  const recommendation = data.recommendation || {};
  const figures = {
    norm: normFigure({
      series, marks, overlays: [], scale: 'auto', recommended: wireNumber(recommendation.threshold),
      cleanWindow: recommendation.clean_window || null, selectedStep: null, uirevision: data.run,
    }),
  };
  if (data.histogram && Array.isArray(data.histogram.edges) && data.histogram.edges.length >= 2) {
    figures.histogram = histogramFigure({
      histogram: data.histogram,
      percentiles: recommendation.percentiles || (data.stats && data.stats.percentiles),
      recommended: wireNumber(recommendation.threshold),
      whatif: null,
    });
  }
  const tensors = data.tensors;
  if (tensors && Array.isArray(tensors.names) && tensors.names.length && tensors.step && tensors.step.length) {
    const level = tensors.group || 'tensor';
    const rows = tensorRows({ blocks: tensors, level: level === 'tensor' ? 'tensor' : 'block' });
    figures.heatmap = heatmapFigure({ rows, step: tensors.step, uirevision: data.run });
    figures.heatmap.layout.height = Math.max(260, Math.min(900, 60 + rows.length * 14));
    if (Array.isArray(tensors.spikes) && tensors.spikes.some((count) => count > 0)) {
      figures.groupSpikes = groupSpikeFigure({ names: tensors.names, spikes: tensors.spikes });
    }
  }
  return figures;
}

function table(headers, rows, numeric = new Set()) {
  return el('table', {},
    el('thead', {}, el('tr', {}, ...headers.map((h, i) => el('th', { className: numeric.has(i) ? 'num' : '' }, h)))),
    el('tbody', {}, ...rows.map((row) => el('tr', {}, ...row.map((cell, i) => el('td', { className: numeric.has(i) ? 'num' : '' }, cell))))));
}

/** Fill the report's sections (text only) and draw its charts. */
export function drawReport(data, Plotly) {
  const info = data.info || {};
  const stats = data.stats || {};
  const rec = data.recommendation || {};
  const percentiles = rec.percentiles || stats.percentiles || {};
  const summary = [
    ['steps', formatInt(info.steps)],
    ['first / last step', `${formatInt(info.first_step)} / ${formatInt(info.last_step)}`],
    ['clip rate, whole run', formatRate(info.clip_rate ?? stats.clip_rate)],
    ['spikes', formatInt(info.spikes)],
    ['non-finite steps', formatInt(info.nonfinite ?? stats.nonfinite)],
    [rec.percentiles ? 'p50 / p90 / p95 / p99 / p99.9 (clean window)' : 'p50 / p90 / p95 / p99 / p99.9 (whole run)', ['p50', 'p90', 'p95', 'p99', 'p99.9'].map((k) => formatNumber(percentiles[k], 4)).join(' / ')],
    ['recommended threshold', formatNumber(wireNumber(rec.threshold), 4)],
    ['last update', String(info.updated ?? '–')],
  ];
  document.getElementById('summary').replaceChildren(table(['', ''], summary));
  document.getElementById('rationale').textContent = tidyNumbers(rec.rationale ?? '');
  const warnings = Array.isArray(rec.warnings) ? rec.warnings : [];
  document.getElementById('warnings').replaceChildren(...warnings.map((w) => el('p', { className: 'warn' }, `⚠ ${tidyNumbers(w)}`)));
  const candidates = Array.isArray(rec.candidates) ? rec.candidates : [];
  document.getElementById('candidates').replaceChildren(candidates.length ? table(['candidate', 'threshold', "would clip (recommendation's window)", 'clean steps only'],
    candidates.map((c) => [tidyNumbers(c.label ?? ''), formatNumber(wireNumber(c.threshold), 4), formatRate(c.clip_rate_raw),
      formatRate(c.clip_rate)]), new Set([1, 2, 3])) : '');
  const events = Array.isArray(data.events) ? data.events : [];
  document.getElementById('events').replaceChildren(events.length
    ? table(['step', 'kind', 'norm', 'threshold', 'message', 'time'], events.map((e) => [
      formatInt(eventStep(e)), String(e.kind ?? ''), formatNumber(e.value, 4), formatNumber(e.threshold, 4),
      tidyNumbers(e.message ?? ''), String(e.time ?? '')]), new Set([0, 2, 3]))
    : el('p', { className: 'muted' }, 'No events.'));

  const figures = reportFigures(data);
  const charts = document.getElementById('charts');
  const drawn = [];
  for (const [key, title] of [['norm', 'Gradient norm'], ['histogram', 'Pre-clip norms, percentiles and the recommended threshold'],
    ['heatmap', 'Per-tensor norms by block (L2 of the block\u2019s tensor norms per step, max per bucket)'],
    ['groupSpikes', 'Groups that spike most often']]) {
    const fig = figures[key];
    if (!fig) continue;
    const box = el('div', { className: 'chart', id: `chart-${key}` });
    charts.append(el('h2', {}, title), box);
    if (!fig.layout.height) fig.layout.height = key === 'norm' ? 460 : 360;
    drawn.push(Plotly.newPlot(box, fig.data, fig.layout, CONFIG));
  }
  return Promise.all(drawn);
}

const embedded = typeof document !== 'undefined' ? document.getElementById('gradwatch-data') : null;
if (embedded && typeof window !== 'undefined' && window.Plotly) {
  window.gradwatchReport = drawReport(JSON.parse(embedded.textContent), window.Plotly).then(() => 'drawn');
}

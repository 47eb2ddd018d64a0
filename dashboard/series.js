// The columnar series model shared by the page and the report: the API's answer
// parsed by the column registry's types (dashboard/columns.js), live chunks appended.
'use strict';

import { STEP_COLUMNS } from './columns.js';
import { wireNumber, truthy } from './util.js';

/** Columns the charts read; a column the server does not have yet is all null (harmless). */
export const CHART_COLUMNS = ['step', 'pre_norm', 'threshold', 'clipped', 'loss', 'spike', 'nonfinite',
  'skipped', 'robust_z', 'level_shift'];

export function emptySeries() {
  return Object.fromEntries(CHART_COLUMNS.map((name) => [name, []]));
}

/** The API's columnar answer with floats parsed ("NaN" → NaN) and every chart column present. */
export function parseSeries(raw) {
  const steps = (raw && Array.isArray(raw.step)) ? raw.step : [];
  const series = { step: steps.map(Number) };
  for (const name of CHART_COLUMNS.slice(1)) {
    const column = raw && Array.isArray(raw[name]) ? raw[name] : null;
    const type = STEP_COLUMNS[name] || 'float';
    if (!column) series[name] = new Array(steps.length).fill(null);
    else if (type === 'bool') series[name] = column.map(truthy);
    else series[name] = column.map(wireNumber);
  }
  return series;
}

export function lastStep(series) {
  return series.step.length ? series.step[series.step.length - 1] : -Infinity;
}

/** Points of `chunk` after step `after` appended to `series` (a new object). */
export function appendAfter(series, chunk, after) {
  let from = 0;
  while (from < chunk.step.length && chunk.step[from] <= after) from += 1;
  if (from >= chunk.step.length) return series;
  const out = {};
  for (const name of CHART_COLUMNS) out[name] = series[name].concat(chunk[name].slice(from));
  return out;
}

/**
 * `chunk` merged into `series` in step order (a new object): points after the last step are
 * appended (the common case, no copy of the merge), late ones are inserted where they belong,
 * a step already drawn is kept as drawn. Never drops a point the chart has not shown.
 */
export function mergeSteps(series, chunk) {
  const n = chunk.step.length;
  if (!n) return series;
  const last = lastStep(series);
  let sorted = true;
  for (let i = 1; i < n && sorted; i += 1) sorted = chunk.step[i] > chunk.step[i - 1];
  if (sorted && chunk.step[0] > last) return appendAfter(series, chunk, last);
  const rows = new Map();
  series.step.forEach((step, i) => rows.set(step, [series, i]));
  chunk.step.forEach((step, i) => { if (!rows.has(step)) rows.set(step, [chunk, i]); });
  const order = [...rows.keys()].sort((a, b) => a - b);
  const out = {};
  for (const name of CHART_COLUMNS) {
    out[name] = order.map((step) => { const [source, i] = rows.get(step); return source[name][i]; });
  }
  return out;
}

/** An event's step, null when it has none (a drop report may not). */
export function eventStep(event) {
  return event && typeof event.step === 'number' && Number.isInteger(event.step) ? event.step : null;
}

/** Event kinds drawn on the norm chart; the rest live in the events table only. */
export const MARK_KINDS = ['spike', 'nonfinite', 'level_shift', 'skipped', 'loss_spike'];

/** {kind: [{step, value}]} from an events list (newest first), one list per MARK_KINDS entry. */
export function marksFromEvents(events) {
  const marks = Object.fromEntries(MARK_KINDS.map((kind) => [kind, []]));
  for (const event of Array.isArray(events) ? events : []) {
    const step = eventStep(event);
    if (step === null || !(event.kind in marks)) continue;
    marks[event.kind].push({ step, value: wireNumber(event.value) });
  }
  return marks;
}

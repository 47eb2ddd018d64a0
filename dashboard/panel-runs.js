// Run list panel and the run summary figures above the chart.
'use strict';

import { el, formatNumber, formatInt, formatRate, parseTime, formatAgo, formatDate } from './util.js';
import { getJSON } from './api.js';
import { app, actions, showError, reportError } from './state.js';

const $ = (id) => document.getElementById(id);

export function mostRecentRun(runs) {
  let best = null;
  let bestTime = -Infinity;
  for (const run of runs) {
    const updated = parseTime(run.updated);
    const time = updated ? updated.getTime() : -Infinity;
    if (best === null || time >= bestTime) { best = run; bestTime = time; }
  }
  return best;
}

export function currentRunInfo() {
  return app.run ? app.runs.find((run) => run.name === app.run.name) || null : null;
}

/** The run list; an answer that is a page (`{items, next}`) is read too, for when the API pages. */
export async function loadRuns() {
  let answer;
  try {
    answer = await getJSON('/api/runs');
    showError('runs', '');
  } catch (error) {
    reportError('runs', error, 'Run list');
    return app.runs;
  }
  app.runsRead = true;
  const runs = Array.isArray(answer) ? answer : (answer && Array.isArray(answer.items) ? answer.items : []);
  const previous = new Map(app.runs.map((run) => [run.name, run]));
  app.runs = runs;
  renderRuns();
  renderSummary();
  for (const name of app.overlay) {
    const before = previous.get(name);
    const now = app.runs.find((run) => run.name === name);
    if (now && (!before || before.last_step !== now.last_step)) actions.loadOverlay(name);
  }
  return app.runs;
}

export function renderRuns() {
  const current = app.run ? app.run.name : null;
  const now = Date.now();
  const sorted = [...app.runs].sort((a, b) => {
    const ta = parseTime(a.updated);
    const tb = parseTime(b.updated);
    return (tb ? tb.getTime() : 0) - (ta ? ta.getTime() : 0);
  });
  const rows = sorted.map((run) => {
    const isCurrent = run.name === current;
    const checkbox = el('input', {
      type: 'checkbox', checked: isCurrent || app.overlay.has(run.name), disabled: isCurrent,
      title: isCurrent ? 'shown' : 'overlay this run on the norm chart',
    });
    checkbox.setAttribute('aria-label', `overlay ${run.name}`);
    checkbox.addEventListener('change', () => actions.toggleOverlay(run.name, checkbox.checked));
    const link = el('a', { href: `?run=${encodeURIComponent(run.name)}`, title: run.name }, run.name);
    link.addEventListener('click', (event) => {
      if (event.metaKey || event.ctrlKey || event.shiftKey || event.button !== 0) return;
      event.preventDefault();
      actions.openRun(run.name, { push: true });
    });
    const updated = parseTime(run.updated);
    const spikes = el('td', { className: 'num' }, formatInt(run.spikes));
    if (run.nonfinite > 0) {
      spikes.append(' ', el('span', { className: 'badge badge-bad', title: `${run.nonfinite} non-finite steps` }, 'NaN'));
    }
    return el('tr', { className: isCurrent ? 'current' : '' },
      el('td', {}, checkbox),
      el('td', { className: 'name' }, link),
      el('td', { className: 'num' }, formatInt(run.steps)),
      el('td', { className: 'num' }, formatInt(run.last_step)),
      el('td', { title: formatDate(updated) }, formatAgo(updated, now)),
      el('td', { className: 'num' }, formatRate(run.clip_rate)),
      spikes);
  });
  $('run-rows').replaceChildren(...rows);
  // "No runs yet" only from a run list the server gave (not while the token dialog waits).
  $('no-runs').hidden = app.runs.length > 0 || !app.runsRead;
}

function figure(label, value, tone, title) {
  return el('div', { className: `figure ${tone || ''}`, title: title || '' },
    el('div', { className: 'label' }, label), el('div', { className: 'value' }, value));
}

export function renderSummary() {
  const summary = $('summary');
  const run = app.run;
  if (!run) { summary.replaceChildren(); return; }
  const info = currentRunInfo() || {};
  const series = run.series;
  const n = series.step.length;
  const latestNorm = n ? series.pre_norm[n - 1] : null;
  const latestThreshold = n ? series.threshold[n - 1] : null;
  // Whole-run figures from ONE read: the whole-run /stats answer (count, last step,
  // percentiles, clip rate, non-finite steps of the same rows), the run list's until it comes.
  const stats = run.stats;
  const percentiles = (stats && stats.percentiles) || {};
  const last = stats ? stats.last_step : info.last_step;
  const steps = stats ? stats.count : info.steps;
  const nonfinite = (stats ? stats.nonfinite : info.nonfinite) ?? 0;
  const clipRate = stats ? stats.clip_rate : info.clip_rate;
  const span = stats && Number.isInteger(stats.first_step) ? `whole run: steps ${formatInt(stats.first_step)}–${formatInt(stats.last_step)}` : 'whole run';
  const updated = parseTime(info.updated);
  const figures = [
    figure('last step', formatInt(Number.isFinite(last) ? last : null), '', span),
    figure('steps (whole run)', formatInt(steps), '', span),
    figure('latest norm', formatNumber(latestNorm), latestNorm !== null && !Number.isFinite(latestNorm) ? 'bad' : '', 'the newest point drawn'),
    figure('threshold', formatNumber(latestThreshold), '', 'the clip threshold at the newest point drawn'),
    figure('p50 / p99 (whole run)', `${formatNumber(percentiles.p50)} / ${formatNumber(percentiles.p99)}`, '',
      `${span}, every finite step (the recommendation's percentiles are over its clean window)`),
    figure('clip rate (whole run)', formatRate(clipRate), clipRate > 0.05 ? 'warn' : '', `${span}: steps the agent clipped`),
    figure('spikes', formatInt(info.spikes), info.spikes > 0 ? 'warn' : ''),
    figure('non-finite', formatInt(nonfinite), nonfinite > 0 ? 'bad' : '', span),
  ];
  // Diagnostics that newer servers report: shown when present, absent otherwise.
  for (const [key, label] of [['skipped', 'skipped'], ['level_shifts', 'level shifts'], ['loss_spikes', 'loss spikes']]) {
    if (typeof info[key] === 'number') figures.push(figure(label, formatInt(info[key]), info[key] > 0 ? 'warn' : ''));
  }
  figures.push(figure('updated', formatAgo(updated), '', formatDate(updated)));
  summary.replaceChildren(...figures);

  const banner = $('nonfinite-banner');
  if (nonfinite > 0) {
    const latest = run.marks.nonfinite[0];
    banner.replaceChildren(`⚠ ${formatInt(nonfinite)} step(s) with non-finite gradients (NaN/Inf)`
      + (latest ? `, latest at step ${formatInt(latest.step)} ` : ''));
    if (latest) {
      const show = el('button', { type: 'button', className: 'link' }, 'show');
      show.addEventListener('click', () => actions.jumpTo(latest.step));
      banner.append(show);
    }
    banner.hidden = false;
  } else {
    banner.hidden = true;
  }
}

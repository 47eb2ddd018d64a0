// Events panel (the table, any kind the server reports, shown as text) and the
// event marks drawn on the norm chart (exact steps: they survive downsampling).
'use strict';

import { el, formatNumber, formatInt, parseTime, formatAgo, formatDate, tidyNumbers, throttle } from './util.js';
import { getJSON, runPath } from './api.js';
import { eventStep, marksFromEvents, MARK_KINDS } from './series.js';
import { app, actions, showError, reportError } from './state.js';

const $ = (id) => document.getElementById(id);
const EVENT_LIMIT = 1000;
// Kinds the events API filters by itself; any other kind is filtered here, from the full list.
const SERVER_KINDS = new Set(['spike', 'nonfinite', 'clip']);
const KIND_LABELS = { level_shift: 'level shift', skipped: 'skipped', loss_spike: 'loss spike', alert: 'alert' };

/** Spike and NaN marks (their own requests: never crowded out of the newest 1,000), other kinds from the full list. */
export async function loadMarks() {
  const run = app.run;
  const signal = run.signal('marks');
  try {
    const [spikes, nonfinite, all] = await Promise.all([
      getJSON(runPath(run.name, '/events'), { kind: 'spike', limit: EVENT_LIMIT }, { signal }),
      getJSON(runPath(run.name, '/events'), { kind: 'nonfinite', limit: EVENT_LIMIT }, { signal }),
      getJSON(runPath(run.name, '/events'), { limit: EVENT_LIMIT }, { signal }),
    ]);
    if (signal.aborted) return;
    const marks = marksFromEvents(all);
    const exact = marksFromEvents([...spikes, ...nonfinite]);
    marks.spike = exact.spike;
    marks.nonfinite = exact.nonfinite;
    run.marks = marks;
    addKindOptions(all);
    actions.marksChanged();
    // Show at once which tensors made the latest spike (or NaN), without moving the chart.
    if (run.selectedStep === null) {
      const latest = [marks.spike[0], marks.nonfinite[0]].filter(Boolean).sort((a, b) => b.step - a.step)[0];
      if (latest) actions.selectStep(latest.step);
    }
  } catch (error) {
    if (!signal.aborted) reportError('events', error, 'Events');
  }
}

function addKindOptions(events) {
  const select = $('event-kind');
  const present = new Set([...select.options].map((option) => option.value));
  for (const event of events) {
    const kind = String(event.kind ?? '');
    if (!kind || present.has(kind)) continue;
    present.add(kind);
    select.append(el('option', { value: kind }, KIND_LABELS[kind] || kind));
  }
}

export async function loadEvents() {
  const run = app.run;
  const signal = run.signal('events');
  const kind = $('event-kind').value;
  const serverKind = SERVER_KINDS.has(kind) ? kind : '';
  try {
    const events = await getJSON(runPath(run.name, '/events'), { kind: serverKind, limit: EVENT_LIMIT }, { signal });
    if (signal.aborted || kind !== $('event-kind').value) return;
    const list = Array.isArray(events) ? events : [];
    run.events = kind && !serverKind ? list.filter((event) => event.kind === kind) : list;
    if (!kind) addKindOptions(list);
    showError('events', '');
    renderEvents();
  } catch (error) {
    if (!signal.aborted) reportError('events', error, 'Events');
  }
}

export const loadEventsSoon = throttle(() => { if (app.run) { loadMarks(); loadEvents(); } }, 2000);

export function renderEvents() {
  const run = app.run;
  if (!run) return;
  const rows = run.events.map((event) => {
    const step = eventStep(event);
    const kind = String(event.kind ?? '');
    const row = el('tr', { tabIndex: 0, className: step !== null && step === run.selectedStep ? 'selected' : '',
      dataset: { step: step === null ? '' : String(step) } },
      el('td', { className: 'num' }, formatInt(step)),
      el('td', { className: `kind kind-${kind.replace(/[^a-z]/g, '')}` }, KIND_LABELS[kind] || kind),
      el('td', { className: 'num' }, formatNumber(event.value, 4)),
      el('td', { className: 'num' }, formatNumber(event.threshold, 4)),
      el('td', { className: 'message' }, tidyNumbers(event.message ?? '')),
      el('td', { title: formatDate(parseTime(event.time)) }, formatAgo(parseTime(event.time))));
    if (step !== null) {
      row.addEventListener('click', () => actions.jumpTo(step));
      row.addEventListener('keydown', (key) => { if (key.key === 'Enter') actions.jumpTo(step); });
    }
    return row;
  });
  $('event-rows').replaceChildren(...rows);
  $('event-note').textContent = run.events.length >= EVENT_LIMIT ? `newest ${formatInt(EVENT_LIMIT)}` : `${formatInt(run.events.length)} events`;
}

export function wireEvents() {
  $('event-kind').addEventListener('change', () => { if (app.run) loadEvents(); });
}

export { MARK_KINDS };

// Tensors panel: the heatmap grouped by module path (blocks, expandable into
// their modules, or every tensor), which groups spike most often, and the top-k
// tensors behind the norm of a selected step. The group norms come from the
// server (per-step L2 of the members, then downsampled).
'use strict';

import { wireNumber, el, formatInt, median, debounce, throttle } from './util.js';
import { getJSON, runPath } from './api.js';
import { heatmapFigure, tensorRows, groupSpikeFigure, contributionFigure } from './charts.js';
import { plotly, PLOT_CONFIG } from './plot.js';
import { app, actions, probe, reportError } from './state.js';

const $ = (id) => document.getElementById(id);
const CONTRIBUTION_CONTEXT = 200; // steps before a selected step that define "usual"
const TOP_K = 15;

/** `model.layers.12.mlp.up.weight` -> `model.layers.12`, as server/analysis/tensor_groups.py groups. */
export function blockOf(name) {
  const match = /^((?:[^.]+\.)*?[^.]+\.\d+)(?:\.|$)/.exec(name);
  if (match) return match[1];
  const cut = name.lastIndexOf('.');
  return cut > 0 ? name.slice(0, cut) : name;
}

function columns() {
  const width = $('heatmap').clientWidth || 800;
  return Math.max(200, Math.min(1000, Math.round(width)));
}

function rangeParams(points) {
  const params = { points };
  const view = app.run.view;
  if (view) { params.start = view.start; params.end = view.end; }
  return params;
}

export async function loadTensors() {
  const run = app.run;
  const signal = run.signal('tensors');
  const began = performance.now();
  const level = app.level;
  const points = columns();
  try {
    const wantModules = level === 'module' || (level === 'block' && run.expanded.size > 0);
    const [primary, modules] = await Promise.all([
      getJSON(runPath(run.name, '/tensors'), { ...rangeParams(points), group: level }, { signal }),
      wantModules && level !== 'module'
        ? getJSON(runPath(run.name, '/tensors'), { ...rangeParams(points), group: 'module' }, { signal }) : null,
    ]);
    if (signal.aborted) return;
    probe.tensorsFetchMs = performance.now() - began; // the answer in hand; tensorsMs: drawn too
    run.tensors = { level, blocks: primary, modules: level === 'module' ? primary : modules };
  } catch (error) {
    if (!signal.aborted) reportError('tensors', error, 'Per-tensor norms');
    return;
  }
  await renderHeatmap();
  probe.tensorsMs = performance.now() - began;
  renderGroupSpikes();
}

export const loadTensorsSoon = debounce(() => { if (app.run) loadTensors(); }, 250);
export const loadTensorsLive = throttle(() => { if (app.run && !app.run.view) loadTensors(); }, 15000);

function currentRows() {
  const tensors = app.run.tensors;
  if (!tensors) return [];
  if (tensors.level === 'tensor') return tensorRows({ blocks: tensors.blocks, level: 'tensor' });
  if (tensors.level === 'module') {
    // Modules under their blocks: the block row is the L2 of its modules' rows.
    const answer = tensors.modules;
    return answer.names.map((name, i) => ({ name, label: name, values: answer.norms[i], kind: 'module', parent: answer.parents?.[i] ?? null }));
  }
  return tensorRows({ blocks: tensors.blocks, modules: tensors.modules, expanded: app.run.expanded, level: 'block' });
}

let heatmapWired = false;
export const HEAT_ROW_PX = 16;

export async function renderHeatmap() {
  const Plotly = await plotly();
  const run = app.run;
  const element = $('heatmap');
  const tensors = run && run.tensors;
  const step = tensors && tensors.blocks && Array.isArray(tensors.blocks.step) ? tensors.blocks.step : [];
  const rows = currentRows();
  if (!rows.length || !step.length) {
    Plotly.purge(element);
    heatmapWired = false;
    element.style.height = '40px';
    $('tensor-note').textContent = 'no per-tensor norms recorded for this run';
    $('group-chips').replaceChildren();
    return;
  }
  const members = tensors.blocks.members;
  const tensorCount = members ? members.reduce((sum, list) => sum + list.length, 0) : rows.length;
  const what = { block: 'blocks', module: 'modules', tensor: 'tensors' }[tensors.level];
  $('tensor-note').textContent = `${formatInt(tensorCount)} tensors · ${formatInt(rows.length)} rows (${what}) · ${formatInt(step.length)} columns`;
  // Every row at least HEAT_ROW_PX tall, its label in 10 px type: 300 tensors scroll in
  // their box (.heat-scroll) instead of squeezing into 3 px rows with labels on each other.
  const height = Math.max(220, 60 + rows.length * HEAT_ROW_PX);
  element.style.height = `${height}px`;
  const fig = heatmapFigure({ rows, step, selectedStep: run.selectedStep, uirevision: `${run.name}#${tensors.level}`, height });
  await Plotly.react(element, fig.data, fig.layout, PLOT_CONFIG);
  if (!heatmapWired && element.on) {
    heatmapWired = true;
    element.on('plotly_click', (event) => {
      const point = event && event.points && event.points[0];
      if (point && typeof point.x === 'number') actions.selectStep(Math.round(point.x));
    });
  }
  renderChips();
  probe.renders.heatmap += 1;
}

/** One toggle per block: expand it into its modules, or collapse it. */
function renderChips() {
  const run = app.run;
  const tensors = run.tensors;
  const box = $('group-chips');
  if (!tensors || tensors.level !== 'block') { box.replaceChildren(); return; }
  const chips = tensors.blocks.names.map((name, i) => {
    const members = tensors.blocks.members ? tensors.blocks.members[i] : null;
    // A block has modules to show when a tensor sits below a module inside it (the server's
    // module_of): `layers.0.mlp.up.weight` does, an MLP's `layers.0.weight` does not.
    const expandable = !members || members.some((member) => member.startsWith(`${name}.`)
      && member.slice(name.length + 1).split('.').length >= 2);
    const open = expandable && run.expanded.has(name);
    const count = members ? members.length : 0;
    const chip = el('button', {
      type: 'button', className: `chip${open ? ' open' : ''}`, disabled: !expandable, dataset: { group: name },
      title: expandable ? `${count} tensors` : `${count} tensors, no modules inside: rows → tensors lists them`,
    }, `${expandable ? (open ? '▾ ' : '▸ ') : ''}${name}`);
    chip.setAttribute('aria-pressed', open ? 'true' : 'false');
    chip.addEventListener('click', () => toggleGroup(name));
    return chip;
  });
  box.replaceChildren(...chips);
}

export function toggleGroup(name) {
  const run = app.run;
  if (run.expanded.has(name)) run.expanded.delete(name);
  else run.expanded.add(name);
  if (run.expanded.size && !(run.tensors && run.tensors.modules)) loadTensors();
  else renderHeatmap();
}

export async function renderGroupSpikes() {
  const Plotly = await plotly();
  const run = app.run;
  const element = $('group-spikes');
  const answer = run && run.tensors && run.tensors.level !== 'tensor' ? run.tensors.blocks : null;
  const spikes = answer && Array.isArray(answer.spikes) ? answer.spikes : [];
  if (!spikes.some((count) => count > 0)) {
    Plotly.purge(element);
    element.style.height = '0px';
    const level = run && run.tensors ? run.tensors.level : null;
    $('group-spike-note').textContent = answer ? 'None: no group\'s norm was an outlier against its own history.'
      : level === 'tensor' ? 'Counted per block or module: choose "blocks" or "modules" under rows to see them.'
        : run && run.tensors ? 'None: this run recorded no per-tensor norms.' : '';
    return;
  }
  const fig = groupSpikeFigure({ names: answer.names, spikes });
  element.style.height = `${fig.layout.height}px`;
  $('group-spike-note').textContent = answer.spike_rule ? `rule: ${answer.spike_rule}` : '';
  await Plotly.react(element, fig.data, fig.layout, PLOT_CONFIG);
  probe.renders.groupSpikes += 1;
}

/** Select a step: mark it on the charts and show the top-k tensors behind its norm. */
export async function selectStep(step) {
  const run = app.run;
  run.selectedStep = step;
  actions.stepSelected();
  if (run.tensors) renderHeatmap();
  const signal = run.signal('contributions');
  const title = $('contrib-title');
  title.textContent = `Step ${formatInt(step)}: loading per-tensor norms…`;
  let tensors;
  try {
    tensors = await getJSON(runPath(run.name, '/tensors'), {
      start: Math.max(0, step - CONTRIBUTION_CONTEXT), end: step, points: CONTRIBUTION_CONTEXT + 1,
    }, { signal });
  } catch (error) {
    if (!signal.aborted) reportError('tensors', error, 'Per-tensor norms');
    return;
  }
  if (signal.aborted) return;
  const steps = (tensors.step || []).map(Number);
  const names = tensors.names || [];
  let column = steps.lastIndexOf(step);
  const exact = column >= 0;
  if (!exact) column = steps.length - 1;
  const Plotly = await plotly();
  if (!names.length || column < 0) {
    title.textContent = `Step ${formatInt(step)}: no per-tensor norms recorded`;
    Plotly.purge($('contributions'));
    return;
  }
  const rows = names.map((name, index) => {
    const row = (tensors.norms[index] || []).map(wireNumber);
    const norm = row[column];
    const usual = median(row.slice(0, column));
    return { name, norm, ratio: usual ? norm / usual : NaN, group: blockOf(name) };
  });
  run.contributions = { step: steps[column], rows };
  title.textContent = exact
    ? `Step ${formatInt(step)}: top ${TOP_K} tensors by ${$('contrib-by').value === 'norm' ? 'norm' : `norm ÷ median of the ${formatInt(column)} steps before`}`
    : `Step ${formatInt(step)} has no per-tensor norms; showing step ${formatInt(steps[column])}`;
  await renderContributions();
}

export async function renderContributions() {
  const run = app.run;
  if (!run || !run.contributions) return;
  const Plotly = await plotly();
  const element = $('contributions');
  const fig = contributionFigure({ rows: run.contributions.rows, by: $('contrib-by').value, limit: TOP_K });
  element.style.height = `${fig.layout.height}px`;
  await Plotly.react(element, fig.data, fig.layout, PLOT_CONFIG);
  probe.renders.contributions += 1;
}

export function wireTensors() {
  $('group-level').addEventListener('change', (event) => {
    app.level = event.target.value;
    if (app.run) loadTensors();
  });
  $('contrib-by').addEventListener('change', () => {
    if (app.run && app.run.selectedStep !== null) selectStep(app.run.selectedStep);
  });
}

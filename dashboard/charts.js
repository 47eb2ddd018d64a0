// Plotly figures (data + layout) built from the API's shapes: the one chart code
// of the page and of `gradwatch report` (which inlines this module). Pure
// functions: no fetching, no DOM. Every label from the database goes through
// plotlyText().
'use strict';

import { plottable, plotlyText, formatNumber, truthy, median } from './util.js';

export const COLORS = {
  paper: '#161c24',
  plot: '#11161d',
  text: '#d8dee9',
  muted: '#8b97a8',
  grid: '#263040',
  norm: '#4ea1ff',
  threshold: '#f5a524',
  clipped: '#f5a524',
  spike: '#ff5c8a',
  loss: '#9ccc65',
  nonfinite: '#ff3b30',
  recommended: '#3ddc97',
  whatif: '#c792ea',
  selected: '#ffffff',
  percentile: '#8b97a8',
  levelShift: '#89ddff',
  skipped: '#f78c6c',
  lossSpike: '#c3e88d',
  offscale: '#ff5c8a',
};

// Overlays: none near a flag's colour (clipped/threshold orange, spike pink, non-finite red,
// skipped coral, level-shift cyan, loss greens, recommended green) or the run's own blue.
const OVERLAY_COLORS = ['#c792ea', '#e0e0e0', '#7986cb', '#b0bec5', '#f48fb1', '#fff176', '#a1887f'];

export function overlayColor(index) {
  return OVERLAY_COLORS[index % OVERLAY_COLORS.length];
}

// Trace order of the norm chart. Fixed, so tests and click handlers can rely on names.
export const TRACE = {
  norm: 'pre-clip norm',
  threshold: 'clip threshold',
  clipped: 'clipped',
  spike: 'spike',
  loss: 'loss',
  nonfinite: 'non-finite',
  offscale: 'off-scale norm',
  skipped: 'skipped step',
  levelShift: 'level shift',
  lossSpike: 'loss spike',
};

function baseLayout(extra) {
  return {
    paper_bgcolor: COLORS.paper,
    plot_bgcolor: COLORS.plot,
    font: { color: COLORS.text, size: 12, family: 'system-ui, sans-serif' },
    margin: { l: 60, r: 20, t: 10, b: 40 },
    hovermode: 'closest',
    hoverlabel: { namelength: -1 },
    ...extra,
  };
}

function axis(extra) {
  return { gridcolor: COLORS.grid, zerolinecolor: COLORS.grid, linecolor: COLORS.grid, ...extra };
}


// ---------------------------------------------------------------- scales

const FENCE_K = 8;        // body of the run: log norm within median ± 8·1.4826·MAD
const LOG_SPAN = 20;      // a body wider than 20× (max/min) is drift across decades: log axis
const MAD_FLOOR = 0.02;   // log-space MAD floor, so a flat run has a sane fence
const MAX_ABOVE_SHARE = 0.05; // more of the run than this above the fence: a new level, not spikes

/** Tick settings for a log axis spanning `decades`: powers of ten only, or 1-2-5, never every digit. */
export function logTicks(decades) {
  // '~g': labels without trailing zeros ("1", "0.1", "20"), never "1.000" or "0.1000".
  if (!(decades > 0) || decades > 3) return { dtick: 1, exponentformat: 'power', minorloglabels: 'none' };
  if (decades > 0.8) return { dtick: 'D2', minorloglabels: 'none', tickformat: '~g' };
  return { minorloglabels: 'none', tickformat: '~g' };
}

/** Round ticks (1-2-5 steps) on a linear axis, whatever an overlaying axis does. */
export const ROUND_TICKS = { tickmode: 'auto', nticks: 7 };

/**
 * The norm axis chosen from the data. Gradient norms are heavy-tailed: a few
 * corrupted batches 100× the median would flatten the run into a line on zero.
 * The body of the run is the norms within a robust fence (log space, median ±
 * 8·1.4826·MAD); the axis is log when that body itself spans more than 20×
 * (drift over decades), else linear; when norms lie beyond the fence the range
 * fits the body and those norms are drawn as markers on the top edge.
 * mode: 'auto' | 'linear' | 'log' (the last two: that axis type, whole range).
 * Returns {type, range (axis units) or null for autorange, fenceHigh, reason}.
 */
export function chooseScale(values, mode = 'auto') {
  const positive = [];
  let min = Infinity;
  for (const v of values) {
    if (typeof v === 'number' && Number.isFinite(v)) {
      if (v < min) min = v;
      if (v > 0) positive.push(Math.log(v));
    }
  }
  if (mode === 'linear' || mode === 'log') return { type: mode, range: null, fenceHigh: Infinity, reason: `${mode} (chosen)` };
  if (positive.length < 8 || min < 0) return { type: 'linear', range: null, fenceHigh: Infinity, reason: 'linear' };
  const center = median(positive);
  const mad = Math.max(median(positive.map((v) => Math.abs(v - center))), MAD_FLOOR);
  const lowFence = center - FENCE_K * 1.4826 * mad;
  const highFence = center + FENCE_K * 1.4826 * mad;
  let bodyLow = Infinity;
  let bodyHigh = -Infinity;
  let above = 0;
  for (const v of positive) {
    if (v > highFence) { above += 1; continue; }
    if (v < lowFence) continue;
    if (v < bodyLow) bodyLow = v;
    if (v > bodyHigh) bodyHigh = v;
  }
  const log = Math.exp(bodyHigh - bodyLow) > LOG_SPAN;
  // Spikes are rare; a share of the run above the fence is a level the run moved to (a level
  // shift), which the chart must show, not squeeze onto the top edge: no fence then.
  if (above > MAX_ABOVE_SHARE * positive.length) {
    let lowest = Infinity;
    let highest = -Infinity;
    for (const v of positive) { if (v < lowest) lowest = v; if (v > highest) highest = v; }
    const spread = Math.exp(highest - lowest) > LOG_SPAN;
    return { type: spread ? 'log' : 'linear', range: null, fenceHigh: Infinity,
      reason: spread ? 'log: the run moved to another level' : 'linear: the run moved to another level' };
  }
  if (!above) {
    return { type: log ? 'log' : 'linear', range: null, fenceHigh: Infinity, reason: log ? 'log: the run spans decades' : 'linear' };
  }
  const fenceHigh = Math.exp(highFence);
  if (log) {
    const lo = bodyLow / Math.LN10;
    const hi = bodyHigh / Math.LN10;
    const pad = 0.05 * Math.max(hi - lo, 0.1);
    return { type: 'log', range: [lo - pad, hi + pad], fenceHigh, reason: `log, ${above} norm(s) above the scale` };
  }
  const lo = Math.exp(bodyLow);
  const hi = Math.exp(bodyHigh);
  const pad = 0.06 * Math.max(hi - lo, 1e-12 + hi * 0.02);
  return { type: 'linear', range: [Math.max(0, lo - pad), hi + pad], fenceHigh, reason: `${above} norm(s) above the scale` };
}

function maxOf(range) {
  return range ? range[1] : Infinity;
}

// ---------------------------------------------------------------- norm chart

function edgeTrace(name, steps, values, color, symbol, what) {
  return {
    type: 'scatter', mode: 'markers', name, x: steps, y: steps.map(() => 0.985), yaxis: 'y3',
    customdata: values, marker: { color, size: 10, symbol },
    hovertemplate: `step %{x}<br>${what} %{customdata:.4g}<extra></extra>`,
  };
}

/**
 * The norm chart.
 * series: parsed columns (dashboard/series.js); marks: {kind: [{step, value}]} from the events API
 * (exact, survive downsampling); overlays: [{run, series}] other runs' norms; scale: 'auto'|'linear'|'log'.
 */
export function normFigure({ series, marks, overlays = [], scale = 'auto', recommended = null,
  selectedStep = null, uirevision, cleanWindow = null, scaleRevision = null }) {
  const steps = series.step;
  const pre = series.pre_norm.map(plottable);
  const drawn = pre.concat(...overlays.map((o) => o.series.pre_norm.map(plottable)));
  const axisChoice = chooseScale(drawn, scale);
  const log = axisChoice.type === 'log';
  const data = [{
    type: 'scatter', mode: 'lines', name: TRACE.norm, x: steps, y: pre,
    line: { color: COLORS.norm, width: 1.2 },
    hovertemplate: 'step %{x}<br>pre-clip norm %{y:.4g}<extra></extra>',
  }];

  const threshold = (series.threshold || []).map(plottable);
  if (threshold.some((v) => v !== null)) {
    data.push({
      type: 'scatter', mode: 'lines', name: TRACE.threshold, x: steps, y: threshold,
      line: { color: COLORS.threshold, width: 1.5, dash: 'dash', shape: 'hv' },
      hovertemplate: 'step %{x}<br>threshold %{y:.4g}<extra></extra>',
    });
  }

  const top = maxOf(axisChoice.range && log ? axisChoice.range.map((v) => 10 ** v) : axisChoice.range);
  // Clipped steps: one vertical segment each, from the threshold up to the norm (the part the
  // clip cut off), all in one SVG path. Markers would be one DOM node each, and a 1M-step
  // run shows ~1,000 clipped buckets: a third of the first draw's time.
  const clippedX = [];
  const clippedY = [];
  const clippedNorm = [];
  const spikeAt = new Map();
  const nonfiniteSteps = new Set();
  const skippedAt = new Map();
  const shiftSteps = new Set();
  for (let i = 0; i < steps.length; i += 1) {
    const norm = pre[i];
    if (truthy(series.clipped && series.clipped[i]) && norm !== null) {
      const bound = threshold[i];
      const from = bound !== null && bound !== undefined && bound < norm ? bound : norm;
      clippedX.push(steps[i], steps[i], null);
      clippedY.push(from, norm, null);
      clippedNorm.push(norm, norm, null);
    }
    if (truthy(series.spike && series.spike[i])) spikeAt.set(steps[i], norm);
    if (truthy(series.skipped && series.skipped[i])) skippedAt.set(steps[i], norm);
    if (truthy(series.level_shift && series.level_shift[i])) shiftSteps.add(steps[i]);
    const raw = series.pre_norm[i];
    if (truthy(series.nonfinite && series.nonfinite[i]) || (typeof raw === 'number' && !Number.isFinite(raw))) {
      nonfiniteSteps.add(steps[i]);
    }
  }
  const [first, last] = steps.length ? [steps[0], steps[steps.length - 1]] : [-Infinity, Infinity];
  const inside = (mark) => mark.step >= first && mark.step <= last;
  const list = (kind) => ((marks && marks[kind]) || []).filter(inside);
  for (const mark of list('spike')) if (!spikeAt.has(mark.step)) spikeAt.set(mark.step, plottable(mark.value));
  for (const mark of list('nonfinite')) nonfiniteSteps.add(mark.step);
  for (const mark of list('skipped')) if (!skippedAt.has(mark.step)) skippedAt.set(mark.step, plottable(mark.value));
  for (const mark of list('level_shift')) shiftSteps.add(mark.step);

  if (clippedX.length) {
    data.push({
      type: 'scatter', mode: 'lines', name: TRACE.clipped, x: clippedX, y: clippedY, customdata: clippedNorm,
      line: { color: COLORS.clipped, width: 2 }, connectgaps: false,
      hovertemplate: 'step %{x}<br>clipped, norm %{customdata:.4g}<extra></extra>',
    });
  }
  // Every spike at its norm; one above the scale is also marked on the top edge (off-scale trace).
  const spikeSteps = [...spikeAt.keys()].sort((a, b) => a - b);
  if (spikeSteps.length) {
    data.push({
      type: 'scatter', mode: 'markers', name: TRACE.spike, x: spikeSteps, y: spikeSteps.map((s) => spikeAt.get(s)),
      marker: { color: COLORS.spike, size: 10, symbol: 'x-thin', line: { width: 2, color: COLORS.spike } },
      hovertemplate: 'step %{x}<br>spike, norm %{y:.4g}<br>click for tensors<extra></extra>',
    });
  }
  const offX = [];
  const offY = [];
  if (Number.isFinite(top)) {
    for (let i = 0; i < steps.length; i += 1) if (pre[i] !== null && pre[i] > top) { offX.push(steps[i]); offY.push(pre[i]); }
  }
  if (offX.length) {
    data.push(edgeTrace(TRACE.offscale, offX, offY, COLORS.offscale, 'triangle-up', 'norm above the scale:'));
  }
  if (skippedAt.size) {
    const sorted = [...skippedAt.keys()].sort((a, b) => a - b);
    data.push({
      type: 'scatter', mode: 'markers', name: TRACE.skipped, x: sorted, y: sorted.map(() => 0.03), yaxis: 'y3',
      customdata: sorted.map((s) => skippedAt.get(s)),
      marker: { color: COLORS.skipped, size: 8, symbol: 'square' },
      hovertemplate: 'step %{x}<br>update skipped, norm %{customdata:.4g}<extra></extra>',
    });
  }

  const loss = (series.loss || []).map(plottable);
  if (loss.some((v) => v !== null)) {
    data.push({
      type: 'scatter', mode: 'lines', name: TRACE.loss, x: steps, y: loss, yaxis: 'y2',
      line: { color: COLORS.loss, width: 1 }, opacity: 0.55,
      hovertemplate: 'step %{x}<br>loss %{y:.4g}<extra></extra>',
    });
    const lossSpikes = list('loss_spike');
    if (lossSpikes.length) {
      const byStep = new Map(steps.map((s, i) => [s, loss[i]]));
      data.push({
        type: 'scatter', mode: 'markers', name: TRACE.lossSpike, yaxis: 'y2',
        x: lossSpikes.map((m) => m.step), y: lossSpikes.map((m) => plottable(m.value) ?? byStep.get(m.step) ?? null),
        marker: { color: COLORS.lossSpike, size: 9, symbol: 'diamond-open', line: { width: 2 } },
        hovertemplate: 'step %{x}<br>loss spike %{y:.4g}<extra></extra>',
      });
    }
  }

  if (nonfiniteSteps.size) {
    // NaN cannot be drawn on the norm axis: a red vertical line through the
    // whole plot and a marker at the top, on a hidden 0..1 axis.
    const sorted = [...nonfiniteSteps].sort((a, b) => a - b);
    const lineX = [];
    const lineY = [];
    for (const step of sorted) lineX.push(step, step, null), lineY.push(0, 1, null);
    data.push({
      type: 'scatter', mode: 'lines', name: TRACE.nonfinite, legendgroup: 'nonfinite', x: lineX, y: lineY,
      yaxis: 'y3', line: { color: COLORS.nonfinite, width: 1.5 }, hoverinfo: 'skip',
    });
    data.push({
      type: 'scatter', mode: 'markers', name: `${TRACE.nonfinite} step`, legendgroup: 'nonfinite',
      showlegend: false, x: sorted, y: sorted.map(() => 0.97), yaxis: 'y3',
      marker: { color: COLORS.nonfinite, size: 11, symbol: 'triangle-down' },
      hovertemplate: 'step %{x}<br>non-finite gradient (NaN/Inf)<extra></extra>',
    });
  }

  overlays.forEach(({ run, series: other }, index) => {
    data.push({
      type: 'scatter', mode: 'lines', name: plotlyText(run), x: other.step,
      y: other.pre_norm.map(plottable), meta: { overlay: run },
      line: { color: overlayColor(index), width: 1 }, opacity: 0.85,
      hovertemplate: `${plotlyText(run)}<br>step %{x}<br>norm %{y:.4g}<extra></extra>`,
    });
  });

  const shapes = [];
  const annotations = [];
  if (shiftSteps.size) {
    for (const step of [...shiftSteps].sort((a, b) => a - b)) {
      shapes.push({ type: 'line', yref: 'paper', y0: 0, y1: 1, xref: 'x', x0: step, x1: step,
        line: { color: COLORS.levelShift, width: 1.5, dash: 'dashdot' } });
    }
    data.push({
      type: 'scatter', mode: 'markers', name: TRACE.levelShift, x: [...shiftSteps].sort((a, b) => a - b),
      y: [...shiftSteps].map(() => 0.5), yaxis: 'y3', marker: { color: COLORS.levelShift, size: 9, symbol: 'line-ns-open' },
      hovertemplate: 'step %{x}<br>level shift: a new regime<extra></extra>',
    });
  }
  if (cleanWindow && Number.isFinite(cleanWindow.start) && Number.isFinite(cleanWindow.end)) {
    shapes.push({ type: 'rect', yref: 'paper', y0: 0, y1: 1, xref: 'x', x0: cleanWindow.start, x1: cleanWindow.end,
      fillcolor: 'rgba(61,220,151,0.07)', line: { width: 0 }, layer: 'below' });
  }
  if (typeof recommended === 'number' && Number.isFinite(recommended)) {
    shapes.push({
      type: 'line', xref: 'paper', x0: 0, x1: 1, yref: 'y', y0: recommended, y1: recommended,
      line: { color: COLORS.recommended, width: 1, dash: 'dot' },
    });
    // At the right edge, on the plot's background: not over the start of the trace.
    annotations.push({
      xref: 'paper', x: 1, xanchor: 'right', yref: 'y', y: log ? Math.log10(recommended) : recommended,
      yanchor: 'bottom', showarrow: false, text: `recommended ${formatNumber(recommended)}`,
      font: { color: COLORS.recommended, size: 11 }, bgcolor: COLORS.plot, opacity: 0.9,
    });
  }
  if (selectedStep !== null && selectedStep !== undefined) {
    shapes.push({
      type: 'line', yref: 'paper', y0: 0, y1: 1, xref: 'x', x0: selectedStep, x1: selectedStep,
      line: { color: COLORS.selected, width: 1, dash: 'dot' },
    });
  }

  // The y axis has its own revision: a scale change redraws it, the x zoom (layout's revision) stays.
  const yaxis = axis({ title: { text: 'pre-clip norm' }, type: axisChoice.type, hoverformat: '.4g',
    uirevision: scaleRevision ?? uirevision, ...(log ? {} : ROUND_TICKS) });
  if (axisChoice.range) { yaxis.range = axisChoice.range; yaxis.autorange = false; } else yaxis.autorange = true;
  if (log) {
    const positive = drawn.filter((v) => v !== null && v > 0);
    const decades = axisChoice.range ? axisChoice.range[1] - axisChoice.range[0]
      : Math.log10(Math.max(...positive) / Math.min(...positive));
    Object.assign(yaxis, logTicks(decades));
  }
  const layout = baseLayout({
    uirevision,
    margin: { l: 60, r: 60, t: 10, b: 40 },
    showlegend: true,
    legend: { orientation: 'h', x: 0, y: 1.02, yanchor: 'bottom', bgcolor: 'rgba(0,0,0,0)' },
    xaxis: axis({ title: { text: 'step' }, ...ROUND_TICKS }),
    yaxis,
    yaxis2: axis({ title: { text: 'loss' }, overlaying: 'y', side: 'right', showgrid: false, hoverformat: '.4g',
      ...ROUND_TICKS, rangemode: loss.every((v) => v === null || v >= 0) ? 'nonnegative' : 'normal' }),
    yaxis3: { overlaying: 'y', range: [0, 1], visible: false, fixedrange: true },
    shapes,
    annotations,
    meta: { scale: axisChoice.reason },
  });
  return { data, layout, scale: axisChoice };
}

// ---------------------------------------------------------------- histogram

/** Whether histogram edges are log-spaced (the server uses log bins when the range spans decades). */
function logSpaced(edges) {
  if (edges.length < 3 || edges[0] <= 0) return false;
  const ratio0 = edges[1] / edges[0];
  const ratio1 = edges[edges.length - 1] / edges[edges.length - 2];
  const diff0 = edges[1] - edges[0];
  const diff1 = edges[edges.length - 1] - edges[edges.length - 2];
  return Math.abs(ratio0 - ratio1) < 1e-6 * ratio0 && Math.abs(diff0 - diff1) > 1e-6 * Math.abs(diff1);
}

/**
 * Histogram of pre-clip norms as a step area (works on log and linear axes),
 * with percentile lines, the recommended threshold and the what-if threshold.
 */
export function histogramFigure({ histogram, percentiles, recommended, whatif }) {
  const edges = histogram.edges.map(Number);
  const counts = histogram.counts.map(Number);
  const log = logSpaced(edges);
  const data = [{
    type: 'scatter', mode: 'lines', name: 'pre-clip norms', x: edges, y: [...counts, counts[counts.length - 1] ?? 0],
    customdata: [...counts, null], meta: { counts },
    line: { shape: 'hv', color: COLORS.norm, width: 1 }, fill: 'tozeroy', fillcolor: 'rgba(78,161,255,0.35)',
    hovertemplate: 'from %{x:.4g}<br>%{y} steps<extra></extra>',
  }];
  const shapes = [];
  const annotations = [];
  const vline = (x, color, width, dash, label, y) => {
    if (typeof x !== 'number' || !Number.isFinite(x) || (log && x <= 0)) return;
    shapes.push({ type: 'line', xref: 'x', x0: x, x1: x, yref: 'paper', y0: 0, y1: 1, line: { color, width, dash } });
    if (label) annotations.push({
      xref: 'x', x: log ? Math.log10(x) : x, yref: 'paper', y, yanchor: 'bottom', showarrow: false,
      text: label, font: { color, size: 10 }, textangle: 0, bgcolor: COLORS.plot, // readable over the lines
    });
  };
  // Percentile labels: lines closer than 8% of the axis share one label ("p95 p99"), so no
  // two labels sit on top of each other.
  const low = edges[0];
  const high = edges[edges.length - 1];
  const where = (x) => (log ? Math.log(x / low) / Math.log(high / low) : (x - low) / ((high - low) || 1));
  const groups = [];
  for (const key of ['p50', 'p90', 'p95', 'p99']) {
    const value = percentiles ? Number(percentiles[key]) : NaN;
    if (!Number.isFinite(value) || (log && value <= 0)) continue;
    const group = groups[groups.length - 1];
    if (group && Math.abs(where(value) - where(group.at)) < 0.08) group.keys.push(key), group.values.push(value);
    else groups.push({ at: value, keys: [key], values: [value] });
  }
  // Neighbouring labels alternate between two heights: a label never overlaps the next one.
  groups.forEach((group, index) => {
    group.values.forEach((value, i) => vline(value, COLORS.percentile, 1, 'dot', i === 0 ? group.keys.join(' ') : '',
      index % 2 ? 0.81 : 0.9));
  });
  vline(recommended, COLORS.recommended, 2.5, 'solid', `recommended ${formatNumber(recommended)}`, 1.0);
  vline(whatif, COLORS.whatif, 1.5, 'dash', `what-if ${formatNumber(whatif)}`, 0.72);
  const xaxis = axis({ title: { text: 'pre-clip norm' }, type: log ? 'log' : 'linear', hoverformat: '.4g',
    ...(log ? {} : ROUND_TICKS) });
  if (log) Object.assign(xaxis, logTicks(Math.log10(edges[edges.length - 1] / edges[0])));
  const layout = baseLayout({
    margin: { l: 55, r: 15, t: 22, b: 40 },
    showlegend: false,
    xaxis,
    yaxis: axis({ title: { text: 'steps' }, rangemode: 'tozero', ...ROUND_TICKS }),
    shapes,
    annotations,
  });
  return { data, layout };
}

// ---------------------------------------------------------------- tensors

/**
 * Rows of the grouped heatmap: every block, and a block's modules under it when
 * it is expanded. blocks/modules: `/tensors?group=block|module` answers (module may be null).
 * Returns [{name, label, values, kind: 'block'|'module'|'tensor', parent}].
 */
export function tensorRows({ blocks, modules = null, expanded = new Set(), level = 'block' }) {
  if (level === 'tensor' || !blocks) {
    const answer = blocks;
    return (answer ? answer.names : []).map((name, i) => ({ name, label: name, values: answer.norms[i], kind: 'tensor', parent: null }));
  }
  const moduleRows = new Map();
  if (modules) {
    modules.names.forEach((name, i) => {
      const parent = modules.parents ? modules.parents[i] : name;
      if (!moduleRows.has(parent)) moduleRows.set(parent, []);
      moduleRows.get(parent).push({ name, values: modules.norms[i] });
    });
  }
  const rows = [];
  blocks.names.forEach((name, i) => {
    const children = moduleRows.get(name) || [];
    const expandable = children.length > 1 || (children.length === 1 && children[0].name !== name);
    const open = expandable && (level === 'module' || expanded.has(name));
    rows.push({ name, label: `${expandable ? (open ? '▾ ' : '▸ ') : ''}${name}`, values: blocks.norms[i], kind: 'block', parent: null, expandable });
    if (open) {
      for (const child of children) {
        const short = child.name.startsWith(`${name}.`) ? child.name.slice(name.length + 1) : child.name;
        rows.push({ name: child.name, label: `    ${short}`, values: child.values, kind: 'module', parent: name });
      }
    }
  });
  return rows;
}

/** Heatmap of per-group (or per-tensor) norms, log10, one row per entry of `rows`. */
export function heatmapFigure({ rows, step, selectedStep = null, uirevision, height = undefined }) {
  const z = rows.map((row) => row.values.map((v) => {
    const number = typeof v === 'number' ? v : Number(v);
    return Number.isFinite(number) && number > 0 ? Math.log10(number) : null;
  }));
  const labels = rows.map((row) => plotlyText(row.label));
  const data = [{
    type: 'heatmap', x: step, y: labels.map((_, i) => i), z, colorscale: 'Viridis',
    // The row's name for the hover, per cell (a heatmap has no per-row text); escaped once per row.
    customdata: rows.map((row) => new Array(step.length).fill(plotlyText(row.name))),
    meta: { rows: rows.map((row) => row.name) },
    // A tall (scrolling) heatmap keeps its colour bar at the top, at a readable length.
    colorbar: { title: { text: 'log10 norm', side: 'right' }, thickness: 12,
      ...(height && height > 700 ? { lenmode: 'pixels', len: 320, y: 1, yanchor: 'top' } : {}) },
    hovertemplate: '%{customdata}<br>step %{x}<br>log10 norm %{z:.3f}<extra></extra>',
  }];
  const shapes = [];
  if (selectedStep !== null && selectedStep !== undefined) {
    shapes.push({
      type: 'line', yref: 'paper', y0: 0, y1: 1, xref: 'x', x0: selectedStep, x1: selectedStep,
      line: { color: COLORS.selected, width: 1, dash: 'dot' },
    });
  }
  const longest = labels.reduce((max, name) => Math.max(max, name.length), 0);
  const layout = baseLayout({
    uirevision,
    margin: { l: Math.min(280, 20 + longest * 6.5), r: 10, t: 10, b: 40 },
    ...(height ? { height } : {}), // given: Plotly keeps a layout's height when only the box grows
    xaxis: axis({ title: { text: 'step' }, ...ROUND_TICKS }),
    yaxis: axis({ automargin: false, autorange: 'reversed', tickfont: { size: 10 },
      tickmode: 'array', tickvals: labels.map((_, i) => i), ticktext: labels }),
    shapes,
  });
  return { data, layout };
}

/** Which groups spike most often over the run (robust rule, per group): bars, most first. */
export function groupSpikeFigure({ names, spikes, limit = 15 }) {
  const rows = names.map((name, i) => ({ name, count: Number(spikes[i]) || 0 }))
    .filter((row) => row.count > 0).sort((a, b) => b.count - a.count).slice(0, limit).reverse();
  const labels = rows.map((row) => plotlyText(row.name));
  const data = [{
    type: 'bar', orientation: 'h', name: 'spikes', x: rows.map((row) => row.count), y: labels,
    marker: { color: COLORS.spike },
    hovertemplate: '%{y}<br>%{x} spike steps<extra></extra>',
  }];
  const longest = labels.reduce((max, name) => Math.max(max, name.length), 0);
  const layout = baseLayout({
    margin: { l: Math.min(260, 20 + longest * 6.5), r: 15, t: 10, b: 40 },
    xaxis: axis({ title: { text: 'steps where the group norm was an outlier' }, rangemode: 'tozero' }),
    yaxis: axis({ tickfont: { size: 10 } }),
    height: Math.max(140, 50 + rows.length * 18),
  });
  return { data, layout };
}

/**
 * Which tensors contributed to the norm at one step: horizontal bars, the top k, largest first.
 * rows: [{name, norm, ratio, group}] ; by: 'ratio' | 'norm'.
 */
export function contributionFigure({ rows, by, limit = 15 }) {
  const key = by === 'norm' ? 'norm' : 'ratio';
  const top = rows.filter((row) => Number.isFinite(row[key])).sort((a, b) => b[key] - a[key]).slice(0, limit).reverse();
  const names = top.map((row) => plotlyText(row.name));
  const data = [{
    type: 'bar', orientation: 'h', name: key === 'norm' ? 'tensor norm' : 'norm ÷ median',
    x: top.map((row) => row[key]), y: names,
    customdata: top.map((row) => [row.norm, row.ratio, plotlyText(row.group ?? '')]),
    marker: { color: top.map((row) => (row.ratio >= 3 ? COLORS.spike : COLORS.norm)) },
    hovertemplate: '%{y}<br>in %{customdata[2]}<br>norm %{customdata[0]:.4g}<br>÷ median %{customdata[1]:.3g}<extra></extra>',
  }];
  const longest = names.reduce((max, name) => Math.max(max, name.length), 0);
  const layout = baseLayout({
    margin: { l: Math.min(280, 20 + longest * 6.5), r: 15, t: 10, b: 40 },
    xaxis: axis({ title: { text: key === 'norm' ? 'tensor norm' : 'norm ÷ median of the preceding steps' }, hoverformat: '.4g' }),
    yaxis: axis({ tickfont: { size: 10 } }),
    height: Math.max(180, 40 + top.length * 18),
  });
  return { data, layout };
}

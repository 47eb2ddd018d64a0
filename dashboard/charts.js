// Plotly figures (data + layout) built from the API's shapes. Pure functions:
// no fetching, no DOM besides what Plotly needs. Every label that comes from
// the database goes through plotlyText().
'use strict';

import { plottable, plotlyText, formatNumber, truthy } from './util.js';

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
};

const OVERLAY_COLORS = ['#c792ea', '#ffcb6b', '#89ddff', '#f78c6c', '#c3e88d', '#ff9cac', '#b2ccd6'];

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

/**
 * The norm chart.
 * series: columnar, numbers parsed (step, pre_norm, threshold, clipped, loss, spike, nonfinite).
 * marks: {spike: [{step, value}], nonfinite: [{step}]} from the events API (exact, survive downsampling).
 * overlays: [{run, series}] other runs' pre-clip norms.
 */
export function normFigure({ series, marks, overlays, log, recommended, selectedStep, uirevision }) {
  const steps = series.step;
  const pre = series.pre_norm.map(plottable);
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

  const clippedX = [];
  const clippedY = [];
  const spikeAt = new Map();
  const nonfiniteSteps = new Set();
  for (let i = 0; i < steps.length; i += 1) {
    const norm = pre[i];
    if (series.clipped && truthy(series.clipped[i]) && norm !== null) {
      clippedX.push(steps[i]);
      clippedY.push(norm);
    }
    if (series.spike && truthy(series.spike[i])) spikeAt.set(steps[i], norm);
    const raw = series.pre_norm[i];
    if ((series.nonfinite && truthy(series.nonfinite[i])) || (typeof raw === 'number' && !Number.isFinite(raw))) {
      nonfiniteSteps.add(steps[i]);
    }
  }
  const [first, last] = steps.length ? [steps[0], steps[steps.length - 1]] : [-Infinity, Infinity];
  for (const mark of marks.spike) {
    if (mark.step >= first && mark.step <= last && !spikeAt.has(mark.step)) spikeAt.set(mark.step, plottable(mark.value));
  }
  for (const mark of marks.nonfinite) {
    if (mark.step >= first && mark.step <= last) nonfiniteSteps.add(mark.step);
  }

  if (clippedX.length) {
    data.push({
      type: 'scatter', mode: 'markers', name: TRACE.clipped, x: clippedX, y: clippedY,
      marker: { color: COLORS.clipped, size: 5, symbol: 'circle-open' },
      hovertemplate: 'step %{x}<br>clipped, norm %{y:.4g}<extra></extra>',
    });
  }
  if (spikeAt.size) {
    const spikeSteps = [...spikeAt.keys()].sort((a, b) => a - b);
    data.push({
      type: 'scatter', mode: 'markers', name: TRACE.spike, x: spikeSteps,
      y: spikeSteps.map((s) => spikeAt.get(s)),
      marker: { color: COLORS.spike, size: 10, symbol: 'x-thin', line: { width: 2, color: COLORS.spike } },
      hovertemplate: 'step %{x}<br>spike, norm %{y:.4g}<br>click for tensors<extra></extra>',
    });
  }

  const loss = (series.loss || []).map(plottable);
  if (loss.some((v) => v !== null)) {
    data.push({
      type: 'scatter', mode: 'lines', name: TRACE.loss, x: steps, y: loss, yaxis: 'y2',
      line: { color: COLORS.loss, width: 1 }, opacity: 0.55,
      hovertemplate: 'step %{x}<br>loss %{y:.4g}<extra></extra>',
    });
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
  if (typeof recommended === 'number' && Number.isFinite(recommended)) {
    shapes.push({
      type: 'line', xref: 'paper', x0: 0, x1: 1, yref: 'y', y0: recommended, y1: recommended,
      line: { color: COLORS.recommended, width: 1, dash: 'dot' },
    });
    annotations.push({
      xref: 'paper', x: 0, xanchor: 'left', yref: 'y', y: log ? Math.log10(recommended) : recommended,
      yanchor: 'bottom', showarrow: false, text: `recommended ${formatNumber(recommended)}`,
      font: { color: COLORS.recommended, size: 11 },
    });
  }
  if (selectedStep !== null && selectedStep !== undefined) {
    shapes.push({
      type: 'line', yref: 'paper', y0: 0, y1: 1, xref: 'x', x0: selectedStep, x1: selectedStep,
      line: { color: COLORS.selected, width: 1, dash: 'dot' },
    });
  }

  const layout = baseLayout({
    uirevision,
    margin: { l: 60, r: 60, t: 10, b: 40 },
    showlegend: true,
    legend: { orientation: 'h', x: 0, y: 1.02, yanchor: 'bottom', bgcolor: 'rgba(0,0,0,0)' },
    xaxis: axis({ title: { text: 'step' } }),
    yaxis: axis({ title: { text: 'pre-clip norm' }, type: log ? 'log' : 'linear' }),
    yaxis2: axis({ title: { text: 'loss' }, overlaying: 'y', side: 'right', showgrid: false }),
    yaxis3: { overlaying: 'y', range: [0, 1], visible: false, fixedrange: true },
    shapes,
    annotations,
  });
  return { data, layout };
}

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
    annotations.push({
      xref: 'x', x: log ? Math.log10(x) : x, yref: 'paper', y, yanchor: 'bottom', showarrow: false,
      text: label, font: { color, size: 10 }, textangle: 0,
    });
  };
  const labels = ['p50', 'p90', 'p95', 'p99'];
  labels.forEach((key, index) => {
    const value = percentiles ? Number(percentiles[key]) : NaN;
    vline(value, COLORS.percentile, 1, 'dot', key, 0.92 - index * 0.08);
  });
  vline(recommended, COLORS.recommended, 2.5, 'solid', `recommended ${formatNumber(recommended)}`, 1.0);
  vline(whatif, COLORS.whatif, 1.5, 'dash', `what-if ${formatNumber(whatif)}`, 0.6);
  const layout = baseLayout({
    margin: { l: 55, r: 15, t: 22, b: 40 },
    showlegend: false,
    xaxis: axis({ title: { text: 'pre-clip norm' }, type: log ? 'log' : 'linear' }),
    yaxis: axis({ title: { text: 'steps' }, rangemode: 'tozero' }),
    shapes,
    annotations,
  });
  return { data, layout };
}

/** Heatmap of per-tensor norms (log10), one row per tensor. */
export function heatmapFigure({ tensors, selectedStep, uirevision }) {
  const z = tensors.norms.map((row) => row.map((v) => {
    const number = typeof v === 'number' ? v : Number(v);
    return Number.isFinite(number) && number > 0 ? Math.log10(number) : null;
  }));
  const names = tensors.names.map(plotlyText);
  const data = [{
    type: 'heatmap', x: tensors.step, y: names, z, colorscale: 'Viridis',
    colorbar: { title: { text: 'log10 norm', side: 'right' }, thickness: 12 },
    hovertemplate: '%{y}<br>step %{x}<br>log10 norm %{z:.3f}<extra></extra>',
  }];
  const shapes = [];
  if (selectedStep !== null && selectedStep !== undefined) {
    shapes.push({
      type: 'line', yref: 'paper', y0: 0, y1: 1, xref: 'x', x0: selectedStep, x1: selectedStep,
      line: { color: COLORS.selected, width: 1, dash: 'dot' },
    });
  }
  const longest = names.reduce((max, name) => Math.max(max, name.length), 0);
  const layout = baseLayout({
    uirevision,
    margin: { l: Math.min(260, 20 + longest * 6.5), r: 10, t: 10, b: 40 },
    xaxis: axis({ title: { text: 'step' } }),
    yaxis: axis({ automargin: false, autorange: 'reversed', tickfont: { size: 10 } }),
    shapes,
  });
  return { data, layout };
}

/**
 * Which tensors contributed to the norm at one step: horizontal bars, largest first.
 * rows: [{name, norm, ratio}] ; by: 'ratio' | 'norm'.
 */
export function contributionFigure({ rows, by, limit = 20 }) {
  const key = by === 'norm' ? 'norm' : 'ratio';
  const top = rows.filter((row) => Number.isFinite(row[key])).sort((a, b) => b[key] - a[key]).slice(0, limit).reverse();
  const names = top.map((row) => plotlyText(row.name));
  const data = [{
    type: 'bar', orientation: 'h', name: key === 'norm' ? 'tensor norm' : 'norm ÷ median',
    x: top.map((row) => row[key]), y: names,
    customdata: top.map((row) => [row.norm, row.ratio]),
    marker: { color: top.map((row) => (row.ratio >= 3 ? COLORS.spike : COLORS.norm)) },
    hovertemplate: '%{y}<br>norm %{customdata[0]:.4g}<br>÷ median %{customdata[1]:.3g}<extra></extra>',
  }];
  const longest = names.reduce((max, name) => Math.max(max, name.length), 0);
  const layout = baseLayout({
    margin: { l: Math.min(260, 20 + longest * 6.5), r: 15, t: 10, b: 40 },
    xaxis: axis({ title: { text: key === 'norm' ? 'tensor norm' : 'norm ÷ median of the preceding steps' } }),
    yaxis: axis({ tickfont: { size: 10 } }),
    height: Math.max(180, 40 + top.length * 18),
  });
  return { data, layout };
}

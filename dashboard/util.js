// Small pure helpers shared by the dashboard modules: number parsing and
// formatting, DOM building without HTML strings, text for Plotly labels.
'use strict';

// The wire format sends non-finite floats as strings.
const NON_FINITE = { NaN: NaN, Infinity: Infinity, '-Infinity': -Infinity };

/** A wire float (number, null, "NaN", "Infinity", "-Infinity") as a JS number or null. */
export function wireNumber(value) {
  if (typeof value === 'number') return value;
  if (value === null || value === undefined) return null;
  if (typeof value === 'string' && value in NON_FINITE) return NON_FINITE[value];
  const parsed = Number(value);
  return Number.isNaN(parsed) ? null : parsed;
}

/** A value Plotly can draw: finite numbers pass, everything else is a gap. */
export function plottable(value) {
  return typeof value === 'number' && Number.isFinite(value) ? value : null;
}

/** A wire boolean column entry (true/false/1/0/null). */
export function truthy(value) {
  return value === true || value === 1;
}

/**
 * Text for a Plotly label (trace name, tick, title). Plotly interprets a
 * subset of HTML tags in labels (`<a href>`, `<b>`, `<br>`); escaping makes
 * it draw the string literally, still as SVG text, never as markup.
 */
export function plotlyText(text) {
  return String(text).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

/**
 * Build an element: `el('td', {className: 'num', title: t}, 'text', child)`.
 * Children are strings (inserted as text nodes) or nodes; never parsed as HTML.
 */
export function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null) continue;
    if (key === 'dataset') Object.assign(node.dataset, value);
    else if (key in node) node[key] = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    node.append(typeof child === 'string' || typeof child === 'number' ? String(child) : child);
  }
  return node;
}

/** A norm or loss for humans: 3 significant digits, exponent for extremes. */
export function formatNumber(value, digits = 3) {
  if (value === null || value === undefined) return '–';
  if (typeof value !== 'number') value = wireNumber(value);
  if (value === null) return '–';
  if (Number.isNaN(value)) return 'NaN';
  if (!Number.isFinite(value)) return value > 0 ? '+Inf' : '−Inf';
  const magnitude = Math.abs(value);
  if (magnitude !== 0 && (magnitude >= 1e5 || magnitude < 1e-3)) return value.toExponential(digits - 1);
  return Number(value.toPrecision(digits)).toString();
}

/**
 * Text from the server with its long floats shortened: "threshold 1.9969999999999999"
 * becomes "threshold 1.997". Integers and short decimals are left alone. Still text.
 */
export function tidyNumbers(text) {
  return String(text ?? '').replace(/-?\d+\.\d{5,}(?:[eE][+-]?\d+)?/g, (match) => formatNumber(Number(match), 4));
}

export function formatInt(value) {
  return typeof value === 'number' && Number.isFinite(value) ? value.toLocaleString('en-US') : '–';
}

export function formatRate(rate) {
  if (typeof rate !== 'number' || !Number.isFinite(rate)) return '–';
  const percent = rate * 100;
  if (percent === 0) return '0%';
  if (percent < 0.01) return '<0.01%';
  return `${percent < 10 ? percent.toFixed(2) : percent.toFixed(1)}%`;
}

/** A server timestamp (unix seconds, milliseconds, or ISO text) as a Date, or null. */
export function parseTime(value) {
  if (value === null || value === undefined || value === '') return null;
  if (typeof value === 'number') return new Date(value < 1e12 ? value * 1000 : value);
  const number = Number(value);
  if (Number.isFinite(number)) return parseTime(number);
  // ISO text without a zone is UTC on the server.
  const text = /[zZ]|[+-]\d\d:?\d\d$/.test(value) ? value : `${value}Z`;
  const date = new Date(text);
  return Number.isNaN(date.getTime()) ? null : date;
}

export function formatAgo(date, now = Date.now()) {
  if (!date) return '–';
  const seconds = Math.max(0, Math.round((now - date.getTime()) / 1000));
  if (seconds < 60) return `${seconds} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 86400) return `${(seconds / 3600).toFixed(1)} h ago`;
  return `${(seconds / 86400).toFixed(1)} d ago`;
}

export function formatDate(date) {
  return date ? date.toLocaleString() : '';
}

/** Median of the finite numbers in `values` (null when there are none). */
export function median(values) {
  const finite = values.filter((v) => typeof v === 'number' && Number.isFinite(v)).sort((a, b) => a - b);
  if (finite.length === 0) return null;
  const middle = finite.length >> 1;
  return finite.length % 2 ? finite[middle] : (finite[middle - 1] + finite[middle]) / 2;
}

/** Run `fn` at most once per `ms`, the last call winning (trailing edge). */
export function throttle(fn, ms) {
  let timer = null;
  let last = 0;
  return function throttled(...args) {
    const wait = Math.max(0, last + ms - Date.now());
    clearTimeout(timer);
    timer = setTimeout(() => { last = Date.now(); fn(...args); }, wait);
  };
}

export function debounce(fn, ms) {
  let timer = null;
  return function debounced(...args) {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

// The first thing the page runs (index.html loads it before app.js; it imports
// nothing, so it runs as soon as it is fetched): it asks for the opened run's
// series and then starts evaluating plotly.js, so the request and the server's
// answer overlap the ~0.5 s the browser spends compiling the bundle, instead of
// waiting for the other modules and then for plotly. panel-norm.js takes the
// answer if it asks for the same URL; plot.js takes the bundle's promise.
'use strict';

/** The shipped bundle, versioned (the server lets browsers keep it): see plotly-cartesian.json. */
export const PLOTLY_BUNDLE = '/static/plotly-cartesian.min.js?v=4.1.1';
export const PLOTLY_FALLBACK = '/static/plotly.min.js';
export const SERIES_FIELDS = 'all';

/** Points asked of /series for the norm chart: about two per pixel of its width. */
export function chartPoints() {
  const element = document.getElementById('norm-chart');
  const width = (element && element.clientWidth) || 1000;
  return Math.max(1000, Math.min(4000, Math.round(width * 2)));
}

/** `/api/runs/{run}/series?...` as panel-norm.js asks for the whole run (api.js getJSON's encoding). */
export function seriesURL(run) {
  const query = new URLSearchParams({ fields: SERIES_FIELDS, points: String(chartPoints()) });
  return `/api/runs/${encodeURIComponent(run)}/series?${query}`;
}

export function loadScript(src) {
  return new Promise((resolve, reject) => {
    const script = document.createElement('script');
    script.src = src;
    script.addEventListener('load', () => (window.Plotly ? resolve(window.Plotly) : reject(new Error(`${src} defined no Plotly`))), { once: true });
    script.addEventListener('error', () => reject(new Error(`${src} did not load`)), { once: true });
    document.head.append(script);
  });
}

let early = null;

/** The early answer (a fetch Response promise) for `url`, once; null when none was started for it. */
export function takeEarlySeries(url) {
  if (!early || early.url !== url) return null;
  const { response } = early;
  early = null;
  return response;
}

function startSeries() {
  const address = new URL(window.location.href);
  const run = address.searchParams.get('run');
  if (!run || address.searchParams.has('token')) return; // no run named, or app.js adopts a new token first
  let token = '';
  try {
    token = sessionStorage.getItem('gradwatch.readToken') || '';
  } catch {
    // Storage disabled: app.js asks if the server wants a token.
  }
  const url = seriesURL(run);
  const headers = { Accept: 'application/json', ...(token ? { Authorization: `Bearer ${token}` } : {}) };
  const response = fetch(url, { headers, cache: 'no-store' });
  response.catch(() => {}); // a failure is panel-norm's to report, when it asks again
  early = { url, response };
}

startSeries();
/** window.Plotly, once the bundle (or the plotly package's full one when it is missing) has run. */
export const plotlyLoading = loadScript(PLOTLY_BUNDLE).catch(() => loadScript(PLOTLY_FALLBACK));
plotlyLoading.catch(() => {});

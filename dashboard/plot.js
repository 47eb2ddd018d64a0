// plotly.js, loaded once: the shipped cartesian bundle (plotly.js-cartesian-dist-min,
// see plotly-cartesian.json), or the plotly package's full bundle when it is missing.
// index.html preloads the bundle, so inserting the script here costs no round trip.
'use strict';

export const PLOT_CONFIG = { responsive: true, displaylogo: false, modeBarButtonsToRemove: ['select2d', 'lasso2d'] };
const BUNDLES = ['/static/plotly-cartesian.min.js', '/static/plotly.min.js'];

function loadScript(src) {
  return new Promise((resolve, reject) => {
    const script = document.createElement('script');
    script.src = src;
    script.addEventListener('load', () => (window.Plotly ? resolve(window.Plotly) : reject(new Error(`${src} defined no Plotly`))), { once: true });
    script.addEventListener('error', () => reject(new Error(`${src} did not load`)), { once: true });
    document.head.append(script);
  });
}

let ready = null;

/** A promise of window.Plotly. */
export function plotly() {
  if (!ready) {
    ready = window.Plotly ? Promise.resolve(window.Plotly)
      : loadScript(BUNDLES[0]).catch(() => loadScript(BUNDLES[1]));
  }
  return ready;
}

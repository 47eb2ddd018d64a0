// plotly.js, loaded once: the shipped cartesian bundle (plotly.js-cartesian-dist-min,
// see plotly-cartesian.json), or the plotly package's full bundle when it is missing.
// boot.js starts it (right after the first request for the series), index.html preloads it.
'use strict';

import { plotlyLoading } from './boot.js';

export const PLOT_CONFIG = { responsive: true, displaylogo: false, modeBarButtonsToRemove: ['select2d', 'lasso2d'] };

/** A promise of window.Plotly. */
export function plotly() {
  return plotlyLoading;
}

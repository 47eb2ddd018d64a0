// Every step column with its type, as the server's column registry declares them
// (a test holds this list to the registry). The dashboard parses series with it.
'use strict';

export const STEP_COLUMNS = {
  step: 'int',
  pre_norm: 'float',
  post_norm: 'float',
  scale: 'float',
  threshold: 'float',
  clipped: 'bool',
  loss: 'float',
  lr: 'float',
  z: 'float',
  ema: 'float',
  spike: 'bool',
  nonfinite: 'bool',
  time: 'float',
  skipped: 'bool',
  robust_z: 'float',
  level_shift: 'bool',
};

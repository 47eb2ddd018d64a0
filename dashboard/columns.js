// The step columns and their types, as the server's column registry declares them
// (server/storage/registry.py). tests/test_server_registry.py holds this list to the
// registry: a column added in one place only fails CI.
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

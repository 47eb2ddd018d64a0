"""Attach a `GradWatch` to trainers that own their training step (and its `mx.compile`).

- `gradwatch.agent.integrations.mlx_lm`: `mlx_lm.tuner.trainer.train`.
"""

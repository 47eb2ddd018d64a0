"""gradwatch for mlx-lm's trainer (`mlx_lm.tuner.trainer.train`), compiled step intact.

    from gradwatch.agent import GradWatch
    from gradwatch.agent.integrations import mlx_lm as gradwatch_mlx_lm
    from gradwatch.clip import GlobalNorm

    with GradWatch(run="lora-7b", clipper=GlobalNorm(1.0)) as watch:
        gradwatch_mlx_lm.train(model, optimizer, train_set, val_set, args=args, watch=watch)

mlx-lm's `train()` compiles its own step with `state = [model.state, optimizer.state,
mx.random.state]` and offers no hook that sees the gradients (a `TrainingCallback` only
gets reports), so `GradWatch.step()` cannot be called from outside and must not be
called inside (it is a Python side effect in a compiled function). Instead:

- `watch.state` rides inside `optimizer.state` (key "gradwatch"), so it is an input and
  an output of the trainer's compiled step with no change to mlx-lm;
- `optimizer.update` is wrapped with `watch.compute()`: the gradients it receives are
  the ones the optimizer applies (accumulated, averaged over ranks and micro-batches),
  so there is one record per optimizer update, clipped before the update;
- the record is read outside the compiled step from `iterate_batches` (the trainer's
  only Python call between steps) when the watch's step counter has advanced, and once
  more when `train()` returns (the final step).

The wrapping is undone when `train()` returns or raises. Nothing here evaluates an array
the trainer has not already evaluated (`mx.eval(state, ...)` computes the record).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import mlx.core as mx

STATE_KEY = "gradwatch"


class Attachment:
    """A `GradWatch` attached to an mlx-lm optimizer; a context manager.

    Use `train()` unless you call `mlx_lm.tuner.trainer.train` yourself: then enter this
    before calling it, pass `iterate_batches=attachment.iterate_batches`, and let the
    `with` block end after it (that records the final step)."""

    def __init__(self, watch: Any, optimizer: Any, iterate_batches: Callable | None = None):
        if iterate_batches is None:
            from mlx_lm.tuner.trainer import iterate_batches as default
            iterate_batches = default
        self.watch = watch
        self.optimizer = optimizer
        self._iterate = iterate_batches
        self._seen: int | None = None
        self._active = False

    # -- install / uninstall --------------------------------------------------
    def __enter__(self) -> "Attachment":
        optimizer, watch = self.optimizer, self.watch
        if STATE_KEY in optimizer.state:
            raise RuntimeError("gradwatch: this optimizer already has a GradWatch attached")
        if "update" in vars(optimizer):
            raise RuntimeError("gradwatch: optimizer.update is already replaced on this optimizer; "
                               "attach gradwatch before wrapping it otherwise")
        original = optimizer.update

        def update(model: Any, gradients: Any) -> None:
            gradients, _ = watch.compute(gradients, lr=_learning_rate(optimizer))
            original(model, gradients)

        optimizer.state[STATE_KEY] = watch.state  # rides in the trainer's compile inputs/outputs
        optimizer.update = update
        self._seen = _counter(watch)
        self._active = True
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            if exc_type is None:
                self.poll()  # the final step
        finally:
            self._active = False
            vars(self.optimizer).pop("update", None)
            self.optimizer.state.pop(STATE_KEY, None)

    # -- the per-step hook ----------------------------------------------------
    def iterate_batches(self, *args: Any, **kwargs: Any) -> Iterator:
        """The trainer's `iterate_batches` (also used for validation), recording the last
        optimizer update before each batch it hands out."""
        for batch in self._iterate(*args, **kwargs):
            self.poll()
            yield batch

    def poll(self) -> None:
        """Record the last update if the watch's step counter moved since the last poll.
        Outside the compiled step only; the trainer's `mx.eval(state, ...)` has computed
        the counter and the record, so reading them costs nothing."""
        if not self._active:
            return
        step = _counter(self.watch)
        if step != self._seen:
            self._seen = step
            self.watch.record()


def attach(watch: Any, optimizer: Any, iterate_batches: Callable | None = None) -> Attachment:
    """Attach `watch` to `optimizer` for `mlx_lm.tuner.trainer.train`; see `Attachment`."""
    return Attachment(watch, optimizer, iterate_batches)


def train(model: Any, optimizer: Any, train_dataset: Any, val_dataset: Any = None, *, watch: Any,
          iterate_batches: Callable | None = None, **kwargs: Any) -> None:
    """`mlx_lm.tuner.trainer.train(model, optimizer, train_dataset, val_dataset, **kwargs)`
    with `watch` clipping (when it has a clipper) and recording every optimizer update.

    `kwargs` are the trainer's own (`args=TrainingArgs(...)`, `loss=`,
    `training_callback=`); gradient accumulation gives one record per update. Close or
    flush the watch afterwards (`with GradWatch(...) as watch:` does)."""
    from mlx_lm.tuner.trainer import train as mlx_lm_train

    with attach(watch, optimizer, iterate_batches) as attachment:
        mlx_lm_train(model, optimizer, train_dataset, val_dataset,
                     iterate_batches=attachment.iterate_batches, **kwargs)


def _counter(watch: Any) -> int:
    return int(watch.state["step"].item())


def _learning_rate(optimizer: Any) -> mx.array:
    """The learning rate this update applies: `apply_gradients` sets a scheduled rate from
    `scheduler(step)` before the update, so the recorded rate is computed the same way."""
    scheduler = getattr(optimizer, "_schedulers", {}).get("learning_rate")
    rate = scheduler(optimizer.step) if scheduler is not None else optimizer.learning_rate
    return rate if isinstance(rate, mx.array) else mx.array(rate, dtype=mx.float32)

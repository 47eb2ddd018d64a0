"""`GradWatch`: two lines in a training loop.

    with GradWatch(run="tiny-gpt", url="http://127.0.0.1:8765", clipper=GlobalNorm(1.0)) as watch:
        for batch in batches:
            loss, grads = loss_and_grad(model, *batch)
            grads = watch.step(grads, loss=loss)
            optimizer.update(model, grads)
            mx.eval(model.parameters(), optimizer.state)

`step()` builds lazy MLX ops only (compiled once per gradient-tree shape),
hands the *previous* step's numbers (already computed by the user's
`mx.eval`) to a bounded buffer, and returns. Everything else (batching,
the WebSocket, the spool, fsync, backoff) happens on the sender thread.
"""
from __future__ import annotations

import atexit
import os
import re
import socket
import sys
import threading
import time
import warnings
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx

from gradwatch.clip import EMADetector, ZScoreDetector

from . import signals
from .buffer import RecordBuffer
from .recorder import NonFiniteGradientError, Recorder, RecordError, StepRecord
from .sender import DEFAULT_BATCH_BYTES, Sender
from .spool import DEFAULT_CAP_BYTES, Spool
from .stats import FlushResult, Stats
from .transport import WebSocketTransport

DEFAULT_SPOOL_ROOT = "gradwatch-spool"
_LIVE: "weakref.WeakSet[GradWatch]" = weakref.WeakSet()


def default_spool_dir(run: str) -> Path:
    """`./gradwatch-spool/<run>/`, with the run name made safe as a folder name."""
    return Path(DEFAULT_SPOOL_ROOT) / (re.sub(r"[^A-Za-z0-9._-]+", "_", run).strip(".") or "run")


class GradWatch:
    """Clip (optionally), watch and stream the gradient norm of an MLX training run.

    Args:
        run: run name on the server (one run = one series of steps).
        url: server address, `http://host:port`; None writes the spool only
            (upload it later with `gradwatch push DIR`).
        clipper: a `gradwatch.clip` clipper (`GlobalNorm(1.0)`, ...); None
            monitors without clipping (the gradients are returned unchanged).
        detectors: spike detectors on the pre-clip norm; default
            `[ZScoreDetector(), EMADetector()]`, `[]` for none.
        token: write token of the server (`gradwatch serve --token`).
        spool_dir: folder for this run's spool (default `./gradwatch-spool/<run>/`).
            A new `GradWatch` on a folder an earlier process left steps in
            (it crashed, was killed, or the server was away at its end) sends
            those steps too, before its own; `flush()` counts them.
        tensor_norms: also record every tensor's norm. With `ord=2` (the
            default) they cost no extra math: they are computed on the way to
            the global norm (other norms, and clippers such as AGC, compute
            them separately). They dominate the wire and the spool: one value
            per tensor per step, against about a dozen for the rest of a step.
        config: a JSON-serialisable dict stored with the run's metadata.
        compile: compile the step's math with `mx.compile` (clipper and
            detector state as inputs/outputs).
        all_ranks: with a distributed clipper (`group=`), stream every rank
            (as run `<run>-rank<r>`) instead of rank 0 only.
        start_step: number of the first step (for a resumed run).
        queue_size, batch_steps, batch_interval, spool_cap_bytes, close_timeout, max_batch_bytes:
            sizes and times of the pipeline (records in the buffer, records
            per batch, seconds before a partial batch goes, bytes of spool on
            disk, seconds `close()` waits, encoded bytes per message; the
            sender cuts messages smaller when the server's limit is lower).
        send_timeout: seconds a server may take to take our bytes or acknowledge
            a batch before the connection is given up (the batches go to the
            spool and a new connection is tried).
        handle_signals: on SIGTERM and SIGINT, deliver (or spool) what is held
            within `close_timeout`, then let the signal do what it would have
            done (an earlier handler is called, not replaced). Installed only
            when created in the main thread.
    """

    def __init__(self, run: str, url: str | None = None, clipper: Any = None,
                 detectors: Sequence[Any] | None = None, token: str | None = None,
                 spool_dir: str | os.PathLike | None = None, tensor_norms: bool = True, *,
                 config: dict | None = None, compile: bool = True, all_ranks: bool = False,
                 start_step: int = 0, queue_size: int = 10_000, batch_steps: int = 1000,
                 batch_interval: float = 0.25, spool_cap_bytes: int = DEFAULT_CAP_BYTES,
                 close_timeout: float = 10.0, max_inflight: int = 8, backoff_cap: float = 30.0,
                 max_batch_bytes: int = DEFAULT_BATCH_BYTES, send_timeout: float = 30.0,
                 handle_signals: bool = True):
        if not isinstance(run, str) or not run:
            raise ValueError(f"run must be a non-empty string, got {run!r}")
        self.clipper = clipper
        self.detectors = [ZScoreDetector(), EMADetector()] if detectors is None else list(detectors)
        group = getattr(clipper, "group", None)
        self.rank = group.rank() if group is not None else 0
        self.world_size = group.size() if group is not None else 1
        if all_ranks and self.world_size > 1:
            run = f"{run}-rank{self.rank}"
        self.run = run
        self.url = url
        self.config = config
        self.close_timeout = float(close_timeout)
        self.recording = self.rank == 0 or all_ranks
        self.spool_dir = Path(spool_dir) if spool_dir is not None else default_spool_dir(run)
        self._raise_nonfinite = getattr(clipper, "nonfinite", None) == "raise"
        self._recorder = Recorder(clipper, self.detectors, tensor_norms)
        self._compiled = (mx.compile(self._recorder.build, inputs=self._recorder.state,
                                     outputs=self._recorder.state) if compile else self._recorder.build)
        self._next_step = int(start_step)
        self._recorded = 0
        self._buffered = 0
        self._child_dropped: dict[str, int] = {}  # in a forked child, which has no sender
        self._warned_record = False
        self._meta_sent = False
        self._closed = False
        self._forked = False
        self._started_at = time.time()
        self._buffer: RecordBuffer[StepRecord] = RecordBuffer(queue_size, wake_at=batch_steps)
        self._sender: Sender | None = None
        if self.recording:
            self._spool = Spool(self.spool_dir, cap_bytes=spool_cap_bytes)
            transport = WebSocketTransport(url, token, send_timeout=send_timeout) if url else None
            self._sender = Sender(run, self._buffer, self._spool, transport, batch_steps=batch_steps,
                                  batch_interval=batch_interval, max_inflight=max_inflight,
                                  backoff_cap=backoff_cap, max_batch_bytes=max_batch_bytes)
            self._sender.start()
        self._last_flush: tuple[int, FlushResult] | None = None  # (records handed over, result)
        _LIVE.add(self)
        if handle_signals and self.recording:
            signals.install(_on_signal)

    # -- the training loop -----------------------------------------------------
    def step(self, grads: Any, loss: Any = None, lr: Any = None, params: Any = None) -> Any:
        """Clip `grads` (when a clipper is set) and record this step; returns the gradients
        to give the optimizer. Lazy: nothing is evaluated here."""
        self._emit_pending(raise_nonfinite=True)
        arrays: dict[str, mx.array] = {}
        extras: dict[str, float] = {}
        if params is not None:
            arrays["params"] = params
        for name, value in (("loss", loss), ("lr", lr)):
            if isinstance(value, mx.array):
                arrays[name] = value
            elif value is not None:
                extras[name] = float(value)
        clipped, vector = self._compiled(grads, arrays)
        self._hold(vector, extras, grads)
        return clipped

    @property
    def state(self) -> dict:
        """The clipper's and detectors' arrays, for `mx.compile(inputs=..., outputs=...)`
        of a training step that calls `compute()`."""
        return self._recorder.state

    def compute(self, grads: Any, loss: mx.array | None = None, lr: mx.array | None = None,
                params: Any = None) -> tuple[Any, mx.array]:
        """The pure part of `step()`, for use inside your own `mx.compile`d step:
        returns `(grads, record)`; pass `record` to `record()` outside the compiled function."""
        arrays = {name: value for name, value in (("params", params), ("loss", loss), ("lr", lr))
                  if value is not None}
        return self._recorder.build(grads, arrays)

    def record(self, record: mx.array, lr: float | None = None, loss: float | None = None) -> None:
        """Record a step computed by `compute()` (Python floats `lr`/`loss` go beside it)."""
        self._emit_pending(raise_nonfinite=True)
        extras = {name: float(value) for name, value in (("loss", loss), ("lr", lr)) if value is not None}
        self._hold(record, extras, None)

    def _hold(self, vector: mx.array, extras: dict, grads: Any) -> None:
        if self.recording and not self._closed:
            self._recorder.hold(self._next_step, vector, extras)
            if not self._meta_sent:
                self._send_meta(grads)
        self._next_step += 1

    def _emit_pending(self, raise_nonfinite: bool) -> None:
        """Hand the previous step to the sender: O(1), no I/O, never waits. A full buffer
        means the sender thread cannot keep up (it drains into the spool even while the
        server is away): the record is counted as a `queue_full` drop."""
        try:
            record = self._recorder.take()
        except RecordError as error:  # a bug, not the user's: say it once, count it, train on
            self._recorded += 1
            if not self._warned_record:
                self._warned_record = True
                warnings.warn(str(error), RuntimeWarning, stacklevel=3)
            if self._sender is not None and not self._forked:
                self._sender.count_training_drop("encode_error")
            return
        if record is None:
            return
        self._recorded += 1
        if self._forked:
            self._child_dropped["forked_child"] = self._child_dropped.get("forked_child", 0) + 1
        elif self._buffer.put(record):
            self._buffered += 1
        else:
            self._sender.count_training_drop("queue_full")
        if raise_nonfinite and self._raise_nonfinite and record.value("nonfinite"):
            raise NonFiniteGradientError(record.step, record.value("pre_norm"), self.run)

    def _send_meta(self, grads: Any) -> None:
        self._meta_sent = True
        if grads is not None:
            self._recorder.note_shapes(grads)
        layout = self._recorder.last_layout
        meta = {
            "clipper": self.clipper.config() if self.clipper is not None else None,
            "detectors": [detector.config() for detector in self.detectors if hasattr(detector, "config")],
            "tensors": {"names": list(layout.tensor_names) if layout else [],
                        "shapes": self._recorder.shapes},
            "mlx": mx.__version__,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start_time": self._started_at,
            "rank": self.rank,
            "world_size": self.world_size,
            "config": self.config,
        }
        self._sender.set_meta(meta)

    # -- lifecycle ---------------------------------------------------------------
    def flush(self, timeout: float = 10.0) -> FlushResult:
        """Hand over the last step and wait until everything recorded is acknowledged by the
        server. With no connection it tries to connect at once, and again every 0.25 s until
        `timeout`; meanwhile what is held is fsynced to the spool. Returns a `FlushResult`,
        truthy only when every record arrived (`if watch.flush():`), with `acked`,
        `spooled`, `pending` counts and `unreachable` (an attempt in this call failed)."""
        self._emit_pending(raise_nonfinite=True)
        if self._sender is None or self._forked:
            dropped = sum(self._child_dropped.values())
            return FlushResult(delivered=not dropped, acked=0, spooled=0, pending=0, dropped=dropped)
        result = self._sender.flush(self._buffered, timeout)
        self._last_flush = (self._buffered, result)
        return result

    def close(self, timeout: float | None = None, *, raise_nonfinite: bool = True) -> FlushResult | None:
        """Flush within `timeout` (default `close_timeout`), spool what is left, stop the
        sender thread; prints one line when steps are left in the spool, with the
        `gradwatch push` command that sends them. Never hangs; safe to call twice.
        Returns the final counts (None on a second call)."""
        if self._closed:
            return None
        self._closed = True
        _LIVE.discard(self)
        timeout = self.close_timeout if timeout is None else timeout
        error = None
        try:
            self._emit_pending(raise_nonfinite=True)
        except NonFiniteGradientError as raised:
            error = raised
        result = None
        if self._sender is not None and not self._forked:
            result = self._close_sender(timeout)
        if error is not None and raise_nonfinite:
            raise error
        return result

    def _close_sender(self, timeout: float) -> FlushResult:
        sender = self._sender
        deadline = time.monotonic() + timeout
        last = self._last_flush
        if last is not None and last[0] == self._buffered and last[1].unreachable:
            pass  # a flush just found the server away, and nothing came since: no second wait
        else:
            sender.flush(self._buffered, timeout)
        sender.stop(max(0.5, deadline - time.monotonic()))
        stats = sender.snapshot()
        offline = sender.transport is None
        if stats.spooled:
            where = "no server url was given" if offline else "not acknowledged by the server"
            print(f"gradwatch: {stats.spooled:,} step(s) of run {self.run!r} left in the spool "
                  f"{self.spool_dir} ({where}); send them with: {sender.push_command()}",
                  file=sys.stderr, flush=True)
        complete = not stats.pending and not stats.dropped_total and not stats.rejected
        return FlushResult(delivered=complete and (offline or not stats.spooled), acked=stats.acked,
                           spooled=stats.spooled, pending=stats.pending, dropped=stats.dropped_total,
                           rejected=stats.rejected, unreachable=stats.unreachable)

    def _on_signal(self, ends_process: bool) -> None:
        """SIGTERM/SIGINT: deliver what is held; close when the signal ends the process."""
        if self._closed or self._sender is None or self._forked:
            return
        if ends_process:
            self.close(raise_nonfinite=False)
        else:
            self.flush(self.close_timeout)

    def __enter__(self) -> "GradWatch":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close(raise_nonfinite=exc_type is None)

    @property
    def stats(self) -> Stats:
        """A snapshot of the counts (see `Stats`)."""
        if self._sender is None or self._forked:
            return Stats(recorded=self._recorded, dropped=dict(self._child_dropped))
        return replace(self._sender.snapshot(), recorded=self._recorded)

    def __repr__(self) -> str:
        return f"GradWatch(run={self.run!r}, url={self.url!r}, clipper={self.clipper!r})"

    # -- process events ------------------------------------------------------------
    def _after_fork_in_child(self) -> None:
        """The child of a fork gets no sender: it never sends or spools the parent's records."""
        self._forked = True
        self._recorder.drop_pending()
        self._buffer.clear()
        sender, self._sender = self._sender, None
        if sender is not None:
            if sender.transport is not None:
                sender.transport.abandon()
            if sender.spool is not None:
                sender.spool.forget_after_fork()
        self._child_dropped = {}


def _close_all_at_exit() -> None:
    for watch in list(_LIVE):
        try:
            watch.close(raise_nonfinite=False)
        except Exception:  # at exit, a warning is all we can give
            pass


def _on_signal(signum: int, ends_process: bool) -> None:
    for watch in list(_LIVE):
        try:
            watch._on_signal(ends_process)
        except Exception:  # the signal must still take effect
            pass


def _after_fork_in_child() -> None:
    for watch in list(_LIVE):
        watch._after_fork_in_child()


atexit.register(_close_all_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

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
import math
import os
import re
import socket
import sys
import time
import warnings
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx

from gradwatch.clip import RecommendedClip, RobustDetector, apply_update
from gradwatch.clip.spike_rule import RobustRule

from . import signals
from .buffer import RecordBuffer
from .host import HostStage, host_rule_config
from .recorder import (STATE_NOT_OUTPUT, ClipperDetection, CompiledStepError, NonFiniteGradientError, Recorder,
                       RecordError, StepRecord, compile_error)
from .sender import DEFAULT_BATCH_BYTES, Sender
from .spool import DEFAULT_CAP_BYTES, Spool
from .stats import FlushResult, Stats
from .transport import WebSocketTransport

DEFAULT_SPOOL_ROOT = "gradwatch-spool"
REFUSED_GRACE = 0.5  # close(): seconds of refused connections (nothing listens) before it stops trying
_FROM_ENV: Any = type("FromEnvironment", (), {"__repr__": lambda self: "<GRADWATCH_URL>"})()
_LIVE: "weakref.WeakSet[GradWatch]" = weakref.WeakSet()


def default_spool_dir(run: str) -> Path:
    """`./gradwatch-spool/<run>/`, with the run name made safe as a folder name."""
    return Path(DEFAULT_SPOOL_ROOT) / (re.sub(r"[^A-Za-z0-9._-]+", "_", run).strip(".") or "run")


class GradWatch:
    """Clip (optionally), watch and stream the gradient norm of an MLX training run.

    Args:
        run: run name on the server (one run = one series of steps).
        url: server address, `http://host:port`. Not given: `GRADWATCH_URL` when set,
            else the spool only. None (given): the spool only, whatever the
            environment says (upload it later with `gradwatch push DIR`).
        clipper: a `gradwatch.clip` clipper (`GlobalNorm(1.0)`, ...); None
            monitors without clipping (the gradients are returned unchanged).
        detectors: spike detectors on the pre-clip norm, run in the step's graph (their
            flags are what is recorded). Default: the robust rule (median/MAD of the log
            norm, docs/diagnostics.md) run on the host, one step late, in the sender thread
            (`watch.host_detector`; the graph holds only the norms), or as an in-graph
            `RobustDetector()` when the step must act on it (`skip_spikes=True`, a
            `RecommendedClip` clipper). `[]` for none.
        token: write token of the server (`gradwatch serve --token`); not given:
            `GRADWATCH_TOKEN` when set.
        spool_dir: folder for this run's spool (default `./gradwatch-spool/<run>/`).
            A new `GradWatch` on a folder an earlier process left steps in
            (it crashed, was killed, or the server was away at its end) sends
            those steps too, before its own; `flush()` counts them.
        skip_spikes: skip the whole optimizer step on a spike (as the detectors
            flag it, non-finite norms included); takes effect through
            `watch.update(optimizer, model, grads)`, which keeps parameters and
            optimizer state unchanged on such a step. Recorded as `skipped`.
        tensor_norms: also record every tensor's norm. With `ord=2` (the
            default) they cost no extra math: they are computed on the way to
            the global norm (other norms, and clippers such as AGC, compute
            them separately). They dominate the wire and the spool: one value
            per tensor per step, against about a dozen for the rest of a step.
        config: a JSON-serialisable dict stored with the run's metadata.
        optimizer: the run's optimizer (the object, or its name): its class name is stored
            with the run's metadata, so the server's recommendation knows it (a sign-based
            optimizer such as Lion gets a different threshold: docs/diagnostics.md).
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

    def __init__(self, run: str, url: str | None = _FROM_ENV, clipper: Any = None,
                 detectors: Sequence[Any] | None = None, token: str | None = None,
                 spool_dir: str | os.PathLike | None = None, tensor_norms: bool = True, *,
                 config: dict | None = None, compile: bool = True, all_ranks: bool = False,
                 start_step: int = 0, queue_size: int = 10_000, batch_steps: int = 1000,
                 batch_interval: float = 0.25, spool_cap_bytes: int = DEFAULT_CAP_BYTES,
                 close_timeout: float = 10.0, max_inflight: int = 8, backoff_cap: float = 30.0,
                 max_batch_bytes: int = DEFAULT_BATCH_BYTES, skip_spikes: bool = False,
                 send_timeout: float = 30.0, handle_signals: bool = True, optimizer: Any = None):
        if not isinstance(run, str) or not run:
            raise ValueError(f"run must be a non-empty string, got {run!r}")
        self.clipper = clipper
        self.skip_spikes = bool(skip_spikes)
        # The default robust detector runs on the host, one step late (agent/host.py), unless
        # this step must act on it: skip_spikes, or a RecommendedClip (its own detector is in
        # the graph anyway). Detectors passed explicitly run in the graph; their flags are sent.
        in_graph = detectors is not None or self.skip_spikes or isinstance(clipper, RecommendedClip)
        if detectors is not None:
            self.detectors = list(detectors)
        elif isinstance(clipper, RecommendedClip):
            self.detectors = [ClipperDetection(clipper)]
        else:
            self.detectors = [RobustDetector()] if in_graph else []
        self.host_detector: RobustRule | None = None if in_graph else RobustRule()
        self._last_vector: mx.array | None = None
        group = getattr(clipper, "group", None)
        self.rank = group.rank() if group is not None else 0
        self.world_size = group.size() if group is not None else 1
        if all_ranks and self.world_size > 1:
            run = f"{run}-rank{self.rank}"
        self.run = run
        if url is _FROM_ENV:
            url = os.environ.get("GRADWATCH_URL") or None
        if token is None:
            token = os.environ.get("GRADWATCH_TOKEN") or None
        self.url = url
        self.config = config
        self.optimizer_name = optimizer if isinstance(optimizer, str) or optimizer is None \
            else type(optimizer).__name__
        self.close_timeout = float(close_timeout)
        self.recording = self.rank == 0 or all_ranks
        self.spool_dir = Path(spool_dir) if spool_dir is not None else default_spool_dir(run)
        self._raise_nonfinite = getattr(clipper, "nonfinite", None) == "raise"
        self._recorder = Recorder(clipper, self.detectors, tensor_norms, skip_spikes=self.skip_spikes,
                                  start_step=start_step)
        self._compiled = (mx.compile(self._recorder.build_step, inputs=self._recorder.state,
                                     outputs=self._recorder.state) if compile else self._recorder.build_step)
        self._last_record: mx.array | None = None  # what record() held last
        self._traced = False  # the last compute() ran in a trace with watch.state as input
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
                                  backoff_cap=backoff_cap, max_batch_bytes=max_batch_bytes,
                                  complete=HostStage(self.host_detector).complete)
            self._sender.start()
        self._last_flush: tuple[int, FlushResult] | None = None  # (records handed over, result)
        _LIVE.add(self)
        if handle_signals and self.recording:
            signals.install(_on_signal)

    # -- the training loop -----------------------------------------------------
    def step(self, grads: Any, loss: Any = None, lr: Any = None, params: Any = None) -> Any:
        """Clip `grads` (when a clipper is set) and record this step; returns the gradients
        to give the optimizer. Lazy: nothing is evaluated here.

        Not for use inside `mx.compile` (it raises `CompiledStepError`): there, use
        `compute()` inside and `record()` outside."""
        self._emit_pending(raise_nonfinite=True)
        self._check_not_tracing()
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
        self._hold(vector, extras, self._recorder.next_step(), "step")
        return clipped

    def _check_not_tracing(self) -> None:
        """Inside an `mx.compile` trace that has `watch.state` among its inputs, the step
        counter is a tracer: reading it fails at once (outside, it is a computed scalar and
        reading it costs nothing)."""
        try:
            memoryview(self._recorder.state["step"])
        except RuntimeError as error:
            explained = compile_error(error, "step")
            if explained is None:
                raise
            raise explained from None

    @property
    def state(self) -> dict:
        """The arrays a compiled step that calls `compute()` must take in and give back:
        `mx.compile(step, inputs=[..., watch.state], outputs=[..., watch.state])`. Holds
        the clipper's and detectors' state, the step counter and the last record."""
        return self._recorder.state

    def compute(self, grads: Any, loss: mx.array | None = None, lr: mx.array | None = None,
                params: Any = None) -> tuple[Any, mx.array]:
        """The pure part of `step()`, for use inside your own `mx.compile`d step (with
        `watch.state` among its inputs and outputs): returns `(grads, record)` and keeps
        `record` in `watch.state`; call `watch.record()` after your `mx.eval`.
        Pass `loss`/`lr` here as arrays: they are then part of the record, never a sync."""
        arrays = {name: value for name, value in (("params", params), ("loss", loss), ("lr", lr))
                  if value is not None}
        for name in ("loss", "lr"):
            if name in arrays and not isinstance(arrays[name], mx.array):
                arrays[name] = mx.array(arrays[name], dtype=mx.float32)
        # Traced with watch.state among the inputs? Then the counter is a tracer (outside a
        # compile it is a computed scalar, and reading it costs nothing).
        try:
            memoryview(self._recorder.state["step"])
            self._traced = False
        except RuntimeError as error:
            if "function transformations" not in str(error):
                raise CompiledStepError(STATE_NOT_OUTPUT) from None
            self._traced = True
        return self._recorder.build(grads, arrays, keep=True)

    def record(self, record: mx.array | None = None, loss: Any = None, lr: Any = None, *,
               step: int | None = None) -> None:
        """Record the step that `compute()` built; call it outside the compiled function,
        after your `mx.eval`. `record` defaults to the one kept in `watch.state`. Each
        record carries its step number (`step=` overrides it), so a call skipped or made
        late never renumbers steps; calling twice for one record records it once.
        Python `loss`/`lr` go beside the record; `mx.array`s are read one step late, when
        your eval has computed them (never forced here)."""
        self._emit_pending(raise_nonfinite=True)
        if record is None:
            record = self._recorder.state["record"]
            if record.size == 0:
                raise CompiledStepError(
                    "gradwatch: watch.record() found no record in watch.state: call "
                    "`grads, record = watch.compute(grads, loss, lr)` inside your compiled step, with "
                    "watch.state among its inputs and outputs. See examples/train_compiled.py.")
        if step is None and record is self._last_record:
            return  # recorded already
        if self._traced:
            # compute() ran in a trace: with watch.state among the outputs the counter is now
            # a computed scalar (reading it costs nothing after your eval); without, it is a
            # left-over tracer, and reading it fails at once.
            try:
                memoryview(self._recorder.state["step"])
            except RuntimeError as error:
                explained = compile_error(error, "record")
                if explained is None:
                    raise
                raise explained from None
        self._last_record = record
        extras = {name: value if isinstance(value, mx.array) else float(value)
                  for name, value in (("loss", loss), ("lr", lr)) if value is not None}
        self._hold(record, extras, step, "record")

    def update(self, optimizer: Any, model: Any, grads: Any) -> None:
        """`optimizer.update(model, grads)` for the step just recorded, skipped (parameters
        and optimizer state kept bit for bit, lazily) when that step's `skipped` flag is
        set: a spike with `skip_spikes=True`, a non-finite norm with a clipper's
        `nonfinite="skip"`. Zeroed gradients alone would not skip an AdamW step."""
        index, vector = self._recorder.skip_index, self._last_vector
        skip = vector[index] != 0 if index is not None and vector is not None else None
        apply_update(optimizer, model, grads, skip)

    def _hold(self, vector: mx.array, extras: dict, step: int | None, source: str) -> None:
        self._last_vector = vector
        if self.recording and not self._closed:
            self._recorder.hold(step, vector, extras, source)
            if not self._meta_sent:
                self._send_meta()

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
        if raise_nonfinite and self._raise_nonfinite and not math.isfinite(record.value("pre_norm")):
            raise NonFiniteGradientError(record.step, record.value("pre_norm"), self.run)

    def _send_meta(self) -> None:
        self._meta_sent = True
        layout = self._recorder.last_layout
        meta = {
            "clipper": self.clipper.config() if self.clipper is not None else None,
            "detectors": [detector.config() for detector in self.detectors if hasattr(detector, "config")]
            + ([host_rule_config(self.host_detector)] if self.host_detector is not None else []),
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
        if self.optimizer_name is not None:
            meta["optimizer"] = self.optimizer_name
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
        `gradwatch push` command that sends them. Never hangs; safe to call twice. When
        nothing listens at the server's address (connections refused), it returns about
        `REFUSED_GRACE` s after the spool is synced; a server that accepts and does not
        answer is waited for until `timeout`.
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
        timed_out = False
        if last is not None and last[0] == self._buffered and last[1].unreachable:
            pass  # a flush just found the server away, and nothing came since: no second wait
        else:  # a host that refuses connections (nothing listens) is not waited out
            timed_out = sender.flush(self._buffered, timeout, give_up_refused=REFUSED_GRACE).timed_out
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
                           rejected=stats.rejected, unreachable=stats.unreachable, timed_out=timed_out)

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

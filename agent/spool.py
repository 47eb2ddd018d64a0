"""The spool: batches kept on disk while the server is away.

A spool folder holds append-only segment files (`0000000001.gws`, ...), an
`acked` file (the position up to which the server has acknowledged
everything), `meta.json` (the run and its metadata, for `gradwatch push`) and,
when a batch was refused for good, `rejected.gws`.

Each record is a frame::

    magic | payload length (u32 LE) | step count (u32 LE) | CRC32 (u32 LE) | payload

with the CRC over the step count and the payload. The magic says the payload's
encoding: b"GWS1" JSON text, b"GWS2" msgpack (agent/wire.py), so one folder can
hold both (a spool left by an older agent is replayed as it was written). A process never appends to a
segment it did not create, so a frame torn by a crash (or any corrupt bytes)
can only be followed by other frames of the same dead process: the reader
skips forward to the next frame whose magic and CRC check out, with a
warning, and never crashes on bad bytes.

Writes go straight to the file descriptor (no Python buffer, so a forked
child cannot flush the parent's bytes a second time) and are fsynced at most
every `sync_interval` seconds. A cap on the bytes on disk bounds the spool;
`append` answers False past it and the caller counts the drop.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import threading
import time
import warnings
import zlib
from collections import deque
from pathlib import Path
from typing import Iterator, NamedTuple

import orjson

from .wire import is_binary

log = logging.getLogger("gradwatch.agent")

MAGIC = b"GWS1"         # a JSON payload
MAGIC_BINARY = b"GWS2"  # a msgpack payload
MAGICS = (MAGIC, MAGIC_BINARY)
HEADER = struct.Struct("<4sIII")
MAX_PAYLOAD = 256 * 1024 * 1024
SEGMENT_SUFFIX = ".gws"
DEFAULT_CAP_BYTES = 1 << 30


class Position(NamedTuple):
    """A place in the spool: segment number and byte offset in it."""

    segment: int
    offset: int


class Frame(NamedTuple):
    payload: bytes
    steps: int
    end: Position  # the position just after this frame


class SpoolBusy(RuntimeError):
    """Another process (a live run, or a `gradwatch push`) holds this spool folder."""


def encode_frame(payload: bytes, steps: int) -> bytes:
    count = struct.pack("<I", steps)
    magic = MAGIC_BINARY if is_binary(payload) else MAGIC
    return HEADER.pack(magic, len(payload), steps, zlib.crc32(payload, zlib.crc32(count))) + payload


def read_frames(data: bytes, start: int = 0, origin: str = "spool",
                warn: bool = True) -> Iterator[tuple[int, int, bytes, int]]:
    """Yields (offset, end, payload, steps) for every valid frame in `data` from `start`.

    Bad bytes (a torn tail, a flipped bit) are skipped up to the next valid
    frame, with one warning naming the file and how many bytes were skipped
    (`warn=False`: silently, for counting what a spool holds).
    """
    offset = start
    size = len(data)
    while offset < size:
        frame = _frame_at(data, offset)
        if frame is not None:
            yield frame
            offset = frame[1]
            continue
        resume = offset + 1
        while True:
            resume = _next_magic(data, resume)
            if resume < 0 or _frame_at(data, resume) is not None:
                break
            resume += 1
        skipped_to = size if resume < 0 else resume
        what = "a torn or corrupt tail" if resume < 0 else "corrupt bytes"
        message = (f"gradwatch spool: skipped {what} in {origin} "
                   f"({skipped_to - offset} bytes at offset {offset})")
        if warn:  # once, as a RuntimeWarning (the log has it at debug level: never printed twice)
            log.debug(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        if resume < 0:
            return
        offset = resume


def _next_magic(data: bytes, start: int) -> int:
    """Where the next frame magic (either encoding) starts at or after `start`; -1: none."""
    found = [at for at in (data.find(magic, start) for magic in MAGICS) if at >= 0]
    return min(found) if found else -1


def _frame_at(data: bytes, offset: int):
    if offset + HEADER.size > len(data):
        return None
    magic, length, steps, crc = HEADER.unpack_from(data, offset)
    end = offset + HEADER.size + length
    if magic not in MAGICS or length > MAX_PAYLOAD or end > len(data):
        return None
    payload = data[offset + HEADER.size:end]
    if zlib.crc32(payload, zlib.crc32(struct.pack("<I", steps))) != crc:
        return None
    if (magic == MAGIC_BINARY) != is_binary(payload):
        return None
    return offset, end, payload, steps


class Spool:
    """Append-only, checksummed, capped store of batch payloads in one folder.

    Used by the sender thread only (it appends, reads and acknowledges; the
    training thread never touches the disk); a lock guards it all the same.
    The folder is created and locked (`flock`) on first use, so a run that
    never needs its spool leaves nothing on disk.
    """

    def __init__(self, directory: str | os.PathLike, cap_bytes: int = DEFAULT_CAP_BYTES,
                 segment_bytes: int = 16 << 20, sync_interval: float = 0.5):
        self.directory = Path(directory)
        self.cap_bytes = int(cap_bytes)
        self.segment_bytes = int(segment_bytes)
        self.sync_interval = float(sync_interval)
        self._lock = threading.Lock()
        self._opened = False
        self._lock_fd: int | None = None
        self._segments: dict[int, int] = {}  # segment number -> size in bytes
        self._write_segment = 0
        self._write_fd: int | None = None
        self._acked = Position(0, 0)
        self._dirty = False
        self._last_sync = time.monotonic()
        self.bytes_on_disk = 0
        self.full = False  # the last append met the cap (cleared when acks free space)
        # (end position, steps) of each frame not yet acknowledged, in order: `pending_steps`.
        self._frame_steps: deque[tuple[Position, int]] = deque()
        self.pending_steps = 0

    # -- opening -----------------------------------------------------------
    def exists(self) -> bool:
        """True when the folder holds segments left by an earlier process (or this one)."""
        return self._opened or any(self.directory.glob("*" + SEGMENT_SUFFIX))

    def open(self) -> None:
        with self._lock:
            self._open_locked()

    def _open_locked(self) -> None:
        if self._opened:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EAGAIN, errno.EACCES):
                raise SpoolBusy(f"spool folder {self.directory} is in use by another process") from None
            raise
        self._lock_fd = fd
        self._acked = self._read_acked()
        for path in sorted(self.directory.glob("*" + SEGMENT_SUFFIX)):
            if not path.stem.isdigit():
                continue
            number = int(path.stem)
            if number < self._acked.segment:
                path.unlink(missing_ok=True)
                continue
            self._segments[number] = path.stat().st_size
        if self._segments and self._acked.segment not in self._segments:
            self._acked = Position(min(self._segments), 0)
        self._write_segment = max([*self._segments, self._acked.segment, 0]) + 1
        self.bytes_on_disk = sum(self._segments.values())
        self._count_left_frames()
        self._opened = True

    def _count_left_frames(self) -> None:
        """Count the steps an earlier process left unacknowledged (its frames are replayed)."""
        self._frame_steps.clear()
        self.pending_steps = 0
        for number in sorted(self._segments):
            offset = self._acked.offset if number == self._acked.segment else 0
            try:
                data = self._segment_path(number).read_bytes()
            except OSError:
                continue
            for _, end, _, steps in read_frames(data, offset, warn=False):
                self._note_frame(Position(number, end), steps)

    def _note_frame(self, end: Position, steps: int) -> None:
        self._frame_steps.append((end, steps))
        self.pending_steps += steps

    def _read_acked(self) -> Position:
        try:
            segment, offset = (self.directory / "acked").read_text().split()
            return Position(int(segment), int(offset))
        except (OSError, ValueError):
            return Position(0, 0)

    def _segment_path(self, number: int) -> Path:
        return self.directory / f"{number:010d}{SEGMENT_SUFFIX}"

    # -- writing -----------------------------------------------------------
    def append(self, payload: bytes, steps: int) -> bool:
        """Append one payload. True: written; False: over the cap (caller counts a drop)."""
        with self._lock:
            self._open_locked()
            frame = encode_frame(payload, steps)
            if self.bytes_on_disk + len(frame) > self.cap_bytes:
                self.full = True
                return False
            size = self._segments.get(self._write_segment)
            if self._write_fd is None or size is None or size + len(frame) > self.segment_bytes and size > 0:
                self._rotate()
            os.write(self._write_fd, frame)
            self._segments[self._write_segment] += len(frame)
            self.bytes_on_disk += len(frame)
            self._note_frame(Position(self._write_segment, self._segments[self._write_segment]), steps)
            self._dirty = True
            return True

    def _rotate(self) -> None:
        if self._write_fd is not None:
            os.fsync(self._write_fd)
            os.close(self._write_fd)
            self._write_segment += 1
        path = self._segment_path(self._write_segment)
        self._write_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._segments[self._write_segment] = os.fstat(self._write_fd).st_size

    def sync(self) -> None:
        with self._lock:
            self._sync_locked()

    def sync_if_due(self) -> None:
        if self._dirty and time.monotonic() - self._last_sync >= self.sync_interval:
            self.sync()

    def _sync_locked(self) -> None:
        if self._write_fd is not None and self._dirty:
            os.fsync(self._write_fd)
        self._dirty = False
        self._last_sync = time.monotonic()

    # -- reading and acknowledging ----------------------------------------
    @property
    def acked(self) -> Position:
        return self._acked

    def end(self) -> Position:
        """The position after the last frame written (what `pending` compares with)."""
        if not self._segments:
            return self._acked
        last = max(self._segments)
        return Position(last, self._segments[last])

    def pending(self) -> bool:
        """True when some frame has not been acknowledged yet."""
        if not self._opened:
            return False
        with self._lock:
            return self._pending_locked()

    def _pending_locked(self) -> bool:
        return any(size > (self._acked.offset if number == self._acked.segment else 0)
                   for number, size in self._segments.items() if number >= self._acked.segment)

    def read(self, start: Position, max_frames: int = 64) -> list[Frame]:
        """Up to `max_frames` valid frames at or after `start`, in order."""
        frames: list[Frame] = []
        with self._lock:
            if not self._opened:
                return frames
            numbers = sorted(number for number in self._segments if number >= start.segment)
            sizes = dict(self._segments)
        for number in numbers:
            offset = start.offset if number == start.segment else 0
            if offset >= sizes[number]:
                continue
            try:
                with open(self._segment_path(number), "rb") as handle:
                    data = handle.read(sizes[number])
            except FileNotFoundError:
                continue
            for _, end, payload, steps in read_frames(data, offset, origin=str(self._segment_path(number))):
                frames.append(Frame(payload, steps, Position(number, end)))
                if len(frames) >= max_frames:
                    return frames
            # Everything up to the segment's end has been read (bad bytes skipped).
            if frames and frames[-1].end.segment == number:
                frames[-1] = frames[-1]._replace(end=Position(number, sizes[number]))
            elif not frames:
                frames.append(Frame(b"", 0, Position(number, sizes[number])))  # a segment of bad bytes only
                return frames
        return frames

    def ack(self, position: Position) -> None:
        """Everything before `position` is stored by the server: remember it, delete
        segments wholly acknowledged, and start afresh when nothing is pending."""
        with self._lock:
            if position <= self._acked:
                return
            self._acked = position
            frames = self._frame_steps
            while frames and frames[0][0] <= position:
                self.pending_steps -= frames.popleft()[1]
            for number in [n for n in self._segments if n < position.segment]:
                self._drop_segment(number)
            if not self._pending_locked() and self._segments:
                # Fully drained: remove the write segment too; the next append starts a new one.
                for number in list(self._segments):
                    self._drop_segment(number)
                self._acked = Position(self._write_segment + 1, 0)
                self._write_segment += 1
                self._frame_steps.clear()
                self.pending_steps = 0
            self._write_acked()

    def _drop_segment(self, number: int) -> None:
        if number == self._write_segment and self._write_fd is not None:
            os.close(self._write_fd)
            self._write_fd = None
        self.bytes_on_disk -= self._segments.pop(number)
        self.full = False
        self._segment_path(number).unlink(missing_ok=True)

    def _write_acked(self) -> None:
        path = self.directory / "acked"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"{self._acked.segment} {self._acked.offset}\n")
        os.replace(tmp, path)

    # -- side files --------------------------------------------------------
    def write_json(self, name: str, value) -> None:
        with self._lock:
            self._open_locked()
            path = self.directory / name
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS))
            os.replace(tmp, path)

    def read_json(self, name: str, default=None):
        try:
            return orjson.loads((self.directory / name).read_bytes())
        except (OSError, ValueError):
            return default

    def reject(self, payload: bytes, steps: int) -> None:
        """Keep a payload the server refused for good in `rejected.gws`, out of the replay path."""
        with self._lock:
            self._open_locked()
            fd = os.open(self.directory / "rejected.gws", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, encode_frame(payload, steps))
                os.fsync(fd)
            finally:
                os.close(fd)

    # -- lifecycle -----------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self._write_fd is not None:
                self._sync_locked()
                os.close(self._write_fd)
                self._write_fd = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            self._opened = False
            self._segments.clear()  # `pending_steps` stays: what the closed spool holds

    def forget_after_fork(self) -> None:
        """In a forked child: drop this process's copies of the descriptors without
        writing, syncing or unlocking anything the parent still uses."""
        for fd in (self._write_fd, self._lock_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._write_fd = self._lock_fd = None
        self._opened = False
        self._segments.clear()
        self._lock = threading.Lock()

"""File-to-file byte copies done by the kernel (`copy_file_range`, else `sendfile`, else pread/write).

The converters move tensor bytes between checkpoint files without changing them (renaming,
re-chunking, interleaving rows, trimming vocab padding): every output tensor is a list of byte
`Segment`s of input files (plus zero runs for vocab padding). Copying those inside the kernel
skips what a user-space copy pays per byte: page faults on fresh buffers, one memory pass in and
one out. The process's resident memory does not grow with the data at all.

`SpliceStream` is the output stream handed to torch.distributed.checkpoint's FileSystemWriter:
`torch.save` writes a tensor's bytes with one `write(memoryview of its storage)`; when that
storage is the registered placeholder (an untouched, never resident allocation), the stream
writes the registered segments instead. The placeholder is consumed exactly once per item and
the producer checks that it was (`expect` / `check_consumed`), so a torch that wrote the bytes
another way fails loudly instead of writing a placeholder's zeros.
"""
from __future__ import annotations

import errno
import io
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import numpy as np
from torch.distributed.checkpoint.filesystem import FileSystem

# small writes (zip headers, pickles) are gathered into one syscall
_SMALL_WRITE_BYTES = 1 << 20
# one kernel copy call: large enough that per-call costs vanish, small enough for progress
COPY_CALL_BYTES = 256 << 20
_ZEROS = bytes(1 << 20)
_KERNEL_COPY_ERRNOS = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF}


@dataclass(frozen=True)
class Segment:
    """`nbytes` bytes of file `path` from `offset`; path None: `nbytes` zero bytes."""

    path: Optional[str]
    offset: int
    nbytes: int


def merge_segments(segments: list[Segment]) -> list[Segment]:
    """Adjacent runs of the same file (or of zeros) joined into one."""
    out: list[Segment] = []
    for seg in segments:
        if seg.nbytes == 0:
            continue
        last = out[-1] if out else None
        if last is not None and last.path == seg.path and (seg.path is None or last.offset + last.nbytes == seg.offset):
            out[-1] = Segment(seg.path, last.offset, last.nbytes + seg.nbytes)
        else:
            out.append(seg)
    return out


class SegmentCopier:
    """Copies segments to the current position of an output fd; keeps the input files open."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._mode = "copy_file_range"  # degrades to sendfile, then pread/write, on the first refusal
        self._bounce: Optional[bytearray] = None

    def _fd(self, path: str) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def copy(self, out_fd: int, segments: list[Segment]) -> int:
        """Appends the segments' bytes at out_fd's position (which advances); returns the bytes."""
        total = 0
        for seg in segments:
            if seg.path is None:
                _write_zeros(out_fd, seg.nbytes)
            else:
                self._copy_file(out_fd, seg)
            total += seg.nbytes
        return total

    def _copy_file(self, out_fd: int, seg: Segment) -> None:
        in_fd, done = self._fd(seg.path), 0
        while done < seg.nbytes:
            count = min(COPY_CALL_BYTES, seg.nbytes - done)
            got = self._copy_once(in_fd, out_fd, seg.offset + done, count)
            if got <= 0:
                raise OSError(errno.EIO, f"{seg.path}: ends before byte {seg.offset + seg.nbytes}")
            done += got

    def _copy_once(self, in_fd: int, out_fd: int, offset: int, count: int) -> int:
        if self._mode == "copy_file_range":
            try:
                return os.copy_file_range(in_fd, out_fd, count, offset)
            except OSError as exc:  # e.g. EXDEV: input and output on different filesystems
                if exc.errno not in _KERNEL_COPY_ERRNOS:
                    raise
                self._mode = "sendfile"
        if self._mode == "sendfile":
            try:
                return os.sendfile(out_fd, in_fd, offset, count)
            except OSError as exc:
                if exc.errno not in _KERNEL_COPY_ERRNOS:
                    raise
                self._mode = "pread"
        if self._bounce is None:
            self._bounce = bytearray(16 << 20)
        view = memoryview(self._bounce)[: min(count, len(self._bounce))]
        got = os.preadv(in_fd, [view], offset)
        write_all(out_fd, view[:got])
        return got

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        view = view[os.write(fd, view):]


def _write_zeros(fd: int, nbytes: int) -> None:
    while nbytes > 0:
        step = min(nbytes, len(_ZEROS))
        write_all(fd, memoryview(_ZEROS)[:step])
        nbytes -= step


def buffer_address(data) -> int:
    """Address of a (possibly read-only) buffer's first byte."""
    return np.frombuffer(data, dtype=np.uint8).__array_interface__["data"][0]


class SpliceTarget:
    """What the next write of the placeholder's bytes stands for (shared by the producer and the stream)."""

    def __init__(self, copier: SegmentCopier):
        self.copier = copier
        self.address = 0
        self.segments: Optional[list[Segment]] = None
        self.nbytes = 0
        self.label = ""
        self.error: Optional[BaseException] = None  # the copy's own error (DCP wraps what a write raises)

    def expect(self, address: int, segments: list[Segment], label: str) -> None:
        self.check_consumed()
        self.address, self.segments, self.label = address, segments, label
        self.nbytes = sum(s.nbytes for s in segments)

    def check_consumed(self) -> None:
        if self.segments is not None:
            raise RuntimeError(f"{self.label}: torch.save did not write the chunk's bytes from its storage "
                               "(the kernel-copy path cannot serve this torch version)")

    def take(self, data: memoryview) -> Optional[list[Segment]]:
        if self.segments is None or len(data) != self.nbytes or not len(data) or buffer_address(data) != self.address:
            return None
        segments, self.segments = self.segments, None
        return segments


class SpliceStream(io.RawIOBase):
    """A write-only file stream that serves `SpliceTarget` writes with kernel copies."""

    def __init__(self, path: str, target: SpliceTarget):
        super().__init__()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._target = target
        self._pending = bytearray()
        self._pos = 0

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def tell(self) -> int:
        return self._pos

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        nbytes = len(view)
        segments = self._target.take(view)
        if segments is not None:
            self.flush()
            try:
                self._target.copier.copy(self._fd, segments)
            except BaseException as exc:
                self._target.error = self._target.error or exc
                raise
        elif nbytes < _SMALL_WRITE_BYTES:
            self._pending += view
        else:
            self.flush()
            write_all(self._fd, view)
        self._pos += nbytes
        return nbytes

    def flush(self) -> None:
        if self._pending:
            write_all(self._fd, self._pending)
            self._pending.clear()

    def close(self) -> None:
        if not self.closed:
            try:
                self.flush()
            finally:
                os.close(self._fd)
        super().close()


# --- row maps: which file bytes hold which rows (dim 0) of a tensor ---------------------------

RowMap = list[tuple[int, int, str, int]]  # (first row, row count, file, file offset of that first row), sorted


def slice_rows(row_map: RowMap, lo: int, hi: int, row_bytes: int) -> list[Segment]:
    """Segments holding rows [lo, hi) of the tensor `row_map` describes; rows it does not name are zeros."""
    segments, row = [], lo
    for start, count, path, offset in row_map:
        first, last = max(start, row), min(start + count, hi)
        if first >= last:
            continue
        if first > row:
            segments.append(Segment(None, 0, (first - row) * row_bytes))
        segments.append(Segment(path, offset + (first - start) * row_bytes, (last - first) * row_bytes))
        row = last
    if hi > row:
        segments.append(Segment(None, 0, (hi - row) * row_bytes))
    return merge_segments(segments)


class SpliceFileSystem(FileSystem):
    """torch.distributed.checkpoint's local file system whose write streams are `SpliceStream`s."""

    def __init__(self, target: SpliceTarget):
        super().__init__()
        self._target = target

    @contextmanager
    def create_stream(self, path, mode: str):
        if mode != "wb":
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        stream = SpliceStream(str(path), self._target)
        try:
            yield stream
        finally:
            stream.close()

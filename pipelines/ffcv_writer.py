"""The `.beton` writer's processes for pipelines/ffcv.py's `write_beton`, watched.

FFCV's DatasetWriter polls a count of records written and then waits on a
queue for each worker's allocations; a worker that raised or was killed
does neither, so FFCV's parent waited for ever. `Writer` keeps FFCV's file
layout and per-record encode and watches its workers instead. `Records` is
the source as the workers read it, each file made into a record that
turbojpeg or a copy gives back as the reference decodes it.
"""
from __future__ import annotations

import ctypes
import io
import multiprocessing
import os
import signal
import sys
import time
from typing import Optional

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES
from ffcv.memory_allocator import MemoryAllocator
from ffcv.types import ALLOC_TABLE_TYPE
from ffcv.writer import MAX_PAGE_SIZE, MIN_PAGE_SIZE, DatasetWriter, handle_sample
from PIL import Image
from tqdm import tqdm

from .data import DataError, Source
from .index import EXIF_ORIENTATION
from .render import decode

CHUNK = 64  # records a writer worker takes at a time
_STOP_S = 5.0  # how long a writer worker told to stop may take before it is killed
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
RAW, JPG = IMAGE_MODES["raw"], IMAGE_MODES["jpg"]


class WorkerFailed(Exception):
    """A writer worker failed: (source position it was writing or -1, why)."""


def _end_with_parent(parent: int) -> None:
    """In a writer worker: SIGTERM ends it, Ctrl-C is its parent's to handle,
    and (Linux) it is killed when its parent dies (SIGKILL, the OOM killer),
    rather than writing the rest of the source into a file no one keeps."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != parent:  # it died before prctl
        os._exit(1)


def _fail(report, slot: int, position: int, error: BaseException) -> None:
    """Send why this writer worker fails, then end its process at once."""
    try:
        report.send(("failed", slot, position, f"{type(error).__name__}: {error}".replace("\n", " ")[:500]))
    finally:
        os._exit(1)


def _write_worker(slot, parent, records, fields, metadata_sm, metadata_type, allocator, ticket, done, current,
                  table, report):
    """One writer process: takes chunks of records by ticket until none is
    left and writes each with FFCV's `handle_sample` (the fields' encode into
    pages booked from the shared allocator); then puts its allocations into
    the shared table (one per record: the image's bytes) and says "done".
    An exception is sent with the position being written before the
    allocator's exit, which would wait for the other workers' pages."""
    _end_with_parent(parent)
    metadata = np.frombuffer(metadata_sm.buf, dtype=metadata_type)
    try:
        with allocator:  # its exit writes this worker's last page
            try:
                written = 0
                while True:
                    with ticket.get_lock():  # one lock for both: the parent reads `done` without one
                        done.value += written
                        start = ticket.value
                        ticket.value = start + CHUNK
                    stop = min(start + CHUNK, len(records))
                    if start >= stop:
                        break
                    for i in range(start, stop):
                        current[slot] = i
                        handle_sample(records[i], i, metadata_type.names, metadata, allocator, fields)
                    current[slot], written = -1, stop - start
            except BaseException as e:
                _fail(report, slot, int(current[slot]), e)
        rows = np.frombuffer(table, ALLOC_TABLE_TYPE)
        for allocation in allocator.allocations:
            if rows[allocation[0]]["size"]:
                raise RuntimeError(f"record {allocation[0]} holds more than one allocation")
            rows[allocation[0]] = allocation
        report.send(("done", slot))
    except BaseException as e:  # writing the last page (a full disk)
        _fail(report, slot, -1, e)


def _how_it_ended(exitcode: int) -> str:
    if exitcode < 0:
        return f"its writer process was killed by {signal.Signals(-exitcode).name}"
    return f"its writer process ended with exit code {exitcode} and no word"


def _stop_workers(workers: list, running) -> None:
    """Every started worker ended and joined: those in `running` get SIGTERM
    at once; any still alive after _STOP_S gets SIGKILL."""
    started = [w for w in workers if w.pid is not None]
    for k in running:
        if workers[k].pid is not None and workers[k].exitcode is None:
            workers[k].terminate()
    deadline = time.monotonic() + _STOP_S
    for w in started:
        w.join(max(0.0, deadline - time.monotonic()))
        if w.exitcode is None:
            w.kill()
            w.join()
        w.close()


class Writer(DatasetWriter):
    """FFCV's DatasetWriter (file layout, pages, allocator, per-record
    encode) with its workers watched. FFCV's own parent polls a count of
    records written until it reaches the total, then waits on a queue for
    each worker's allocations; a worker that raised or was killed does
    neither, so the parent waited for ever. Here a worker that reports a
    failure, or ends without saying "done", ends the write at once
    (`WorkerFailed` with the position it was writing), and every worker has
    ended, been stopped or killed when `write` returns. Nothing the parent
    waits on can be held by a dead worker: it reads the shared counters
    without their locks, and the workers' messages are each one pipe write
    shorter than PIPE_BUF, so one arrives whole or not at all."""

    def write(self, records) -> None:
        n = self.num_samples = len(records)
        ticket, done = multiprocessing.Value(ctypes.c_int64, 0), multiprocessing.RawValue(ctypes.c_int64, 0)
        current = multiprocessing.RawArray(ctypes.c_int64, [-1] * self.num_workers)
        table = multiprocessing.RawArray(ctypes.c_uint8, n * ALLOC_TABLE_TYPE.itemsize)
        messages, report = multiprocessing.Pipe(duplex=False)
        self.prepare()  # the header, the field descriptors, the metadata in shared memory
        allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
        workers = [multiprocessing.Process(target=_write_worker, args=(
            k, os.getpid(), records, self.fields, self.metadata_sm, self.metadata_type, allocator, ticket, done,
            current, table, report)) for k in range(self.num_workers)]
        running, finished = set(range(len(workers))), False
        progress = tqdm(total=n, file=sys.stderr)
        try:
            for w in workers:
                w.start()
            while running:
                if messages.poll(0.1):
                    kind, slot, *rest = messages.recv()
                    if kind == "failed":
                        raise WorkerFailed(*rest)
                    running.discard(slot)
                    continue
                if done.value > progress.n:
                    progress.update(done.value - progress.n)
                for k in running:  # sent before it ended, a message is in the pipe by now
                    if workers[k].exitcode is not None and not messages.poll(0):
                        raise WorkerFailed(int(current[k]), _how_it_ended(workers[k].exitcode))
            progress.update(n - progress.n)
            self.finalize(np.frombuffer(table, ALLOC_TABLE_TYPE).tolist())
            finished = True
        finally:
            progress.leave = finished  # a failed write shows its one error line, not a stopped bar
            progress.close()
            _stop_workers(workers, running)
            messages.close()
            report.close()
            self.metadata_sm.close()
            self.metadata_sm.unlink()


# ---------------------------------------------------------------- the records
def stored_size(widths, heights, max_side: Optional[int]):
    """Sizes as written: the index's, or shrunk to `max_side` on the longer side."""
    w, h = np.asarray(widths, np.int64), np.asarray(heights, np.int64)
    if not max_side:
        return w, h
    longer = np.maximum(w, h)
    shrink = longer > max_side
    ratio = np.where(shrink, max_side / longer, 1.0)
    return (np.where(shrink, np.maximum(1, np.rint(w * ratio)), w).astype(np.int64),
            np.where(shrink, np.maximum(1, np.rint(h * ratio)), h).astype(np.int64))


# FFCV keeps each record inside one page and refuses, in a worker, a record
# larger than a page. DatasetWriter wants a power of two from 2 MiB to below
# 4 GiB (the header stores it in 32 bits) and defaults to 8 MiB; the reader
# finds a record's page by shifting its pointer by log2(page) and, with
# os_cache=False only, holds whole pages in memory, so any such page reads back.
_DEFAULT_PAGE = 4 * MIN_PAGE_SIZE
_PLACEHOLDER = (RAW, 1, 1, np.zeros(3, np.uint8))


def page_size(largest: int, what: str) -> int:
    """The smallest power of two that holds a record of `largest` bytes, and
    never less than FFCV's default page."""
    page = max(_DEFAULT_PAGE, 1 << max(0, int(largest) - 1).bit_length())
    if page >= MAX_PAGE_SIZE:
        raise DataError(f"{what}: {int(largest):,} bytes do not fit a page of a .beton (FFCV's pages are under "
                        "4 GiB); leave it out or shrink it with --max-side")
    return page


def _record(data: np.ndarray, width: int, height: int, quality: int, max_side: Optional[int], raw_max_pixels: int):
    """(mode, width, height, bytes) of one encoded file (`Source.read`); raises when it cannot be decoded."""
    with Image.open(io.BytesIO(data.tobytes())) as probe:
        fmt, mode = probe.format, probe.mode
        turned = probe.getexif().get(EXIF_ORIENTATION, 1) != 1
    (w,), (h,) = stored_size([width], [height], max_side)
    if fmt in ("JPEG", "MPO") and mode in ("RGB", "L") and not turned and (w, h) == (width, height):
        return JPG, width, height, data  # turbojpeg decodes these bytes exactly as PIL does
    img = decode(data)
    if img.size != (width, height):
        raise ValueError(f"decodes to {img.size}, the index says {(width, height)}")
    if (w, h) != (width, height):
        img = img.resize((int(w), int(h)), Image.Resampling.BILINEAR, reducing_gap=3.0)
    if fmt not in ("JPEG", "MPO") and w * h <= raw_max_pixels:
        return RAW, int(w), int(h), np.ascontiguousarray(np.asarray(img, np.uint8)).reshape(-1)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return JPG, int(w), int(h), np.frombuffer(buf.getvalue(), np.uint8)


class Records:
    """The source as the writer's workers read it: ((mode, width, height,
    bytes), source position). A file that fails to decode becomes a 1-pixel
    placeholder at position -1, which the loader leaves out. So does a
    record larger than `page_size` (only a re-encoded image can be: the page
    holds the largest file), and `oversized` keeps the largest such size and
    its position (shared by the workers), for the write to be done again
    with a page that holds it: FFCV's encode never gets a record it refuses."""

    def __init__(self, source: Source, quality: int, max_side: Optional[int], raw_max_pixels: int, page_size: int):
        self.source, self.quality, self.max_side, self.raw_max_pixels = source, quality, max_side, raw_max_pixels
        self.page_size = page_size
        self.oversized = multiprocessing.Array(ctypes.c_int64, [0, -1])  # bytes, position

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        s = self.source
        try:
            record = _record(s.read(i), int(s.widths[i]), int(s.heights[i]), self.quality, self.max_side,
                             self.raw_max_pixels)
        except Exception:  # PIL raises many kinds
            return _PLACEHOLDER, -1
        size = record[3].nbytes
        if size > self.page_size:
            with self.oversized.get_lock():
                if size > self.oversized[0]:
                    self.oversized[0], self.oversized[1] = size, i
            return _PLACEHOLDER, -1
        return record, i

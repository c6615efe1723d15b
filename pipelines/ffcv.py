"""FFCV pipeline: the plan rendered inside FFCV's compiled pipeline, one decode per image.

Writing a `.beton` (once per source; `--pipeline ffcv` does it by itself
into the cache, keyed and validated like the index):

    python -m pipelines.ffcv write --data SOURCE --out FILE.beton [--jpeg-quality 90] [--max-side N]

SOURCE is anything train.py's `--data` takes (an ImageFolder, a .txt file
list, `fashion-mnist`, nothing or `sample` for the built-in sample). The
index has already left out the files that cannot be read (empty, truncated,
garbage); the writer decodes the rest as the reference does
(pipelines/render.py `decode`: EXIF orientation, 16-bit, CMYK, grey,
palette, alpha) and stores each one so that turbojpeg or a copy gives those
pixels back: a plain RGB or grey JPEG keeps its own bytes (bit-exact with
PIL), an image that is not a JPEG is stored raw when it has at most
`raw_max_pixels` pixels (lossless) and as a JPEG of `--jpeg-quality`
otherwise, and everything converted or shrunk by `--max-side` is
re-encoded. A file that still fails is skipped with a count. Each record
keeps its position in the source, so the loader maps samples back.

Per step (batch B), in FFCV's compiled stage (Numba, `prange` over the
batch on `workers` threads):

    record ─► _Decode: turbojpeg once per image (accurate DCT, like PIL), or a copy of raw pixels
      ├─► _Render(family 1): per view, the plan's window resampled as PIL's
      │     antialiased bilinear resize does (bit for bit), flipped, then
      │     pipelines/colour.py's `render` (jitter, grayscale, blur,
      │     solarize, normalisation) into float32
      ├─► _Render(family 2) ...             (FFCV branches: PipelineSpec(source=<the decoder>))
      └─► _Render(mosaic tiles) ─► _Paste: the canvases by the plan's paste table

The order of every epoch is the plan's, through a traversal order that
hands FFCV the rank's shard from the loader's position (mid-epoch resume
starts there), each step's batch being the plan's `index`: with CLIM's
neighbours, the B anchors then the B images the table names, decoded once
each and rendered like any other row. The step's parameters (windows, flips, colour vectors, paste
tables) reach the compiled operations as data: each operation declares a
parameter buffer beside its output, and the epoch iterator writes step s's
plan into the buffers of the batch slot it is about to render, so nothing
is frozen into the compiled code (Numba would freeze global arrays).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import hashlib
import io
import json
import math
import multiprocessing
import os
import pathlib
import queue
import signal
import sys
import tempfile
import threading
import time
from dataclasses import replace
from typing import Iterator, Optional

import numba
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

# FFCV's Compiler.set_num_threads(n) sets torch's thread count too, which is
# process-wide: FFCV calls it on import (n = 1), when a loader is built and
# from its epoch thread. The model would run on FFCV's thread count, so every
# call here gives torch its own count back.
_TORCH_THREADS, _NUMBA_THREADS = torch.get_num_threads(), numba.get_num_threads()
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.rgb_image import IMAGE_MODES
from ffcv.loader import Loader
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.memory_allocator import MemoryAllocator
from ffcv.pipeline import PipelineSpec
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.reader import Reader
from ffcv.traversal_order.base import TraversalOrder
from ffcv.types import ALLOC_TABLE_TYPE
from ffcv.writer import MAX_PAGE_SIZE, MIN_PAGE_SIZE, DatasetWriter, handle_sample

torch.set_num_threads(_TORCH_THREADS)
numba.set_num_threads(_NUMBA_THREADS)  # thread-local in Numba: this (importing) thread's

from . import colour
from .base import PipelineError, PlannedLoader
from .data import DataError, Source, cache_root
from .index import EXIF_ORIENTATION
from .plan import BatchPlan, CropPlan
from .render import decode, place_family, view_families
from .views import Views


@contextlib.contextmanager
def _torch_threads_kept():
    """Torch's thread count as it was, whatever FFCV set inside."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


BETON_VERSION = 1
DEFAULT_QUALITY = 90
RAW_MAX_PIXELS = 512 * 512
_RAW, _JPG = IMAGE_MODES["raw"], IMAGE_MODES["jpg"]

# ---------------------------------------------------------------- turbojpeg
# FFCV's own imdecode asks turbojpeg for the fast integer DCT; the accurate
# one is what PIL uses, so calling turbojpeg directly keeps FFCV's pixels
# identical to the reference's. A handle per call costs microseconds and is
# safe on every thread of the parallel loop.
_TJ = ctypes.CDLL(ctypes.util.find_library("turbojpeg") or "libturbojpeg.so.0")
_tj_init = _TJ.tjInitDecompress
_tj_init.restype, _tj_init.argtypes = ctypes.c_void_p, []
_tj_decompress = _TJ.tjDecompress2
_tj_decompress.restype = ctypes.c_int
_tj_decompress.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_int,
                           ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
_tj_destroy = _TJ.tjDestroy
_tj_destroy.restype, _tj_destroy.argtypes = ctypes.c_int, [ctypes.c_void_p]
_TJPF_RGB = 0


@numba.njit(nogil=True)  # not cached: Numba cannot cache calls through ctypes
def _jpeg_decode(data, size, out, height, width):
    """`size` JPEG bytes at address `data` -> RGB rows of `width` at address
    `out`; 0 on success. Addresses, not arrays: Numba's dispatcher loses
    track of overloads taking read-only arrays (FFCV's memory maps) when
    several compiled pipelines call it."""
    handle = _tj_init()
    status = _tj_decompress(handle, data, size, out, width, 0, height, _TJPF_RGB, 0)
    _tj_destroy(handle)
    return status


# ---------------------------------------------------------------- PIL's resize
# Pillow's ImagingResample (Resample.c) with the bilinear filter, as
# torchvision's resized_crop calls it on a PIL image (crop, then resize):
# float64 coefficients normalised per output pixel, converted to fixed point
# of 22 bits, horizontal pass into uint8 rows, then the vertical pass.
# Pillow 13 runs the vertical pass first for some shapes (its rule is not
# reproduced): there single pixels differ by one level.
_PRECISION_BITS = 32 - 8 - 2


@numba.njit(nogil=True, cache=True)
def _coefficients(in_size, out_size):
    """(bounds int64 [out, 2] first tap and tap count, weights int64 [out, ksize])."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # the bilinear filter's support is 1
    ksize = int(math.ceil(support)) * 2 + 1
    bounds = np.zeros((out_size, 2), np.int64)
    fixed = np.zeros((out_size, ksize), np.int64)
    k = np.zeros(ksize, np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        ss = 1.0 / filterscale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        ww = 0.0
        for x in range(xmax):
            t = abs((x + xmin - center + 0.5) * ss)
            w = 1.0 - t if t < 1.0 else 0.0
            k[x] = w
            ww += w
        for x in range(xmax):
            if ww != 0.0:
                k[x] /= ww
            v = k[x] * (1 << _PRECISION_BITS)
            fixed[xx, x] = int(-0.5 + v) if v < 0 else int(0.5 + v)
        bounds[xx, 0], bounds[xx, 1] = xmin, xmax
    return bounds, fixed


@numba.njit(nogil=True, cache=True, inline="always")
def _clip8(ss):
    if ss >= (1 << _PRECISION_BITS << 8):
        return np.uint8(255)
    if ss <= 0:
        return np.uint8(0)
    return np.uint8(ss >> _PRECISION_BITS)


@numba.njit(nogil=True, cache=True)
def resized_crop(image, top, left, height, width, out, flip):
    """out (S, S, 3) uint8 = PIL's image.crop(window).resize((S, S), BILINEAR),
    mirrored when `flip`; image (H, W, 3) uint8."""
    size_y, size_x = out.shape[0], out.shape[1]
    hb, hk = _coefficients(width, size_x)
    vb, vk = _coefficients(height, size_y)
    first = vb[0, 0]
    last = vb[size_y - 1, 0] + vb[size_y - 1, 1]
    rows = np.empty((last - first, size_x, 3), np.uint8)
    half = 1 << (_PRECISION_BITS - 1)
    for y in range(last - first):
        src = image[top + first + y]
        for xx in range(size_x):
            x0, n = hb[xx, 0], hb[xx, 1]
            s0 = s1 = s2 = half
            for x in range(n):
                p = src[left + x0 + x]
                w = hk[xx, x]
                s0 += np.int64(p[0]) * w
                s1 += np.int64(p[1]) * w
                s2 += np.int64(p[2]) * w
            dst = rows[y, size_x - 1 - xx] if flip else rows[y, xx]
            dst[0], dst[1], dst[2] = _clip8(s0), _clip8(s1), _clip8(s2)
    for yy in range(size_y):
        y0, n = vb[yy, 0] - first, vb[yy, 1]
        for xx in range(size_x):
            s0 = s1 = s2 = half
            for y in range(n):
                p = rows[y0 + y, xx]
                w = vk[yy, y]
                s0 += np.int64(p[0]) * w
                s1 += np.int64(p[1]) * w
                s2 += np.int64(p[2]) * w
            out[yy, xx, 0], out[yy, xx, 1], out[yy, xx, 2] = _clip8(s0), _clip8(s1), _clip8(s2)


# ---------------------------------------------------------------- per-view parameters
# One float32 row per view: the window in decoded pixels, the decoded image's
# size, the flip, then pipelines/colour.py's vector (colour.view_params).
G_TOP, G_LEFT, G_H, G_W, G_IMG_H, G_IMG_W, G_FLIP = range(7)
G_LEN = 7
P_ROW = G_LEN + colour.P_LEN
# Per tile of a canvas: source image (batch index), its crop, then the paste (sy, sx, h, w, dy, dx).
T_LEN = 8


# Compiled once, for read-only arguments (writable ones convert): typing a
# call from each new FFCV stage would otherwise compile further overloads,
# and Numba's dispatcher raised KeyError doing that from FFCV's thread.
_U8_IN = numba.types.Array(numba.uint8, 1, "C", readonly=True)
_ROW = numba.types.Array(numba.float32, 1, "C", readonly=True)


@numba.njit(numba.void(_U8_IN, _ROW, numba.uint8[:, :, ::1]), nogil=True, cache=True)
def resample_view(decoded, p, tile):
    """tile (S, S, 3) uint8 = the window of row p cut from one decoded image
    (flat uint8), resampled and flipped as the reference does."""
    h, w = int(p[G_IMG_H]), int(p[G_IMG_W])
    image = decoded[:h * w * 3].reshape((h, w, 3))
    resized_crop(image, int(p[G_TOP]), int(p[G_LEFT]), int(p[G_H]), int(p[G_W]), tile, p[G_FLIP] > 0.5)


# ---------------------------------------------------------------- FFCV operations
class _Decode(Operation):
    """Each record decoded once into a flat uint8 buffer as large as the largest image."""

    def declare_state_and_memory(self, previous_state):
        pixels = self.metadata["width"].astype(np.int64) * self.metadata["height"].astype(np.int64)
        shape = (int(pixels.max()) * 3,)
        return replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("u1")), \
            AllocationQuery(shape, np.dtype("u1"))

    def generate_code(self):
        read, loop, raw = self.memory_read, Compiler.get_iterator(), _RAW

        def decode_batch(batch_indices, destination, metadata, storage_state):
            for i in loop(len(batch_indices)):
                field = metadata[batch_indices[i]]
                data = read(field["data_ptr"], storage_state)
                h, w = np.int64(field["height"]), np.int64(field["width"])
                if field["mode"] == raw:
                    destination[i, :h * w * 3] = data[:h * w * 3]
                else:
                    _jpeg_decode(data.ctypes.data, data.size, destination[i].ctypes.data, h, w)
            return destination[:len(batch_indices)]

        decode_batch.is_parallel = True
        return decode_batch


def _render_sample(decoded, length, params, out, count, size, colour_on):
    """Every view of one image: `count` rows of params (float32 [count,
    P_ROW]) -> out float32 [count, S, S, 3] normalised (colour_on) or uint8
    [count, S, S, 3] resampled. Arguments are addresses and sizes."""
    image = numba.carray(colour.void_ptr(decoded), length, dtype=np.uint8)
    rows = numba.carray(colour.void_ptr(params), (count, P_ROW), dtype=np.float32)
    if colour_on:
        views = numba.carray(colour.void_ptr(out), (count, size, size, 3), dtype=np.float32)
        tile = np.empty((size, size, 3), np.uint8)
        for v in range(count):
            resample_view(image, rows[v], tile)
            colour.render(views[v], tile, rows[v, G_LEN:])
    else:
        tiles = numba.carray(colour.void_ptr(out), (count, size, size, 3), dtype=np.uint8)
        for v in range(count):
            resample_view(image, rows[v], tiles[v])


# A C function called through its address from FFCV's compiled stage: a
# direct call would link (and optimise again) all of colour.render into
# every stage FFCV compiles, a minute per loader; this is compiled once and cached.
_u64, _i64 = numba.types.uint64, numba.types.int64
_RENDER_SAMPLE = numba.cfunc(numba.types.void(_u64, _i64, _u64, _u64, _i64, _i64, _i64), nopython=True,
                             cache=True)(_render_sample)
_render_sample_c = ctypes.CFUNCTYPE(None, ctypes.c_uint64, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint64,
                                    ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)(_RENDER_SAMPLE.address)


class _Render(Operation):
    """`count` views of every image from its decode: float32 normalised
    (colour on the CPU) or uint8 resized tiles (colour on the device)."""

    def __init__(self, count: int, size: int, colour_on: bool):
        super().__init__()
        self.count, self.size, self.colour_on = count, size, colour_on

    def declare_state_and_memory(self, previous_state):
        shape = (self.count, self.size, self.size, 3)
        dtype = np.dtype("f4") if self.colour_on else np.dtype("u1")
        return replace(previous_state, jit_mode=True, shape=shape, dtype=dtype), \
            (AllocationQuery(shape, dtype), AllocationQuery((self.count, P_ROW), np.dtype("f4")))

    def generate_code(self):
        loop, count, size, colour_on = Compiler.get_iterator(), self.count, self.size, int(self.colour_on)
        render = _render_sample_c

        def render_batch(decoded, memory):
            out, params = memory
            for i in loop(decoded.shape[0]):
                render(decoded[i].ctypes.data, decoded.shape[1], params[i].ctypes.data, out[i].ctypes.data, count,
                       size, colour_on)
            return out

        render_batch.is_parallel = True
        return render_batch


class _Paste(Operation):
    """MosRep canvases from every image's tiles by the plan's paste table;
    what the jitter uncovers takes the reference's MOSAIC_FILL."""

    def __init__(self, crops: int, canvas: int, fill):
        super().__init__()
        self.crops, self.canvas, self.fill = crops, canvas, tuple(fill)

    def declare_state_and_memory(self, previous_state):
        shape = (self.canvas, self.canvas, 3)
        return replace(previous_state, shape=shape), \
            (AllocationQuery(shape, previous_state.dtype), AllocationQuery((self.crops, T_LEN), np.dtype("i4")))

    def generate_code(self):
        loop, m, (f0, f1, f2) = Compiler.get_iterator(), self.crops, self.fill

        def paste_batch(tiles, memory):
            canvas, table = memory
            for c in loop(tiles.shape[0]):
                canvas[c, :, :, 0] = f0
                canvas[c, :, :, 1] = f1
                canvas[c, :, :, 2] = f2
                for t in range(m):
                    src, crop, sy, sx, h, w, dy, dx = table[c, t]
                    canvas[c, dy:dy + h, dx:dx + w] = tiles[src, crop, sy:sy + h, sx:sx + w]
            return canvas

        paste_batch.is_parallel = True
        return paste_batch


class _PlanOrder(TraversalOrder):
    """The rank's shard of the planned epoch from the loader's position, in
    batches of planner.rows: each step's anchors, then (with neighbours, CLIM)
    the images the planner's table names for them, as the plan's `index`.
    FFCV's Loader calls an order instance with itself (`order(loader)`)."""

    def __init__(self, planner, record):
        self.planner, self.record, self.epoch, self.start = planner, record, 0, 0

    def __call__(self, loader):
        TraversalOrder.__init__(self, loader)
        return self

    def sample_order(self, epoch):  # FFCV's own epoch count is not ours: the planned loader sets the position
        p, b = self.planner, self.planner.batch_size
        rows = p.shard(self.epoch)[self.start * b:p.steps_per_epoch * b].reshape(-1, b)
        if p.spec.neighbours:  # Planner.plan's rows: the named image, the anchor itself where none
            named = p.neighbours_of(rows)
            rows = np.concatenate([rows, np.where(named >= 0, named, rows)], axis=1)
        return self.record[rows.reshape(-1)].astype(np.uint64)


_COMPILING = threading.Lock()


class _Epoch(EpochIterator):
    """FFCV's epoch thread, writing each step's plan into the parameter
    buffers of its batch slot before the compiled stage runs; yields (plan, outputs)."""

    def __init__(self, loader, order, owner, epoch, start):
        self.owner, self.epoch, self.first_step, self.error = owner, epoch, start, None
        self.torch_threads = torch.get_num_threads()
        super().__init__(loader, order)  # starts the thread

    def run(self):
        try:
            super().run()
        except BaseException as e:  # FFCV's thread would die silently and leave the consumer waiting
            self.error = e
            self.output_queue.put(None)

    def run_pipeline(self, b_ix, batch_indices, batch_slot, cuda_event):
        if torch.get_num_threads() != self.torch_threads:  # FFCV's run() set it to the workers' count
            torch.set_num_threads(self.torch_threads)
        plan = self.owner.planner.plan(self.epoch, self.first_step + b_ix)
        if not np.array_equal(self.owner._record[plan.index], batch_indices):
            raise RuntimeError(f"ffcv: step {self.first_step + b_ix}'s batch is not the plan's")
        self.owner._write_params(plan, batch_slot, self.memory_allocations["operation"])
        if self.owner._compiled:
            return plan, super().run_pipeline(b_ix, batch_indices, batch_slot, cuda_event)
        with _COMPILING:  # the first batch compiles the stage: one pipeline at a time (Numba's dispatchers race)
            result = super().run_pipeline(b_ix, batch_indices, batch_slot, cuda_event)
        self.owner._compiled = True
        return plan, result


class _FFCVLoader(Loader):
    def __init__(self, *args, owner, **kw):
        self.owner = owner
        super().__init__(*args, **kw)

    def __iter__(self):
        with _torch_threads_kept():
            Compiler.set_num_threads(self.num_workers)  # FFCV's class-wide count, for this loader's stage
        order = self.traversal_order
        return _Epoch(self, order.sample_order(order.epoch), self.owner, order.epoch, order.start)


# ---------------------------------------------------------------- the loader
class FfcvLoader(PlannedLoader):
    """The plan rendered by FFCV from a `.beton` of the source (built once
    into the cache unless `beton` names one). On the CPU the compiled stage
    renders every view normalised; with a CUDA device it only decodes and
    resamples, and pipelines/colour.py's CUDA kernel colours every view of a
    family in one launch."""
    name = "ffcv"
    capabilities = frozenset({"crops", "asymmetric", "original", "mosaic", "pairs", "neighbours"})

    def __init__(self, spec, source, *, beton: Optional[str] = None, cache_dir: Optional[str] = None,
                 jpeg_quality: int = DEFAULT_QUALITY, max_side: Optional[int] = None,
                 batches_ahead: int = 2, colour_on_device: Optional[bool] = None, **kw):
        path = beton or ensure_beton(source, cache_dir=cache_dir, jpeg_quality=jpeg_quality, max_side=max_side)
        reader = Reader(str(path))
        position = reader.metadata["f1"].astype(np.int64)  # each record's position in the source, -1: skipped
        if len(position) != len(source) or (position >= len(source)).any():
            raise PipelineError(f"ffcv: {path} holds {len(position)} records, {source.name} has {len(source)} "
                                "images; write it again from this source")
        self._record = np.flatnonzero(position >= 0)  # the loader's sample i is record _record[i]
        if len(self._record) != len(source):
            source = _subset(source, position[self._record])
        meta = reader.metadata["f0"][self._record]
        self.decoded_w, self.decoded_h = meta["width"].astype(np.int64), meta["height"].astype(np.int64)
        expect_w, expect_h = _stored_size(source.widths, source.heights, max_side)
        if not (np.array_equal(self.decoded_w, expect_w) and np.array_equal(self.decoded_h, expect_h)):
            raise PipelineError(f"ffcv: the image sizes in {path} disagree with the index of {source.name}; "
                                "write it again from this source")
        super().__init__(spec, source, **kw)
        self.path = str(path)
        # on a GPU, colour runs batched on it; `colour_on_device=True` on the
        # CPU runs the same kernels in Numba's CUDA simulator (tests)
        self.colour_on_device = self.device.type == "cuda" if colour_on_device is None else bool(colour_on_device)
        self._groups = view_families(spec)
        self._batches_ahead = int(batches_ahead)
        self._ffcv, self._running, self._compiled = None, None, False

    def _build(self):
        """FFCV's loader: one decoder, one branch per view family (compiled here, once)."""
        decoder = _Decode()
        specs, self._ops = {}, []
        for g, group in enumerate(self._groups):
            render = _Render(group.count, group.size, not self.colour_on_device)
            ops = [render]
            if group.kind == "mosaic" and not self.colour_on_device:  # else colour.paste_mosaics on the device
                ops.append(_Paste(group.count, group.out_size, colour.MOSAIC_FILL_NORMALISED))
            self._ops.append(ops)
            specs["image" if g == 0 else f"views{g}"] = (
                PipelineSpec("image", decoder=decoder, transforms=ops) if g == 0
                else PipelineSpec(source=decoder, transforms=ops))
        specs["source_index"] = None  # the plan knows every index already
        self._order = _PlanOrder(self.planner, self._record)
        threads = max(1, min(self.workers, numba.config.NUMBA_NUM_THREADS))
        with _torch_threads_kept():
            self._ffcv = _FFCVLoader(self.path, self.planner.rows, num_workers=threads, order=self._order,
                                     pipelines=specs, drop_last=False, batches_ahead=self._batches_ahead, owner=self)
        graph = self._ffcv.graph
        self._node = {op: graph.operation_to_node[op][0].id for ops in self._ops for op in ops}

    def _write_params(self, plan: BatchPlan, slot: int, memory: dict) -> None:
        """Step `plan`'s parameters into the buffers of batch slot `slot` (FFCV's thread)."""
        index = plan.index
        for group, ops in zip(self._groups, self._ops):
            cp = group.plan(plan)
            rows = memory[self._node[ops[0]]][1][slot]
            rows[:len(index)] = self._view_rows(cp, group.augs, index).transpose(1, 0, 2)
            if len(ops) > 1:
                mp = plan.mosaic
                table = memory[self._node[ops[1]]][1][slot]
                table[:len(index), :, 0] = mp.tile_src
                table[:len(index), :, 1] = mp.tile_crop
                table[:len(index), :, 2:] = mp.paste

    def _view_rows(self, cp: CropPlan, augs, index) -> np.ndarray:
        """float32 [count, B, P_ROW]: windows in decoded pixels (the index's
        when no --max-side shrank the images), sizes, flips, colour vectors."""
        rows = np.zeros(cp.window.shape[:2] + (P_ROW,), np.float32)
        dw, dh = self.decoded_w[index], self.decoded_h[index]
        window = cp.window.astype(np.int64)
        iw, ih = self.planner.widths[index], self.planner.heights[index]
        if np.array_equal(dw, iw) and np.array_equal(dh, ih):
            top, left, h, w = (window[..., i] for i in range(4))
        else:  # images shrunk at write time: the same fractions of the decoded image
            top = np.floor(window[..., 0] * dh / ih).astype(np.int64)
            left = np.floor(window[..., 1] * dw / iw).astype(np.int64)
            h = np.clip(np.rint(window[..., 2] * dh / ih).astype(np.int64), 1, dh - top)
            w = np.clip(np.rint(window[..., 3] * dw / iw).astype(np.int64), 1, dw - left)
        rows[..., G_TOP], rows[..., G_LEFT], rows[..., G_H], rows[..., G_W] = top, left, h, w
        rows[..., G_IMG_H], rows[..., G_IMG_W] = dh, dw
        rows[..., G_FLIP] = cp.flip
        rows[..., G_LEN:] = colour.view_params(cp, augs, cp.size)
        return rows

    def _render(self, epoch: int, start: int) -> Iterator[Views]:
        if self._ffcv is None:
            self._build()
        self._stop()
        self._order.epoch, self._order.start = epoch, start
        it = self._running = iter(self._ffcv)
        try:
            for plan, outputs in it:
                yield self._views(plan, outputs)
            if it.error is not None:
                raise RuntimeError(f"ffcv: rendering failed: {it.error!r}") from it.error
        finally:
            self._stop()

    def _stop(self) -> None:
        """End the running epoch's thread: it plans ahead with our planner,
        which a new iteration must not share with it."""
        it, self._running = self._running, None
        if it is None:
            return
        it.close()
        while it.is_alive():  # its last put (the end marker) blocks on a full queue: drain it
            try:
                it.output_queue.get(timeout=0.05)
            except queue.Empty:
                pass

    def _views(self, plan: BatchPlan, outputs) -> Views:
        """Each family copied out of FFCV's slot buffers (reused a few steps
        later) into [count, B, H, W, C] memory, then to the device."""
        views = self.bookkeeping(plan)
        for group, pixels in zip(self._groups, outputs):
            pixels = torch.from_numpy(pixels)  # [B, count, s, s, 3]; the CPU's canvases [B, S, S, 3]
            if self.colour_on_device:
                out = self._colour_on_device(group, plan, pixels)
            else:
                if group.kind == "mosaic":
                    pixels = pixels[:, None]
                out = torch.empty(pixels.shape[1:2] + pixels.shape[:1] + pixels.shape[2:], dtype=torch.float32,
                                  pin_memory=self.device.type == "cuda")  # so its copy to a GPU does not block
                out.copy_(pixels.transpose(0, 1))
                out = out.to(self.device, self.dtype, non_blocking=True).movedim(-1, -3)
                if group.kind == "mosaic":
                    out = out[0]
            place_family(views, group, out)
        return views

    def _colour_on_device(self, group, plan: BatchPlan, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 tiles [B, count, s, s, 3] -> normalised [count, B, 3, s, s]
        (the mosaic [B, 3, S, S]) by pipelines/colour.py's CUDA kernels,
        as DALI's GPU graph does (colour.render_group)."""
        staged = torch.empty(tiles.shape[1:2] + tiles.shape[:1] + tiles.shape[2:], dtype=torch.uint8,
                             pin_memory=self.device.type == "cuda")  # pageable memory would make the copy block
        staged.copy_(tiles.transpose(0, 1))
        on_device = staged.to(self.device, non_blocking=True)
        return colour.render_group(group, plan, on_device, self.dtype)

    def close(self) -> None:
        self._stop()
        self._ffcv = None
        super().close()


def _subset(source: Source, keep: np.ndarray) -> Source:
    return Source(name=source.name, split=source.split, paths=[source.paths[i] for i in keep],
                  labels=source.labels[keep], widths=source.widths[keep], heights=source.heights[keep],
                  classes=source.classes, skipped=source.skipped + len(source) - len(keep))


def _stored_size(widths, heights, max_side: Optional[int]):
    """Sizes as written: the index's, or shrunk to `max_side` on the longer side."""
    w, h = np.asarray(widths, np.int64), np.asarray(heights, np.int64)
    if not max_side:
        return w, h
    longer = np.maximum(w, h)
    shrink = longer > max_side
    ratio = np.where(shrink, max_side / longer, 1.0)
    return (np.where(shrink, np.maximum(1, np.rint(w * ratio)), w).astype(np.int64),
            np.where(shrink, np.maximum(1, np.rint(h * ratio)), h).astype(np.int64))


# ---------------------------------------------------------------- the writer
# FFCV keeps each record inside one page and refuses, in a worker, a record
# larger than a page. DatasetWriter wants a power of two from 2 MiB to below
# 4 GiB (the header stores it in 32 bits) and defaults to 8 MiB; the reader
# finds a record's page by shifting its pointer by log2(page) and, with
# os_cache=False only, holds whole pages in memory, so any such page reads back.
_DEFAULT_PAGE = 4 * MIN_PAGE_SIZE
_CHUNK = 64  # records a writer worker takes at a time
_STOP_S = 5.0  # how long a writer worker told to stop may take before it is killed
_PLACEHOLDER = (_RAW, 1, 1, np.zeros(3, np.uint8))
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _page_size(largest: int, what: str) -> int:
    """The smallest power of two that holds a record of `largest` bytes, and
    never less than FFCV's default page."""
    page = max(_DEFAULT_PAGE, 1 << max(0, int(largest) - 1).bit_length())
    if page >= MAX_PAGE_SIZE:
        raise DataError(f"{what}: {int(largest):,} bytes do not fit a page of a .beton (FFCV's pages are under "
                        "4 GiB); leave it out or shrink it with --max-side")
    return page


def _stored_image_field() -> RGBImageField:
    """FFCV's RGBImageField (so that any FFCV reads the file) whose records
    arrive ready: (mode, width, height, bytes)."""
    field = RGBImageField()
    field.encode = _encode_record
    return field


def _encode_record(destination, record, malloc):
    """One record into FFCV's metadata and page; `_Records` made sure it fits a page."""
    mode, width, height, payload = record
    destination["mode"], destination["width"], destination["height"] = mode, width, height
    destination["data_ptr"], storage = malloc(payload.nbytes)
    storage[:] = payload


def _record(path: str, width: int, height: int, quality: int, max_side: Optional[int], raw_max_pixels: int):
    """(mode, width, height, bytes) of one file, or None when it cannot be decoded."""
    data = np.fromfile(path, dtype=np.uint8)
    with Image.open(io.BytesIO(data.tobytes())) as probe:
        fmt, mode = probe.format, probe.mode
        turned = probe.getexif().get(EXIF_ORIENTATION, 1) != 1
    (w,), (h,) = _stored_size([width], [height], max_side)
    if fmt in ("JPEG", "MPO") and mode in ("RGB", "L") and not turned and (w, h) == (width, height):
        return _JPG, width, height, data  # turbojpeg decodes these bytes exactly as PIL does
    img = decode(data)
    if img.size != (width, height):
        raise ValueError(f"decodes to {img.size}, the index says {(width, height)}")
    if (w, h) != (width, height):
        img = img.resize((int(w), int(h)), Image.Resampling.BILINEAR, reducing_gap=3.0)
    if fmt not in ("JPEG", "MPO") and w * h <= raw_max_pixels:
        return _RAW, int(w), int(h), np.ascontiguousarray(np.asarray(img, np.uint8)).reshape(-1)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return _JPG, int(w), int(h), np.frombuffer(buf.getvalue(), np.uint8)


class _Records:
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
            record = _record(s.paths[i], int(s.widths[i]), int(s.heights[i]), self.quality, self.max_side,
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


class _WorkerFailed(Exception):
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
                        ticket.value = start + _CHUNK
                    stop = min(start + _CHUNK, len(records))
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


def _stop(workers: list, running) -> None:
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


class _Writer(DatasetWriter):
    """FFCV's DatasetWriter (file layout, pages, allocator, per-record
    encode) with its workers watched. FFCV's own parent polls a count of
    records written until it reaches the total, then waits on a queue for
    each worker's allocations; a worker that raised or was killed does
    neither, so the parent waited for ever. Here a worker that reports a
    failure, or ends without saying "done", ends the write at once
    (`_WorkerFailed` with the position it was writing), and every worker has
    ended, been stopped or killed when `write` returns. Nothing the parent
    waits on can be held by a dead worker: it reads the shared counters
    without their locks, and the workers' messages are each one pipe write
    shorter than PIPE_BUF, so one arrives whole or not at all."""

    def write(self, records: _Records) -> None:
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
                        raise _WorkerFailed(*rest)
                    running.discard(slot)
                    continue
                if done.value > progress.n:
                    progress.update(done.value - progress.n)
                for k in running:  # sent before it ended, a message is in the pipe by now
                    if workers[k].exitcode is not None and not messages.poll(0):
                        raise _WorkerFailed(int(current[k]), _how_it_ended(workers[k].exitcode))
            progress.update(n - progress.n)
            self.finalize(np.frombuffer(table, ALLOC_TABLE_TYPE).tolist())
            finished = True
        finally:
            progress.leave = finished  # a failed write shows its one error line, not a stopped bar
            progress.close()
            _stop(workers, running)
            messages.close()
            report.close()
            self.metadata_sm.close()
            self.metadata_sm.unlink()


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:  # gone since indexing: the worker finds it and skips it
        return 0


def write_beton(source: Source, out, *, jpeg_quality: int = DEFAULT_QUALITY, max_side: Optional[int] = None,
                raw_max_pixels: int = RAW_MAX_PIXELS, workers: Optional[int] = None) -> dict:
    """Write `source` as a .beton at `out` atomically (a temporary file in the
    same folder, then a rename), with FFCV's progress bar. Returns
    {'written', 'skipped_index', 'skipped_write'}: images stored, files the
    index had left out, files that failed to decode here.

    Page size: FFCV stores each record inside one page. The page is the
    smallest power of two that holds the largest file (one stat per file; a
    kept JPEG is stored as its file), 8 MiB (FFCV's default) at least, under
    4 GiB. A re-encoded image larger than that page (rare: a converted or
    non-JPEG image that compresses worse than the largest file) is found
    while writing, and the write is done once more with a page that holds it.
    A larger page costs file size: each page is written whole, so the
    padding before the first page, each worker's last page and the unused
    tails of pages grow with it. Reading maps the file (FFCV's os_cache, the
    loader's default), where the page size does not enter.

    A writer worker that fails for any reason (an exception, a signal, the
    OOM killer) ends the write within seconds with a DataError naming the
    file it was writing; no worker outlives the call."""
    out = pathlib.Path(out).expanduser()
    if not 1 <= int(jpeg_quality) <= 100:
        raise DataError(f"--jpeg-quality must lie in 1..100, not {jpeg_quality}")
    if max_side is not None and max_side < 1:
        raise DataError(f"--max-side must be positive, not {max_side}")
    if not len(source):
        raise DataError(f"{source.name}: no images to write")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
    except OSError as e:
        raise DataError(f"cannot write {out}: {e.strerror or e}") from None
    try:
        workers = min(workers or max(1, min(8, os.cpu_count() or 1)), -(-len(source) // _CHUNK))
        fields = {"image": _stored_image_field(), "source_index": IntField()}
        sizes = [_file_size(p) for p in source.paths]
        largest = int(np.argmax(sizes))
        page = _page_size(sizes[largest], source.paths[largest])
        for attempt in range(2):
            records = _Records(source, int(jpeg_quality), max_side, raw_max_pixels, page)
            _Writer(tmp, fields, page_size=page, num_workers=workers).write(records)
            need, at = records.oversized
            if not need:
                break
            if attempt:
                raise DataError(f"{source.paths[at]}: its record grew to {need:,} bytes while {out} was written; "
                                "write it again")
            page, was = _page_size(need, source.paths[at]), page
            print(f"note: {source.paths[at]} takes {need:,} bytes once re-encoded, more than the {was:,}-byte "
                  f"page the largest file asked for; writing {out} again with {page:,}-byte pages", file=sys.stderr)
        failed = int((Reader(tmp).metadata["f1"] < 0).sum())
        if failed == len(source):
            raise DataError(f"{source.name}: none of its {len(source)} images could be decoded")
        os.replace(tmp, out)
    except _WorkerFailed as e:
        position, reason = e.args
        where = f" on {source.paths[position]}" if position >= 0 else ""
        raise DataError(f"writing {out} failed{where}: {reason}") from None
    except OSError as e:
        raise DataError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if failed:
        print(f"warning: skipped {failed} file(s) of {source.name} that failed to decode", file=sys.stderr)
    return {"written": len(source) - failed, "skipped_index": source.skipped, "skipped_write": failed}


def _stamp(source: Source, options: dict) -> str:
    """What the cached .beton was written from: every path, its size and
    mtime (one stat per file, as the index), the index's sizes, the options."""
    h = hashlib.sha1(json.dumps({"version": BETON_VERSION, **options}, sort_keys=True).encode())
    for path, w, hh in zip(source.paths, source.widths, source.heights):
        st = os.stat(path)
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{w}\0{hh}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def ensure_beton(source: Source, *, cache_dir: Optional[str] = None, jpeg_quality: int = DEFAULT_QUALITY,
                 max_side: Optional[int] = None) -> pathlib.Path:
    """The cached .beton of `source`, written once: named like the index
    (a hash of what the source is), valid while the stamp of its files matches."""
    options = {"jpeg_quality": int(jpeg_quality), "max_side": max_side, "raw_max_pixels": RAW_MAX_PIXELS}
    key = hashlib.sha1(repr((source.name, source.split, source.paths[:1], len(source))).encode()).hexdigest()
    path = cache_root(cache_dir) / "ffcv" / f"{key}.beton"
    stamp_file = path.with_suffix(".stamp")
    stamp = _stamp(source, options)
    try:
        if path.is_file() and stamp_file.read_text() == stamp:
            return path
    except OSError:
        pass
    try:
        write_beton(source, path, jpeg_quality=jpeg_quality, max_side=max_side)
        stamp_file.write_text(stamp)
    except DataError as e:
        raise PipelineError(str(e)) from None
    return path


# ---------------------------------------------------------------- command line
def main(argv=None) -> int:
    from .data import open_source

    p = argparse.ArgumentParser(prog="python -m pipelines.ffcv", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write a source as a .beton")
    w.add_argument("--data", default=None, help="ImageFolder, .txt file list, fashion-mnist, or the built-in sample")
    w.add_argument("--split", default="train", choices=["train", "test"])
    w.add_argument("--out", required=True, help="the .beton to write (atomically)")
    w.add_argument("--jpeg-quality", type=int, default=DEFAULT_QUALITY,
                   help="quality of images that must be re-encoded (kept JPEGs keep their bytes)")
    w.add_argument("--max-side", type=int, default=None, help="shrink images whose longer side exceeds this")
    args = p.parse_args(argv)
    try:
        source = open_source(args.data, args.split)
        if source is None:
            raise DataError(f"{args.data}: has no {args.split} split")
        counts = write_beton(source, args.out, jpeg_quality=args.jpeg_quality, max_side=args.max_side)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {counts['written']} images; skipped {counts['skipped_index']} unreadable "
          f"(index) and {counts['skipped_write']} that failed to decode")
    return 0


if __name__ == "__main__":
    sys.exit(main())

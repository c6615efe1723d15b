"""FFCV's compiled stage for pipelines/ffcv.py: one decode per image, every view cut from it.

`Decode` decodes each record once (turbojpeg with the accurate DCT, as PIL
does, or a copy of raw pixels); `Render` cuts, per view family, each view's
window from that decode and resamples it as PIL's antialiased bilinear
resize does (bit for bit), flipped, then (colour on the CPU) runs
pipelines/colour.py's `render`; `Paste` builds the mosaic's canvases. A
view's parameters reach the compiled code as one float32 row (ROW_*
columns) written by the loader into each operation's parameter buffer.
`PlanOrder`, `Epoch` and `PlannedFFCVLoader` drive FFCV's loader in the
plan's order, writing each step's parameters before its stage runs.

Import it through pipelines.ffcv, which keeps torch's thread count from
FFCV's import.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import threading
from dataclasses import replace

import numba
import numpy as np
import torch
from ffcv.fields.rgb_image import IMAGE_MODES
from ffcv.loader import Loader
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.traversal_order.base import TraversalOrder

from . import colour

_RAW = IMAGE_MODES["raw"]

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
def jpeg_decode(data, size, out, height, width):
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
ROW_TOP, ROW_LEFT, ROW_HEIGHT, ROW_WIDTH, ROW_IMAGE_HEIGHT, ROW_IMAGE_WIDTH, ROW_FLIP, ROW_COLOUR = range(8)
ROW_LEN = ROW_COLOUR + colour.PARAM_LEN
# Per tile of a canvas: source image (batch index), its crop, then the paste (sy, sx, h, w, dy, dx).
PASTE_ROW_LEN = 8


# Compiled once, for read-only arguments (writable ones convert): typing a
# call from each new FFCV stage would otherwise compile further overloads,
# and Numba's dispatcher raised KeyError doing that from FFCV's thread.
_U8_IN = numba.types.Array(numba.uint8, 1, "C", readonly=True)
_ROW = numba.types.Array(numba.float32, 1, "C", readonly=True)


@numba.njit(numba.void(_U8_IN, _ROW, numba.uint8[:, :, ::1]), nogil=True, cache=True)
def resample_view(decoded, p, tile):
    """tile (S, S, 3) uint8 = the window of row p cut from one decoded image
    (flat uint8), resampled and flipped as the reference does."""
    h, w = int(p[ROW_IMAGE_HEIGHT]), int(p[ROW_IMAGE_WIDTH])
    image = decoded[:h * w * 3].reshape((h, w, 3))
    resized_crop(image, int(p[ROW_TOP]), int(p[ROW_LEFT]), int(p[ROW_HEIGHT]), int(p[ROW_WIDTH]), tile,
                 p[ROW_FLIP] > 0.5)


# ---------------------------------------------------------------- FFCV operations
class Decode(Operation):
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
                    jpeg_decode(data.ctypes.data, data.size, destination[i].ctypes.data, h, w)
            return destination[:len(batch_indices)]

        decode_batch.is_parallel = True
        return decode_batch


def _render_sample(decoded, length, params, out, count, size, colour_on_device):
    """Every view of one image: `count` rows of params (float32 [count,
    ROW_LEN]) -> out uint8 [count, S, S, 3] resampled (colour_on_device: the
    CUDA kernels colour them later) or float32 [count, S, S, 3] rendered and
    normalised here. Arguments are addresses and sizes."""
    image = numba.carray(colour.void_ptr(decoded), length, dtype=np.uint8)
    rows = numba.carray(colour.void_ptr(params), (count, ROW_LEN), dtype=np.float32)
    if not colour_on_device:
        views = numba.carray(colour.void_ptr(out), (count, size, size, 3), dtype=np.float32)
        tile = np.empty((size, size, 3), np.uint8)
        for v in range(count):
            resample_view(image, rows[v], tile)
            colour.render(views[v], tile, rows[v, ROW_COLOUR:])
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


class Render(Operation):
    """`count` views of every image from its decode: float32 normalised
    (colour on the CPU) or uint8 resized tiles (colour on the device)."""

    def __init__(self, count: int, size: int, colour_on_device: bool):
        super().__init__()
        self.count, self.size, self.colour_on_device = count, size, colour_on_device

    def declare_state_and_memory(self, previous_state):
        shape = (self.count, self.size, self.size, 3)
        dtype = np.dtype("u1") if self.colour_on_device else np.dtype("f4")
        return replace(previous_state, jit_mode=True, shape=shape, dtype=dtype), \
            (AllocationQuery(shape, dtype), AllocationQuery((self.count, ROW_LEN), np.dtype("f4")))

    def generate_code(self):
        loop, count, size, on_device = Compiler.get_iterator(), self.count, self.size, int(self.colour_on_device)
        render = _render_sample_c

        def render_batch(decoded, memory):
            out, params = memory
            for i in loop(decoded.shape[0]):
                render(decoded[i].ctypes.data, decoded.shape[1], params[i].ctypes.data, out[i].ctypes.data, count,
                       size, on_device)
            return out

        render_batch.is_parallel = True
        return render_batch


class Paste(Operation):
    """MosRep canvases from every image's tiles by the plan's paste table;
    what the jitter uncovers takes the reference's MOSAIC_FILL."""

    def __init__(self, crops: int, canvas: int, fill):
        super().__init__()
        self.crops, self.canvas, self.fill = crops, canvas, tuple(fill)

    def declare_state_and_memory(self, previous_state):
        shape = (self.canvas, self.canvas, 3)
        return replace(previous_state, shape=shape), \
            (AllocationQuery(shape, previous_state.dtype), AllocationQuery((self.crops, PASTE_ROW_LEN), np.dtype("i4")))

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


# ---------------------------------------------------------------- driving FFCV's loader
@contextlib.contextmanager
def torch_threads_kept():
    """Torch's thread count as it was, whatever FFCV set inside."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class PlanOrder(TraversalOrder):
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


class _Closed(Exception):
    """Raised in the epoch thread once its consumer has closed it."""


class Epoch(EpochIterator):
    """FFCV's epoch thread, writing each step's plan into the parameter
    buffers of its batch slot before the compiled stage runs; yields (plan, outputs)."""

    def __init__(self, loader, order, owner, epoch, start):
        self.owner, self.epoch, self.first_step, self.error = owner, epoch, start, None
        self.torch_threads = torch.get_num_threads()
        super().__init__(loader, order)  # starts the thread

    def run(self):
        try:
            super().run()
        except _Closed:
            pass
        except BaseException as e:  # FFCV's thread would die silently and leave the consumer waiting
            self.error = e
            self.output_queue.put(None)

    def run_pipeline(self, b_ix, batch_indices, batch_slot, cuda_event):
        # FFCV's run() looks at its terminate event only when a put finds the
        # queue full, and a closing consumer drains the queue: without this
        # check a loader closed mid-epoch would render the rest of the epoch.
        if self.terminate_event.is_set():
            raise _Closed
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


class PlannedFFCVLoader(Loader):
    def __init__(self, *args, owner, **kw):
        self.owner = owner
        super().__init__(*args, **kw)

    def __iter__(self):
        with torch_threads_kept():
            Compiler.set_num_threads(self.num_workers)  # FFCV's class-wide count, for this loader's stage
        order = self.traversal_order
        return Epoch(self, order.sample_order(order.epoch), self.owner, order.epoch, order.start)

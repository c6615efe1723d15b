"""DALI pipeline: one graph built from the ViewSpec renders every step's plan.

Per step (batch B), in the graph:

    bytes ─► decoders.image (nvJPEG 'mixed' on the GPU, 'cpu' otherwise; RGB, EXIF applied), once
      └─► per view: resize of the plan's window (ROI, antialiased bilinear; mirrored by swapping x)
    GPU graph: that is all. After it, pipelines/colour.py's CUDA kernels
      (`colour.render_group`) render every view of a family at once on
      torch's current stream (colour jitter in the plan's order, grayscale,
      blur, solarize, normalisation, straight into the training tensor), and
      one more kernel pastes the mosaics from the rendered tiles.
    CPU graph: per view, the same maths compiled for the CPU (one Numba
      operator: colour, then normalisation), then for the mosaic: cat each
      image's M tiles into a strip, multi_paste by the plan's paste table
      (the band the jitter uncovers then takes the reference's MOSAIC_FILL).

Bytes and plan arrays enter through one batch-mode `fn.external_source`
(not parallel: its workers gained nothing on 2 cores) whose callback, the
feed, DALI calls in step order on the thread that runs the pipeline: the
training loop's. So that the loop does not read files, a reader thread
works ahead of it: it plans each step (plans are pure functions of (epoch,
step), so reading ahead changes no batch), reads and checks its files and
builds the graph's inputs, at most `_Feed.AHEAD` steps ahead, on into the
next epoch's first steps, and the callback only hands over the next ready
step. Each handed-over plan waits in a queue that pairs every output batch
with its plan however far DALI prefetches. A new iteration (the next epoch,
a `break`, a resume) drains what the graph prefetched for the old one and
keeps the reader if it is at the step asked for with the same inputs (the
neighbour table, the files known not to decode, both copied at its start);
otherwise the reader is stopped and joined and a new one starts there.
`close()` and the loader's collection stop and join it too, and an
exception in the reader leaves `pipe.run` in its step's place.
A file that passes the header check but fails DALI's decoder fails the
graph: the steps in flight are decoded file by file, the culprit joins the
known-bad set (read as a flat replacement from then on), and the step is
rendered again on a fresh graph.

How the plan's semantics (pipelines/torchvision.py, PIL) are kept:
- Crop windows are ROIs relative to the decoded image (`roi_relative`),
  clipped to [0, 1] on the way in, so no window can leave the image (an
  absolute one outside it crashes DALI) even when an index's sizes disagree
  with the decoder. A flip swaps the ROI's x ends: the resize mirrors. Interior
  pixels match PIL's resize within one level; DALI's outermost row and
  column may differ more, as it samples up to 0.4 px beyond the window.
- Everything after the resize is pipelines/colour.py, one source of truth
  for both targets, bit for bit with torchvision on PIL (blur within one
  level on rare pixels, from the summation order). The mixed decoder
  upsamples chroma like libjpeg-turbo.
- `colour='dali'` (and a DALI without its Numba plugin) runs DALI's own CPU
  colour operators instead: each jitter slot one arithmetic expression
  a*x + b*L + d*mean(L), then `color_twist`'s hue, a rotation in YIQ that is
  not torchvision's HSV shift; blur and solarize under DALI conditionals.

The GPU graph's outputs are bound to torch's current stream (DALI's dynamic
executor), copied contiguously on it (one copy kernel per view) into
buffers whose shape and dtype are checked first. The CPU graph's outputs go
to pinned memory when the training device is a GPU, so their copy is
asynchronous. Every crops[name][i] is a channels_last [B, C, H, W] view of
[count, B, H, W, C] memory.

This module is the loader and its feed; the graph itself (its typed
inputs, operators and the Numba CPU operator) is pipelines/dali_graph.py.
"""
from __future__ import annotations

import collections
import ctypes
import functools
import queue
import threading
import weakref
from typing import Iterator

import numba
import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from . import colour, dali_graph
from .base import PipelineError, PlannedLoader
from .data import read_checked
from .plan import BatchPlan
from .render import place_family, view_families
from .views import MOSAIC_FILL, Views

# ---------------------------------------------------------------- the feed
class _Feed:
    """The external_source callback, and the reader thread that works ahead of it.

    `start(epoch, step, known_bad)` points the feed at a step. Its reader
    thread plans steps in order from there (on into the next epochs, an
    end-of-epoch mark between them), reads and checks each step's files and
    builds every graph input, at most AHEAD steps ahead of what has been
    handed over (a bounded queue). DALI calls the feed on the thread that
    runs the pipeline, the training loop's: each call only takes the next
    ready step off the queue; its plan waits in `plans` (beside it, in
    `replacements`, the indices its read replaced) until the batch rendered
    from it is taken out. The reader's failure is raised by the call that
    would have taken its step (and kept in `error`).

    A reader works from inputs handed over at its start: the neighbour table
    and the files known bad, copied. `start` keeps the running reader when
    its next step is the one asked for and those inputs are unchanged (a
    new epoch right after the last: its first steps are read already), and
    otherwise halts it and starts another. `halt()` stops the reader and
    joins it; so does the feed's garbage collection, and the thread is a
    daemon, so it never holds the interpreter open. Setting `stop` makes the
    callback end the epoch without taking a step."""

    # Steps read ahead of what the graph has taken (which holds prefetch_queue_depth more). The
    # graph's first run after a restart takes prefetch_queue_depth (2) steps at once, and an
    # epoch's end mark takes a place in the queue too: with 3, a new epoch's first run need not wait.
    AHEAD = 3

    def __init__(self, planner, source, groups, views, keys, mode):
        self.planner, self.source = planner, source
        self.groups, self.views, self.keys, self.mode = groups, views, keys, mode
        self.plans, self.replacements = collections.deque(), collections.deque()
        self.stop, self.error = True, None
        # the running reader: its queue, thread, finalizer (stops and joins it),
        # inputs (table, known_bad) and the (epoch, step) of the next step to take from it
        self._ready = self._thread = self._halt = self._inputs = self._next = None

    def start(self, epoch: int, step: int, known_bad=frozenset()) -> None:
        """Feed steps step, step+1, ... of `epoch`: the plans of earlier
        steps dropped, by the running reader when it is at that step with
        the same inputs, else by a new one."""
        self.plans.clear()
        self.replacements.clear()
        table, known_bad = self.planner.neighbours, frozenset(known_bad)
        if not (self._thread is not None and self._thread.is_alive() and self._next == (epoch, step)
                and self._inputs[1] == known_bad and _same_table(self._inputs[0], table)):
            self.halt()
            # Handed over, not shared: a copy of the neighbour table set now
            # (set_neighbours applies to iterations started later; the caller
            # may reuse its array) and of the files known bad now.
            self._inputs = (None if table is None else table.copy(), known_bad)
            prepare = functools.partial(_prepare, self.planner, self.source, self.groups, self.views, self.keys,
                                        self.mode, *self._inputs)
            ready, stopping = queue.Queue(self.AHEAD), threading.Event()
            # The thread holds no reference to the feed, so a dropped loader's
            # feed is collected, and its finalizer stops the thread.
            thread = threading.Thread(target=_read_ahead, args=(prepare, epoch, step, self.planner.steps_per_epoch,
                                                                 ready, stopping), name="dali-feed", daemon=True)
            self._ready, self._thread, self._next = ready, thread, (epoch, step)
            self._halt = weakref.finalize(self, _stop_reader, thread, stopping)
            thread.start()
        self.stop, self.error = False, None

    def halt(self) -> None:
        """Stop and join the reader (idempotent); the feed then ends its epoch."""
        self.stop = True
        if self._halt is not None:
            self._halt()  # a finalizer runs once
        self._ready = self._thread = self._halt = self._inputs = self._next = None

    def __call__(self):
        if self.stop:
            raise StopIteration
        while True:
            try:
                item = self._ready.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._ready.empty():
                    self.stop = True
                    raise RuntimeError("dali: the feed's reader thread ended without handing over a step") from None
        epoch, step = self._next
        if item is None:  # the epoch's end; the reader goes on with the next
            self.stop, self._next = True, (epoch + 1, 0)
            raise StopIteration
        if isinstance(item, BaseException):
            self.stop, self.error = True, item
            raise item
        plan, replaced, batch = item
        self._next = (epoch, step + 1)
        self.plans.append(plan)
        self.replacements.append(replaced)
        return batch


_POLL_S = 0.05  # how often the reader and the callback look up from a full or empty queue


def _same_table(a, b) -> bool:
    return (a is None) == (b is None) and (a is None or np.array_equal(a, b))


def _read_ahead(prepare, epoch: int, step: int, steps: int, ready: queue.Queue, stopping: threading.Event) -> None:
    """The reader thread: each step's prepared inputs into `ready` in order,
    None after an epoch's last, on into the next epochs, until `stopping` is
    set (every put gives up then) or a step fails (its exception is put)."""
    def put(item) -> bool:
        while not stopping.is_set():
            try:
                ready.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                pass
        return False

    try:
        while True:
            for s in range(step, steps):
                if not put(prepare(epoch, s)):
                    return
            if not put(None):
                return
            epoch, step = epoch + 1, 0
    except BaseException as e:  # the loop gets it from the callback, in the step's place
        put(e)


def _stop_reader(thread: threading.Thread, stopping: threading.Event) -> None:
    stopping.set()
    if thread is not threading.current_thread():  # a collection can run on the reader itself
        thread.join()


def _prepare(planner, source, groups, views, keys, mode, table, known_bad, epoch: int, step: int) -> tuple:
    """(plan, dataset indices its read replaced, the graph's inputs in `keys` order) of one step."""
    plan = planner.plan(epoch, step, neighbours=table)
    # Bytes checked as the index checked them: DALI stops the whole graph on a bad file.
    data, replaced = read_checked(source, plan.index.tolist(), known_bad)
    arrays = dali_graph.graph_arrays(plan, data, planner, groups, views, mode)
    return plan, replaced, [arrays[k] for k in keys]



def _fill_uncovered(canvas: torch.Tensor, shift: np.ndarray, fill: np.ndarray) -> torch.Tensor:
    """The band a canvas's jitter uncovers (multi_paste leaves it 0) takes
    `fill`, the reference's MOSAIC_FILL in the canvas's dtype (normalised
    when the canvas is). canvas [B, S, S, 3]; shift [B, 2] (dx, dy). A CPU
    canvas is filled in place, band only (a masked select over the whole
    canvas cost more than the rest of the main thread's work). The GPU
    graph's canvases are pasted and filled by colour.paste_mosaics instead."""
    pixels = canvas.numpy()
    _fill_band(pixels, np.ascontiguousarray(shift, np.int64), fill.astype(pixels.dtype))
    return canvas


@numba.njit(cache=True, nogil=True)
def _fill_band(canvas, shift, fill):
    """canvas[b] outside rows [dy, S + dy) and columns [dx, S + dx) = fill."""
    s = canvas.shape[1]
    for b in range(canvas.shape[0]):
        dx, dy = shift[b, 0], shift[b, 1]
        y0, y1 = max(dy, 0), min(s + dy, s)
        x0, x1 = max(dx, 0), min(s + dx, s)
        for y in range(s):
            if y < y0 or y >= y1:
                canvas[b, y, :, :] = fill
            else:
                canvas[b, y, :x0, :] = fill
                canvas[b, y, x1:, :] = fill


def _undecodable(data: list, gpu: bool, device_id) -> list:
    """Positions in `data` (encoded files) that DALI's decoder, the graph's
    kind, fails on: whole halves decoded in small graphs of their own,
    bisected where one fails."""
    if not data:
        return []

    @pipeline_def(batch_size=len(data), num_threads=1, device_id=device_id, prefetch_queue_depth=1)
    def decode_only():
        encoded = fn.external_source(source=lambda: list(data), batch=True, dtype=types.UINT8, ndim=1)
        return fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)

    try:
        pipe = decode_only()
        pipe.build()
        pipe.run()
        return []
    except Exception:
        if len(data) == 1:
            return [0]
    half = len(data) // 2
    return _undecodable(data[:half], gpu, device_id) + [half + k for k in _undecodable(data[half:], gpu, device_id)]


# ---------------------------------------------------------------- the loader
class DaliLoader(PlannedLoader):
    """The plan rendered by DALI: the GPU graph (nvJPEG decode and the crop
    windows' resize, then pipelines/colour.py's CUDA kernel) when the
    loader's device is CUDA; else, or with `cpu=True`, the CPU graph (its
    tensors then move to the device, from pinned memory). `colour='dali'`
    makes the CPU graph use DALI's own colour operators (the fallback
    without DALI's Numba plugin; hue differs from torchvision's)."""
    name = "dali"
    capabilities = frozenset({"crops", "asymmetric", "original", "mosaic", "pairs", "neighbours"})

    def __init__(self, spec, source, *, cpu: bool = False, colour: str = "auto", **kw):
        super().__init__(spec, source, **kw)
        if colour not in ("auto", "numba", "dali"):
            raise PipelineError(f"dali: colour must be 'auto', 'numba' or 'dali', not {colour!r}")
        self.gpu = self.device.type == "cuda" and not cpu
        if self.gpu and not torch.cuda.is_available():
            raise PipelineError("dali: a CUDA device was asked for but torch sees no GPU (cpu=True runs the CPU graph)")
        self.device_id = None
        if self.gpu:
            self.device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        if colour != "auto" and self.gpu:
            raise PipelineError(f"dali: colour={colour!r} is a CPU-graph option; the GPU graph's colour is the "
                                "CUDA kernel's")
        if colour == "numba" and dali_graph.cpu_operator() is None:
            raise PipelineError("dali: colour='numba' needs DALI's Numba plugin")
        # how this loader's graph renders colour (pipelines/dali_graph.py: 'cuda', 'numba' or 'dali')
        self.mode = ("cuda" if self.gpu else "dali" if colour == "dali" or dali_graph.cpu_operator() is None
                     else "numba")
        self._groups = view_families(spec)
        self._views = [[dali_graph.View(g, v, a) for v, a in enumerate(group.augs)]
                       for g, group in enumerate(self._groups)]
        self._pipe, self._feed, self._token = None, None, None
        self._known_bad = set()  # files that passed the header check but failed DALI's decode

    # -- the graph's lifetime -------------------------------------------------
    def _pipeline(self):
        """The graph, not yet built. The GPU graph runs on DALI's dynamic
        executor, whose outputs can be bound to torch's stream (no host wait)."""
        keys = dali_graph.graph_inputs(self._views, self.mode, self.spec.mosaic is not None)
        self._feed = _Feed(self.planner, self.source, self._groups, self._views, keys, self.mode)
        extra = {"exec_dynamic": True} if self.gpu else {}
        # planner.rows: the batch, and as many neighbour rows again when the spec fetches neighbours
        cpu_op = dali_graph.cpu_operator() if self.mode == "numba" else None
        return dali_graph.graph(self._feed, cpu_op, batch_size=self.planner.rows, num_threads=max(1, self.workers),
                                device_id=self.device_id, prefetch_queue_depth=2, **extra)

    def _build(self):
        pipe = self._pipeline()
        pipe.build()
        self._pipe = pipe

    def _restart(self, epoch: int, start: int):
        """Point the feed at (epoch, start) after taking out, and dropping,
        whatever the graph prefetched for an earlier iteration; the feed's
        reader (a new one unless the running one is at that step) reads from there."""
        if self._pipe is None:
            self._build()
        self._feed.stop = True
        try:
            while True:  # a stopped feed ends the epoch; drain the batches in flight
                self._pipe.run()
        except StopIteration:
            pass
        except Exception:  # the graph had failed: build a fresh one
            self.close()
            self._build()
        self._pipe.reset()
        self._feed.start(epoch, start, self._known_bad)

    def close(self) -> None:
        """The feed's reader stopped and joined, the graph dropped (idempotent)."""
        if self._feed is not None:
            self._feed.halt()
        self._pipe, self._feed, self._token = None, None, None
        super().close()

    # -- rendering ------------------------------------------------------------
    def _render(self, epoch: int, start: int) -> Iterator[Views]:
        self._restart(epoch, start)
        token = self._token = object()  # a newer iteration takes over the graph
        pipe, feed, step = self._pipe, self._feed, start
        while True:
            try:
                # the GPU graph's outputs are bound to torch's current stream, without a host wait
                outputs = pipe.run(torch.cuda.current_stream(self.device_id)) if self.gpu else pipe.run()
            except StopIteration:
                return
            except Exception:
                if self._token is not token:
                    raise
                self.close()  # DALI cannot go on after an error: the next iteration rebuilds
                if feed.error is not None or not self._set_aside_undecodable(feed):
                    raise  # the reader's own failure (feed.error) is not a file to set aside
                # A file that passed the header check but not the decoder: render the step again
                # on a fresh graph, that file replaced from now on.
                self._restart(epoch, step)
                token = self._token = object()
                pipe, feed = self._pipe, self._feed
                continue
            self.replaced += feed.replacements.popleft()
            plan = feed.plans.popleft()
            yield self._gpu_views(plan, outputs) if self.gpu else self._cpu_views(plan, outputs)
            step += 1
            if self._token is not token:
                raise RuntimeError("dali: this iteration was superseded by a newer one over the same loader")

    def _set_aside_undecodable(self, feed: _Feed) -> bool:
        """After a failed graph (its feed halted, so no reader sees the set
        change): the files of the steps in flight that DALI's decoder refuses
        on their own join the known-bad set; False when there are none (the
        failure was not a bad file)."""
        indices = sorted({i for plan in feed.plans for i in plan.index.tolist()} - self._known_bad)
        data, _ = read_checked(self.source, indices, self._known_bad)
        bad = {indices[k] for k in _undecodable(data, self.gpu, self.device_id)}
        self._known_bad |= bad
        return bool(bad)

    def _gpu_views(self, plan: BatchPlan, outputs) -> Views:
        """Each family's tiles copied contiguously on torch's stream, then
        coloured and normalised by the CUDA kernel into the training tensors."""
        views = self.bookkeeping(plan)
        stream = torch.cuda.current_stream(self.device_id).cuda_stream
        i = 0
        for group in self._groups:
            tiles = torch.empty((group.count, self.planner.rows, group.size, group.size, 3), dtype=torch.uint8,
                                device=self.device)
            for v in range(group.count):
                _copy_out(outputs[i + v], tiles[v], stream)
            i += group.count
            place_family(views, group, colour.render_group(group, plan, tiles, self.dtype))
        return views

    def _cpu_views(self, plan: BatchPlan, outputs) -> Views:
        views = self.bookkeeping(plan)
        # the Numba operator's outputs are normalised float32 already; pinned
        # host memory makes the copy to a GPU truly asynchronous
        normalised = self.mode == "numba"
        finish = self._to_training if normalised else self.normalize
        pinned = self.device.type == "cuda"
        i = 0
        for group in self._groups:
            n, s = group.outputs, group.out_size
            pixels = torch.empty((n, self.planner.rows, s, s, 3), dtype=torch.float32 if normalised else torch.uint8,
                                 pin_memory=pinned)
            for v in range(n):
                _copy_out(outputs[i + v], pixels[v])
            i += n
            if group.kind == "mosaic":
                fill = colour.MOSAIC_FILL_NORMALISED if normalised else np.asarray(MOSAIC_FILL, np.uint8)
                pixels = _fill_uncovered(pixels[0], plan.mosaic.shift, fill)
            place_family(views, group, finish(pixels))
        return views

    def _to_training(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised [..., H, W, C] -> [..., C, H, W] in the training dtype and device."""
        return pixels.to(self.device, self.dtype, non_blocking=True).movedim(-1, -3)


_TORCH_TYPES = {types.UINT8: torch.uint8, types.FLOAT: torch.float32}


def _copy_out(batch, dest: torch.Tensor, stream: int | None = None) -> None:
    """An output TensorList into `dest`, a contiguous tensor of its shape:
    checked first, as a raw copy of the wrong size writes out of bounds. A
    GPU copy goes on `stream` (a cudaStream_t, wrapped as DALI reads it:
    through ctypes.c_void_p's value; a bare int would fall back to the
    legacy default stream) as one kernel even when the batch's samples are
    not contiguous."""
    shapes = [tuple(s) for s in batch.shape()]
    if len(shapes) != dest.shape[0] or any(s != tuple(dest.shape[1:]) for s in shapes):
        raise RuntimeError(f"dali: an output of {len(shapes)} samples shaped {sorted(set(shapes))} cannot fill "
                           f"a tensor of {tuple(dest.shape)}")
    if _TORCH_TYPES.get(batch.dtype) != dest.dtype or not dest.is_contiguous():
        raise RuntimeError(f"dali: an output of {batch.dtype} cannot fill a {dest.dtype} tensor "
                           f"(contiguous: {dest.is_contiguous()})")
    ptr = ctypes.c_void_p(dest.data_ptr())
    if stream is None:
        batch.copy_to_external(ptr)
    else:
        batch.copy_to_external(ptr, ctypes.c_void_p(stream), non_blocking=True, use_copy_kernel=True)

"""DALI pipeline: one graph built from the ViewSpec renders every step's plan.

Per step (batch B), in the graph:

    bytes ─► decoders.image (nvJPEG 'mixed' on the GPU, 'cpu' otherwise; RGB, EXIF applied), once
      └─► per view: resize of the plan's window (ROI, antialiased bilinear; mirrored by swapping x)
            ─► colour jitter in the plan's order ─► grayscale ─► gaussian blur ─► solarize
      └─► mosaic: cat each image's M tiles into a strip, multi_paste by the plan's paste table
          (the band the jitter uncovers then takes the reference's MOSAIC_FILL, in torch)

Bytes and plan arrays enter through one batch-mode `fn.external_source`
whose callback plans step s, reads its files and queues the plan. DALI
calls it in step order, on the thread that runs the pipeline, while its own
threads render earlier steps; the queue pairs every output batch with its
plan however far DALI prefetches. A new iteration drains what was
prefetched for the old one (after a `break`, or a resume).

How the plan's semantics (pipelines/torchvision.py, PIL) are kept:
- Crop windows are ROIs relative to the decoded image (`roi_relative`),
  clipped to [0, 1] on the way in, so no window can leave the image (an
  absolute one outside it crashes DALI) even when an index's sizes disagree
  with the decoder. A flip swaps the ROI's x ends: the resize mirrors. Interior
  pixels match PIL's resize within one level; DALI's outermost row and
  column may differ more, as it samples up to 0.4 px beyond the window.
- CPU graph: everything after the resize is one Numba operator per view
  that reproduces torchvision-on-PIL bit for bit: brightness, contrast
  (about the rounded mean of the 'L' image), saturation (blend with 'L')
  and hue (PIL's HSV round trip, shift in 1/255 of the circle), each
  truncating like PIL's Image.blend, applied in the plan's order; 'L'
  grayscale; torchvision's Gaussian as two 1-D passes (float32, reflect
  borders, rounded: one level off on rare pixels from the summation order,
  and 5x faster than DALI's CPU gaussian_blur); solarize.
- GPU graph (no Numba CUDA here): DALI operators. Each of the four jitter
  slots is one arithmetic expression a*x + b*L + d*mean(L) that is the
  slot's brightness, contrast or saturation (identity otherwise; exact to
  PIL but for rounding ties), then `color_twist(hue)`, a rotation in YIQ
  space: hue is the one operation whose semantics differ from torchvision's
  HSV shift (by ~10 levels on average at MoCo-v2's hue 0.1). Blur and
  solarize run under DALI conditionals (`gaussian_blur`, reflect-101,
  within one level; a lookup table). The mixed decoder upsamples chroma
  like libjpeg-turbo.
Operations whose AugSpec probability is 0 are left out of the graph.

Normalisation: the CPU graph's Numba operator ends every view by writing
it normalised, float32 HWC, so that pass runs on DALI's threads instead of
the training loop's (on 2 cores it was ~45% of the main thread's time); the
mosaic is pasted from normalised tiles. The GPU graph (and colour='dali')
hands out uint8 HWC, normalised by the loader's `normalize` (the torchvision
pipeline's code) on the device. Either way every crops[name][i] is a
channels_last [B, C, H, W] view of [count, B, H, W, C] memory.
"""
from __future__ import annotations

import collections
import ctypes
import math
from dataclasses import dataclass
from typing import Iterator

import numba
import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from .base import PipelineError, PlannedLoader
from .plan import BatchPlan, CropPlan
from .torchvision import MOSAIC_FILL
from .views import MEAN, STD, AugSpec, Views

# Subtracted before DALI's round-to-nearest conversion to uint8 so that it
# truncates like PIL's Image.blend.
_TRUNC = 0.499
_SOLARIZE = [i if i < 128 else 255 - i for i in range(256)]
# The CPU operator's per-view parameter vector (float32).
_P_JITTER, _P_ORDER, _P_B, _P_C, _P_S, _P_H, _P_GRAY, _P_SIGMA, _P_KERNEL, _P_SOLARIZE = 0, 1, 5, 6, 7, 8, 9, 10, 11, 12
_P_LEN = 13
# x * scale + shift = (x / 255 - MEAN) / STD, in float32 as PlannedLoader.normalize computes it.
_MEAN255, _STD255 = np.asarray(MEAN, np.float32) * np.float32(255), np.asarray(STD, np.float32) * np.float32(255)
_NORM_SCALE, _NORM_SHIFT = np.float32(1) / _STD255, -_MEAN255 / _STD255


# ---------------------------------------------------------------- static layout
@dataclass(frozen=True)
class _Group:
    """Views rendered from one CropPlan: a crop family, the original, or the mosaic's tiles."""
    kind: str   # 'crops', 'original' or 'mosaic'
    name: str
    count: int
    size: int
    augs: tuple

    def plan(self, plan: BatchPlan) -> CropPlan:
        if self.kind == "crops":
            return plan.crops[self.name]
        return plan.original if self.kind == "original" else plan.mosaic.crops

    @property
    def outputs(self) -> int:  # the mosaic's tiles leave the graph pasted, as one canvas
        return 1 if self.kind == "mosaic" else self.count

    @property
    def out_size(self) -> int:
        return self.size * math.isqrt(self.count) if self.kind == "mosaic" else self.size


def _groups(spec) -> list:
    groups = [_Group("crops", c.name, c.count, c.size, tuple(c.aug(v) for v in range(c.count))) for c in spec.crops]
    if spec.original is not None:
        groups.append(_Group("original", "original", 1, spec.original.size, (spec.original.aug,)))
    if spec.mosaic is not None:
        m = spec.mosaic
        groups.append(_Group("mosaic", "mosaic", m.crops_per_image, m.crop_size, (m.aug,) * m.crops_per_image))
    return groups


def _mode(p: float) -> str:
    """How an operation of probability p enters the graph."""
    return "off" if p <= 0 else "on" if p >= 1 else "cond"


@dataclass(frozen=True)
class _View:
    """View v of group g, and the graph inputs its AugSpec needs."""
    g: int
    v: int
    aug: AugSpec

    def keys(self, native: bool) -> list:
        a, k = self.aug, f"{self.g}.{self.v}."
        keys = [k + "start", k + "end"]
        if not native:  # the CPU operator runs on every view: it also normalises
            return keys + [k + "p"]
        if a.jitter_p > 0:
            keys += [k + f"{p}{i}" for i in range(4) for p in "abdh"]
        if a.grayscale_p > 0:
            keys.append(k + "g")
        if _mode(a.blur_p) == "cond":
            keys.append(k + "blur")
        if a.blur_p > 0:
            keys.append(k + "sigma")
        if _mode(a.solarize_p) == "cond":
            keys.append(k + "sol")
        return keys


_MOSAIC_KEYS = ["in_ids", "in_anchors", "shapes", "out_anchors"]
_TYPES = {"bytes": (types.UINT8, 1), "start": (types.FLOAT, 1), "end": (types.FLOAT, 1), "p": (types.FLOAT, 1),
          "blur": (types.BOOL, 0), "sol": (types.BOOL, 0), "in_ids": (types.INT32, 1),
          "in_anchors": (types.INT32, 2), "shapes": (types.INT32, 2), "out_anchors": (types.INT32, 2)}


def _type(key: str) -> tuple:
    """(DALI type, sample ndim) of an input, from its name's last part."""
    return _TYPES.get(key.rsplit(".", 1)[-1], (types.FLOAT, 0))  # the rest: float scalars


# ---------------------------------------------------------------- the feed
class _Feed:
    """The external_source callback. Each call plans the next step of the
    epoch, reads its files and returns every graph input; the plan waits in
    `plans` until the batch rendered from it is taken out."""

    def __init__(self, planner, source, groups, views, keys, native):
        self.planner, self.source = planner, source
        self.groups, self.views, self.keys, self.native = groups, views, keys, native
        self.plans = collections.deque()
        self.epoch, self.step, self.stop = 0, 0, True

    def __call__(self):
        if self.stop or self.step >= self.planner.steps_per_epoch:
            raise StopIteration
        plan = self.planner.plan(self.epoch, self.step)
        arrays = self.arrays(plan)
        batch = [arrays[k] for k in self.keys]
        self.plans.append(plan)
        self.step += 1
        return batch

    def arrays(self, plan: BatchPlan) -> dict:
        """Every input of `plan` by name; numpy, batch first, vectorised over views."""
        out = {"bytes": self.source.read_many(plan.index.tolist())}
        width = self.planner.widths[plan.index].astype(np.float64)
        height = self.planner.heights[plan.index].astype(np.float64)
        for g, group in enumerate(self.groups):
            cp = group.plan(plan)
            arr = _window_arrays(cp, width, height)
            arr.update(_native_arrays(cp) if self.native else {"p": _cpu_params(cp, group)})
            for view in self.views[g]:
                skip = len(f"{g}.{view.v}.")
                for key in view.keys(self.native):
                    out[key] = arr[key[skip:]][view.v]
            if group.kind == "mosaic":
                out.update(_paste_arrays(plan.mosaic, group.size))
        return out


def _window_arrays(cp: CropPlan, width, height) -> dict:
    """roi_start / roi_end float32 [count, B, 2]: (y, x) as fractions of the
    decoded image; a flipped view has its x ends swapped."""
    top, left, h, w = (cp.window[..., i].astype(np.float64) for i in range(4))
    x0 = np.where(cp.flip, left + w, left)
    x1 = np.where(cp.flip, left, left + w)
    start = np.stack([top / height, x0 / width], axis=-1)
    end = np.stack([(top + h) / height, x1 / width], axis=-1)
    return {"start": np.clip(start, 0, 1).astype(np.float32), "end": np.clip(end, 0, 1).astype(np.float32)}


def _cpu_params(cp: CropPlan, group: _Group) -> np.ndarray:
    """float32 [count, B, 13] for the CPU operator (layout: the _P_* columns)."""
    p = np.zeros(cp.window.shape[:2] + (_P_LEN,), np.float32)
    p[..., _P_JITTER] = cp.jitter
    p[..., _P_ORDER:_P_ORDER + 4] = cp.order
    p[..., _P_B:_P_H] = cp.factors[..., :3]
    # torchvision's PIL hue shift: int32(h * 255) mod 256 steps of H
    p[..., _P_H] = (cp.factors[..., 3].astype(np.float64) * 255).astype(np.int32) & 255
    p[..., _P_GRAY] = cp.gray
    p[..., _P_SIGMA] = cp.sigma
    p[..., _P_KERNEL] = np.array([a.blur_kernel(group.size) for a in group.augs], np.float32)[:, None]
    p[..., _P_SOLARIZE] = cp.solarize
    return p


def _native_arrays(cp: CropPlan) -> dict:
    """Scalars of the DALI-operator path, float32 [count, B] (bool for the
    conditionals): jitter slot i maps x to a*x + b*L + d*mean(L) (L: the 'L'
    image), then rotates hue by h degrees; the slot's operation sets its
    values, the rest stay identity (all four slots are identity without jitter)."""
    f = cp.factors
    op = np.where(cp.jitter[..., None], cp.order, -1)  # [count, B, 4]
    fb, fc, fs, fh = (f[..., i:i + 1] for i in range(4))
    a = np.select([op == 0, op == 1, op == 2], [fb, fc, fs], 1)
    b = np.where(op == 2, 1 - fs, 0)
    d = np.where(op == 1, 1 - fc, 0)
    h = np.where(op == 3, fh * 360, 0)
    out = {"g": cp.gray, "blur": cp.sigma > 0, "sol": cp.solarize,
           "sigma": np.maximum(cp.sigma, 1e-3)}  # sigma 0 is refused; unused then
    for i in range(4):
        out.update({f"a{i}": a[..., i], f"b{i}": b[..., i], f"d{i}": d[..., i], f"h{i}": h[..., i]})
    return {k: np.ascontiguousarray(v, np.bool_ if v.dtype == np.bool_ and k != "g" else np.float32)
            for k, v in out.items()}


def _paste_arrays(mosaic, crop: int) -> dict:
    """multi_paste's tables, int32 [B, M, ...]: tile t of canvas c is rows
    [tile_crop * crop + src_y, + h) and columns [src_x, + w) of image
    tile_src's strip of M tiles, pasted at (dst_y, dst_x)."""
    p = mosaic.paste
    in_anchors = np.stack([mosaic.tile_crop * crop + p[..., 0], p[..., 1]], axis=-1)
    return {"in_ids": np.ascontiguousarray(mosaic.tile_src, np.int32),
            "in_anchors": np.ascontiguousarray(in_anchors, np.int32),
            "shapes": np.ascontiguousarray(p[..., 2:4], np.int32),
            "out_anchors": np.ascontiguousarray(p[..., 4:6], np.int32)}


# ---------------------------------------------------------------- the graph
@pipeline_def(enable_conditionals=True)
def _graph(feed: _Feed, gpu: bool, cpu_op):
    keys = feed.keys
    inputs = dict(zip(keys, fn.external_source(source=feed, num_outputs=len(keys), batch=True,
                                                dtype=[_type(k)[0] for k in keys],
                                                ndim=[_type(k)[1] for k in keys])))
    # fancy upsampling: nvJPEG's chroma upsampling as libjpeg-turbo's (the CPU graph's and PIL's)
    image = (fn.decoders.image(inputs["bytes"], device="mixed", output_type=types.RGB, jpeg_fancy_upsampling=True)
             if gpu else fn.decoders.image(inputs["bytes"], device="cpu", output_type=types.RGB))
    outputs = []
    for g, group in enumerate(feed.groups):
        views = [_view(image, inputs, view, group.size, feed.native, gpu, cpu_op) for view in feed.views[g]]
        if group.kind != "mosaic":
            outputs.extend(views)
            continue
        strip = fn.cat(*views, axis=0) if len(views) > 1 else views[0]  # [M * s, s, 3]
        outputs.append(fn.multi_paste(strip, in_ids=inputs["in_ids"], in_anchors=inputs["in_anchors"],
                                      shapes=inputs["shapes"], out_anchors=inputs["out_anchors"],
                                      output_size=[group.out_size] * 2))
    return tuple(outputs)


def _view(image, inputs: dict, view: _View, size: int, native: bool, gpu: bool, cpu_op):
    """One view of every sample: [s, s, 3] uint8 HWC."""
    k = f"{view.g}.{view.v}."
    x = fn.resize(image, size=[size, size], roi_start=inputs[k + "start"], roi_end=inputs[k + "end"],
                  roi_relative=True, interp_type=types.INTERP_LINEAR, antialias=True)
    if not native:  # the operator's output has no layout; later operators need HWC
        return fn.reshape(cpu_op(x, inputs[k + "p"]), layout="HWC")
    x = _native_colour(x, inputs, k, gpu)
    if k + "sigma" in inputs:
        window = view.aug.blur_kernel(size)
        if k + "blur" in inputs:
            blurred = inputs[k + "blur"]
            if blurred:  # a DALI conditional: only the blurred samples are computed
                x = fn.gaussian_blur(x, window_size=window, sigma=inputs[k + "sigma"])
        else:
            x = fn.gaussian_blur(x, window_size=window, sigma=inputs[k + "sigma"])
    if view.aug.solarize_p > 0:
        if k + "sol" in inputs:
            solarized = inputs[k + "sol"]
            if solarized:
                x = fn.lookup_table(x, keys=list(range(256)), values=_SOLARIZE, dtype=types.UINT8)
        else:
            x = fn.lookup_table(x, keys=list(range(256)), values=_SOLARIZE, dtype=types.UINT8)
    return x


def _native_colour(x, inputs: dict, k: str, gpu: bool):
    """The four jitter slots, then grayscale, with DALI operators (when the AugSpec has them)."""
    from nvidia.dali import math as dmath

    def arg(name):  # per-sample scalars enter GPU arithmetic as GPU tensors
        node = inputs[k + name]
        return node.gpu() if gpu else node

    if k + "a0" in inputs:
        for i in range(4):
            luma = fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY)
            centre = dmath.floor(fn.reductions.mean(luma) + 0.5)
            mixed = arg(f"a{i}") * x + arg(f"b{i}") * luma + arg(f"d{i}") * centre - _TRUNC
            x = fn.color_twist(fn.cast(mixed, dtype=types.UINT8), hue=inputs[k + f"h{i}"])
    if k + "g" in inputs:
        luma = fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY)
        g = arg("g")  # 0 or 1: exact either way
        x = fn.cast(g * luma + (1.0 - g) * x, dtype=types.UINT8)
    return x


def _fill_uncovered(canvas: torch.Tensor, shift: np.ndarray, fill: torch.Tensor) -> torch.Tensor:
    """The band a canvas's jitter uncovers (multi_paste leaves it 0) takes
    `fill`, the reference's MOSAIC_FILL in the canvas's dtype (normalised
    when the canvas is). canvas [B, S, S, 3]; shift [B, 2] (dx, dy). A CPU
    canvas is filled in place, band only (a masked select over the whole
    canvas cost more than the rest of the main thread's work)."""
    if canvas.device.type == "cpu":
        _fill_band(canvas.numpy(), np.ascontiguousarray(shift, np.int64), fill.to(canvas.dtype).numpy())
        return canvas
    s = canvas.shape[1]
    d = torch.as_tensor(shift, dtype=torch.int64).to(canvas.device)
    at = torch.arange(s, device=canvas.device)
    rows = (at >= d[:, 1:].clamp(min=0)) & (at < s + d[:, 1:].clamp(max=0))  # [B, S]
    cols = (at >= d[:, :1].clamp(min=0)) & (at < s + d[:, :1].clamp(max=0))
    covered = (rows[:, :, None] & cols[:, None, :])[..., None]
    return torch.where(covered, canvas, fill.to(canvas.device))


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


# ---------------------------------------------------------------- the loader
class DaliLoader(PlannedLoader):
    """The plan rendered by DALI: the GPU graph (nvJPEG, GPU operators) when
    the loader's device is CUDA, else, or with `cpu=True`, the CPU graph
    (its tensors then move to the device). `colour='dali'` makes the CPU
    graph use the GPU graph's DALI colour operators (for tests)."""
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
        if colour == "numba" and (self.gpu or _cpu_operator() is None):
            raise PipelineError("dali: colour='numba' needs the CPU graph and DALI's Numba plugin")
        self.native = colour == "dali" or self.gpu or _cpu_operator() is None
        self._groups = _groups(spec)
        self._views = [[_View(g, v, a) for v, a in enumerate(group.augs)] for g, group in enumerate(self._groups)]
        self._keys = ["bytes"] + [k for views in self._views for view in views for k in view.keys(self.native)]
        if spec.mosaic is not None:
            self._keys += _MOSAIC_KEYS
        self._pipe, self._feed, self._token = None, None, None

    # -- the graph's lifetime -------------------------------------------------
    def _build(self):
        self._feed = _Feed(self.planner, self.source, self._groups, self._views, self._keys, self.native)
        pipe = _graph(self._feed, self.gpu, None if self.native else _cpu_operator(), batch_size=self.planner.rows,
                      num_threads=max(1, self.workers), device_id=self.device_id, prefetch_queue_depth=2)
        pipe.build()
        self._pipe = pipe

    def _restart(self, epoch: int, start: int):
        """Point the feed at (epoch, start) after taking out, and dropping,
        whatever the graph prefetched for an earlier iteration."""
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
        feed = self._feed
        feed.plans.clear()
        feed.epoch, feed.step, feed.stop = epoch, start, False

    def close(self) -> None:
        self._pipe, self._feed, self._token = None, None, None

    # -- rendering ------------------------------------------------------------
    def _render(self, epoch: int, start: int) -> Iterator[Views]:
        self._restart(epoch, start)
        token = self._token = object()  # a newer iteration takes over the graph
        pipe, feed = self._pipe, self._feed
        while True:
            try:
                outputs = pipe.run()
            except StopIteration:
                return
            except Exception:
                if self._token is token:
                    self.close()  # DALI cannot go on after an error: the next iteration rebuilds
                raise
            yield self._views_of(feed.plans.popleft(), outputs)
            if self._token is not token:
                raise RuntimeError("dali: this iteration was superseded by a newer one over the same loader")

    def _views_of(self, plan: BatchPlan, outputs) -> Views:
        views = self.bookkeeping(plan)
        device = torch.device("cuda", self.device_id) if self.gpu else torch.device("cpu")
        # the CPU operator's outputs are normalised float32 already
        normalised = not self.native
        finish = self._to_training if normalised else self.normalize
        i = 0
        for group in self._groups:
            n, s = group.outputs, group.out_size
            pixels = torch.empty((n, self.planner.rows, s, s, 3), dtype=torch.float32 if normalised else torch.uint8,
                                 device=device)
            for v in range(n):
                self._copy(outputs[i + v], pixels[v])
            i += n
            if group.kind == "crops":
                views.crops[group.name] = finish(pixels)
            elif group.kind == "original":
                views.original = finish(pixels[0])
            else:
                fill = torch.tensor(MOSAIC_FILL, dtype=torch.uint8)
                if normalised:
                    fill = torch.from_numpy(fill.numpy() * _NORM_SCALE + _NORM_SHIFT)
                views.mosaic = finish(_fill_uncovered(pixels[0], plan.mosaic.shift, fill))
        return views

    def _to_training(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised float32 [..., H, W, C] -> [..., C, H, W] in the training dtype and device."""
        return pixels.to(self.device, self.dtype, non_blocking=True).movedim(-1, -3)

    def _copy(self, batch, dest: torch.Tensor):
        """An output TensorList into a contiguous tensor of its shape."""
        ptr = ctypes.c_void_p(dest.data_ptr())
        if self.gpu:
            batch.copy_to_external(ptr, torch.cuda.current_stream(dest.device).cuda_stream, non_blocking=True)
        else:
            batch.copy_to_external(ptr)


# ---------------------------------------------------------------- the CPU operator
# torchvision's ops on PIL images redone with Pillow's own arithmetic
# (Blend.c, Convert.c, ImageEnhance) and torchvision's Gaussian: float32
# where they compute in float, float64 where Pillow mixes in double
# literals, truncation where it casts. Checked against PIL on all 2**24
# colours (the HSV round trip) and on photos (blends, blur).

@numba.njit(cache=True, inline="always")
def _luma(r, g, b):
    """PIL's RGB -> 'L' (ITU-R 601-2, fixed point, rounded)."""
    return (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16


@numba.njit(cache=True, inline="always")
def _blend(base, value, alpha):
    """Image.blend(base, value, alpha) of one channel value, as Pillow: the
    float result truncated, clipped only when alpha leaves [0, 1]."""
    v = np.float32(base) + alpha * np.float32(value - base)
    if alpha >= 0 and alpha <= 1:
        return np.uint8(int(v))
    if v <= 0.0:
        return np.uint8(0)
    if v >= 255.0:
        return np.uint8(255)
    return np.uint8(int(v))


@numba.njit(cache=True)
def _brightness(x, alpha):
    h, w, _ = x.shape
    for i in range(h):
        for j in range(w):
            for c in range(3):
                x[i, j, c] = _blend(0, np.int64(x[i, j, c]), alpha)


@numba.njit(cache=True)
def _contrast(x, alpha):
    """ImageEnhance.Contrast: blend with the 'L' image's mean, rounded."""
    h, w, _ = x.shape
    total = 0
    for i in range(h):
        for j in range(w):
            total += _luma(np.int64(x[i, j, 0]), np.int64(x[i, j, 1]), np.int64(x[i, j, 2]))
    mean = np.int64(total / (h * w) + 0.5)
    for i in range(h):
        for j in range(w):
            for c in range(3):
                x[i, j, c] = _blend(mean, np.int64(x[i, j, c]), alpha)


@numba.njit(cache=True)
def _saturation(x, alpha):
    """ImageEnhance.Color: blend with the pixel's 'L' value."""
    h, w, _ = x.shape
    for i in range(h):
        for j in range(w):
            lum = _luma(np.int64(x[i, j, 0]), np.int64(x[i, j, 1]), np.int64(x[i, j, 2]))
            for c in range(3):
                x[i, j, c] = _blend(lum, np.int64(x[i, j, c]), alpha)


@numba.njit(cache=True, inline="always")
def _rgb_to_hsv(r, g, b):
    """Pillow's rgb2hsv_row for one pixel (uint8 H, S, V)."""
    maxc = max(r, max(g, b))
    minc = min(r, min(g, b))
    if minc == maxc:
        return np.int64(0), np.int64(0), maxc
    cr = np.float32(maxc - minc)
    s = cr / np.float32(maxc)
    rc = np.float32(maxc - r) / cr
    gc = np.float32(maxc - g) / cr
    bc = np.float32(maxc - b) / cr
    if r == maxc:
        h = bc - gc
    elif g == maxc:
        h = np.float32(2.0 + np.float64(rc) - np.float64(bc))
    else:
        h = np.float32(4.0 + np.float64(gc) - np.float64(rc))
    hh = np.float64(h) / 6.0 + 1.0
    h = np.float32(hh - math.floor(hh))
    return (np.int64(min(max(int(np.float64(h) * 255.0), 0), 255)),
            np.int64(min(max(int(np.float64(s) * 255.0), 0), 255)), maxc)


@numba.njit(cache=True, inline="always")
def _round_clip(v):
    return np.uint8(min(max(int(math.floor(v + 0.5)), 0), 255))


@numba.njit(cache=True)
def _hue(x, shift):
    """torchvision's PIL adjust_hue: H += shift (mod 256) in PIL's HSV."""
    hgt, wid, _ = x.shape
    for i in range(hgt):
        for j in range(wid):
            h, s, v = _rgb_to_hsv(np.int64(x[i, j, 0]), np.int64(x[i, j, 1]), np.int64(x[i, j, 2]))
            if s == 0:
                continue  # grey: the round trip returns it unchanged
            h = (h + shift) & 255
            # Pillow's hsv2rgb
            sector = int(math.floor(h * 6.0 / 255.0))
            f = np.float32(h * 6.0 / 255.0 - sector)
            fs = np.float32(s / 255.0)
            vv = np.uint8(v)
            p = _round_clip(v * (1.0 - fs))
            q = _round_clip(v * (1.0 - fs * f))
            t = _round_clip(v * (1.0 - fs * (1.0 - f)))
            sector %= 6
            if sector == 0:
                r, g, b = vv, t, p
            elif sector == 1:
                r, g, b = q, vv, p
            elif sector == 2:
                r, g, b = p, vv, t
            elif sector == 3:
                r, g, b = p, q, vv
            elif sector == 4:
                r, g, b = t, p, vv
            else:
                r, g, b = vv, p, q
            x[i, j, 0], x[i, j, 1], x[i, j, 2] = r, g, b


@numba.njit(cache=True)
def _grayscale(x):
    h, w, _ = x.shape
    for i in range(h):
        for j in range(w):
            lum = np.uint8(_luma(np.int64(x[i, j, 0]), np.int64(x[i, j, 1]), np.int64(x[i, j, 2])))
            x[i, j, 0], x[i, j, 1], x[i, j, 2] = lum, lum, lum


@numba.njit(cache=True)
def _gaussian(k, sigma):
    """torchvision's _get_gaussian_kernel1d in float32 (x = -r..r, exact)."""
    r = (k - 1) // 2
    w = np.empty(k, np.float32)
    total = np.float32(0)
    for i in range(k):
        t = np.float32(i - r) / np.float32(sigma)
        w[i] = np.float32(math.exp(np.float32(-0.5) * t * t))
        total += w[i]
    for i in range(k):
        w[i] /= total
    return w


@numba.njit(cache=True, inline="always")
def _reflect(i, n):
    """torch's 'reflect' padding (edge not repeated; DALI's reflect-101)."""
    if i < 0:
        return -i
    if i >= n:
        return 2 * n - 2 - i
    return i


@numba.njit(cache=True)
def _blur(x, k, sigma):
    """torchvision's gaussian_blur (k x k, reflect borders, float32, then
    rounded) as two 1-D passes: its 2-D kernel is their outer product."""
    h, w, c = x.shape
    r = k // 2
    wt = _gaussian(k, sigma)
    rows = np.empty((h, w * c), np.float32)
    padded = np.empty((w + 2 * r) * c, np.float32)
    for y in range(h):
        for i in range(-r, w + r):
            src = _reflect(i, w)
            for ch in range(c):
                padded[(i + r) * c + ch] = x[y, src, ch]
        out = rows[y]
        out[:] = 0
        for j in range(k):
            kj, off = wt[j], j * c
            for i in range(w * c):
                out[i] += kj * padded[off + i]
    acc = np.empty(w * c, np.float32)
    for y in range(h):
        acc[:] = 0
        for j in range(k):
            kj, src = wt[j], rows[_reflect(y + j - r, h)]
            for i in range(w * c):
                acc[i] += kj * src[i]
        for i in range(w):
            for ch in range(c):
                # torch.round: half to even, as np.rint
                x[y, i, ch] = np.uint8(min(max(np.rint(acc[i * c + ch]), 0), 255))


@numba.njit(cache=True)
def _solarize(x):
    h, w, _ = x.shape
    for i in range(h):
        for j in range(w):
            for c in range(3):
                if x[i, j, c] >= 128:
                    x[i, j, c] = 255 - x[i, j, c]


@numba.njit(cache=True)
def augment(out, image, p):
    """All that follows the resize, for one view of one sample, as
    pipelines.torchvision.render_view: out = image after colour jitter in
    the order p[1:5] (0 brightness, 1 contrast, 2 saturation, 3 hue) when
    p[0], grayscale when p[9], a p[11]-tap blur of sigma p[10] when p[10] > 0,
    solarize when p[12]. out, image: (H, W, 3) uint8; p: `_cpu_params`."""
    out[:] = image
    if p[_P_JITTER] > 0.5:
        for k in range(4):
            op = int(p[_P_ORDER + k])
            if op == 0:
                _brightness(out, p[_P_B])
            elif op == 1:
                _contrast(out, p[_P_C])
            elif op == 2:
                _saturation(out, p[_P_S])
            else:
                _hue(out, np.int64(p[_P_H]))
    if p[_P_GRAY] > 0.5:
        _grayscale(out)
    if p[_P_SIGMA] > 0:
        _blur(out, int(p[_P_KERNEL]), p[_P_SIGMA])
    if p[_P_SOLARIZE] > 0.5:
        _solarize(out)


@numba.njit(cache=True)
def render(out, image, p):
    """The CPU operator's whole work for one view of one sample: `augment`
    (skipped, with its copy, when p asks for nothing), then normalisation
    into out: (H, W, 3) float32; image: (H, W, 3) uint8."""
    if p[_P_JITTER] > 0.5 or p[_P_GRAY] > 0.5 or p[_P_SIGMA] > 0 or p[_P_SOLARIZE] > 0.5:
        src = np.empty_like(image)
        augment(src, image, p)
    else:
        src = image
    h, w, _ = src.shape
    scale, shift = _NORM_SCALE, _NORM_SHIFT
    for y in range(h):
        for x in range(w):
            for c in range(3):
                out[y, x, c] = np.float32(src[y, x, c]) * scale[c] + shift[c]


# DALI's numba_function operator calls C functions of the signatures below
# (see nvidia/dali/plugin/numba); its Python wrapper compiles new ones for
# every operator it makes (seconds each), so ours are compiled once, cached
# on disk, and their addresses handed to the operator.
@numba.extending.intrinsic
def _void_ptr(typingctx, address):
    sig = numba.types.voidptr(address)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], numba.core.cgutils.voidptr_t)
    return sig, codegen


def _run(out_ptr, out_shapes_ptr, out_ndims_ptr, num_outs, in_ptr, in_shapes_ptr, in_ndims_ptr, num_ins):
    """One sample: inputs (image HWC uint8, p float32[13]), output image HWC float32, normalised."""
    outs = numba.carray(_void_ptr(out_ptr), 1, dtype=np.int64)
    ins = numba.carray(_void_ptr(in_ptr), 2, dtype=np.int64)
    shapes = numba.carray(_void_ptr(in_shapes_ptr), 2, dtype=np.int64)  # per input: its shape's address
    shape = numba.carray(_void_ptr(shapes[0]), 3, dtype=np.int64)
    image = numba.carray(_void_ptr(ins[0]), (shape[0], shape[1], shape[2]), dtype=np.uint8)
    out = numba.carray(_void_ptr(outs[0]), (shape[0], shape[1], shape[2]), dtype=np.float32)
    render(out, image, numba.carray(_void_ptr(ins[1]), _P_LEN, dtype=np.float32))


def _setup(out_shapes_ptr, out_ndims_ptr, num_outs, in_shapes_ptr, in_ndims_ptr, num_ins, num_samples):
    """Every sample's output shape is its image's."""
    outs = numba.carray(_void_ptr(out_shapes_ptr), num_samples, dtype=np.int64)
    ins = numba.carray(_void_ptr(in_shapes_ptr), num_samples, dtype=np.int64)  # input 0's come first
    for i in range(num_samples):
        src = numba.carray(_void_ptr(ins[i]), 3, dtype=np.int64)
        dst = numba.carray(_void_ptr(outs[i]), 3, dtype=np.int64)
        for d in range(3):
            dst[d] = src[d]


_CPU_OPERATOR = []


def _cpu_operator():
    """A new instance of the CPU operator (ops API), or None without DALI's
    Numba plugin. The C functions are compiled on the first call."""
    if not _CPU_OPERATOR:
        try:
            from nvidia.dali.plugin.numba import NumbaFunction
        except ImportError:
            NumbaFunction = None
        if not (hasattr(NumbaFunction, "_get_run_fn_cpu") and hasattr(NumbaFunction, "_get_setup_fn_cpu")):
            _CPU_OPERATOR.append(None)  # no plugin, or one whose internals changed: DALI's own operators
            return None
        u64, i32 = numba.types.uint64, numba.types.int32
        run = numba.cfunc(numba.types.void(u64, u64, u64, i32, u64, u64, u64, i32), nopython=True, cache=True)(_run)
        setup = numba.cfunc(numba.types.void(u64, u64, i32, u64, u64, i32, i32), nopython=True, cache=True)(_setup)

        class Precompiled(NumbaFunction):
            # DALI compiles run_fn / setup_fn here; ours arrive as addresses
            def _get_run_fn_cpu(self, run_fn, *args):
                return run_fn

            def _get_setup_fn_cpu(self, setup_fn):
                return setup_fn

        _CPU_OPERATOR.append((Precompiled, run.address, setup.address))
    if _CPU_OPERATOR[0] is None:
        return None
    cls, run, setup = _CPU_OPERATOR[0]
    return cls(run_fn=run, setup_fn=setup, out_types=[types.FLOAT], in_types=[types.UINT8, types.FLOAT],
               outs_ndim=[3], ins_ndim=[3, 1], batch_processing=False)

"""The reference pipeline: PIL (accimage when importable) and torchvision's
functional ops render the plan's parameters exactly.

DataLoader workers each render whole steps (one item = one step's plan), so
the main process only normalises one uint8 batch per view family. This is
the pipeline the others are tested against, and the baseline they are
benchmarked against.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import InterpolationMode

from . import colour, workers
from .base import PlannedLoader
from .data import replacement_image
from .plan import BatchPlan, CropPlan, Planner
from .render import decode
from .views import MOSAIC_FILL

try:  # optional faster decode and resize (conda only)
    import accimage
except ImportError:
    accimage = None


def render_view(img, plan: CropPlan, v: int, b: int) -> np.ndarray:
    """View v of sample b: crop, resize, flip, then the colour ops in
    MoCo-v2/BYOL order (jitter, grayscale, blur, solarize). HWC uint8."""
    top, left, h, w = (int(x) for x in plan.window[v, b])
    size = plan.size
    out = F.resized_crop(img, top, left, h, w, [size, size], InterpolationMode.BILINEAR, antialias=True)
    if plan.flip[v, b]:
        out = F.hflip(out)
    if accimage is not None and isinstance(out, accimage.Image):
        buf = np.empty((3, size, size), np.uint8)
        out.copyto(buf)
        out = Image.fromarray(buf.transpose(1, 2, 0))
    aug = plan.augs[v if len(plan.augs) > 1 else 0]
    if plan.jitter[v, b]:
        bright, contrast, sat, hue = (float(x) for x in plan.factors[v, b])
        strength = (aug.brightness, aug.contrast, aug.saturation, aug.hue)
        for op in plan.order[v, b]:
            if strength[op] == 0:  # ColorJitter leaves it out; PIL's adjust_hue(0) is a lossy round trip
                continue
            if op == 0:
                out = F.adjust_brightness(out, bright)
            elif op == 1:
                out = F.adjust_contrast(out, contrast)
            elif op == 2:
                out = F.adjust_saturation(out, sat)
            else:
                out = F.adjust_hue(out, hue)
    if plan.gray[v, b]:
        out = F.rgb_to_grayscale(out, num_output_channels=3)
    out = np.asarray(out, dtype=np.uint8)
    if plan.sigma[v, b] > 0:
        # torchvision's gaussian_blur convolves with the whole k x k kernel (62 ms
        # at 224 px and k = 23); its kernel is the outer product of two 1-D ones,
        # so two 1-D passes with the same float32 weights, reflect borders and
        # rounding give its result, within one level on rare values where the
        # summation order differs (tests/pipelines/test_colour.py)
        out = out.copy()
        colour.blur(out, aug.blur_kernel(size), np.float32(plan.sigma[v, b]))
    if plan.solarize[v, b]:
        out = np.where(out >= 128, 255 - out, out).astype(np.uint8)  # F.solarize(img, 128) on PIL
    return out


def render_family(images, plan: CropPlan) -> np.ndarray:
    """[count, B, H, W, 3] uint8 for every view of every image."""
    out = np.empty((plan.count, len(images), plan.size, plan.size, 3), np.uint8)
    for b, img in enumerate(images):
        for v in range(plan.count):
            out[v, b] = render_view(img, plan, v, b)
    return out


def paste_mosaics(tiles: np.ndarray, mosaic) -> np.ndarray:
    """Canvases [B, S, S, 3] from tiles [M, B, s, s, 3] by the plan's clipped
    paste table; uncovered pixels take MOSAIC_FILL."""
    batch, m = mosaic.tile_src.shape
    s = mosaic.canvas_size
    canvas = np.empty((batch, s, s, 3), np.uint8)
    canvas[:] = MOSAIC_FILL
    for c in range(batch):
        for t in range(m):
            sy, sx, h, w, dy, dx = (int(x) for x in mosaic.paste[c, t])
            tile = tiles[mosaic.tile_crop[c, t], mosaic.tile_src[c, t]]
            canvas[c, dy:dy + h, dx:dx + w] = tile[sy:sy + h, sx:sx + w]
    return canvas


def _open(source, i: int):
    """Image i, or None when its file no longer decodes to its indexed size."""
    size = (int(source.widths[i]), int(source.heights[i]))
    try:
        if accimage is not None and getattr(source, "members", None) is None:  # accimage reads files, not members
            img = accimage.Image(source.paths[i])
            # accimage ignores EXIF orientation; keep it only when the sizes agree
            # with the index (which stores sizes after orientation).
            if (img.width, img.height) == size:
                return img
        img = decode(source.read(i))
    except Exception:  # deleted, truncated or garbage since indexing: PIL raises many kinds
        return None
    return img if img.size == size else None


def render_plan(plan: BatchPlan, source) -> dict:
    """All pixels of one step: {'crops': {name: [count,B,H,W,3]}, 'original',
    'mosaic'} as uint8 tensors, and 'replaced': the indices of files that
    no longer decode, rendered from data.replacement_image instead."""
    images = [_open(source, int(i)) for i in plan.index]
    replaced = [int(i) for i, img in zip(plan.index, images) if img is None]
    images = [decode(replacement_image(source.widths[i], source.heights[i])) if img is None else img
              for i, img in zip(plan.index, images)]
    out = {"replaced": replaced,
           "crops": {name: torch.from_numpy(render_family(images, cp)) for name, cp in plan.crops.items()}}
    if plan.original is not None:
        out["original"] = torch.from_numpy(render_family(images, plan.original)[0])
    if plan.mosaic is not None:
        tiles = render_family(images, plan.mosaic.crops)
        out["mosaic"] = torch.from_numpy(paste_mosaics(tiles, plan.mosaic))
    return out


class _Steps(Dataset):
    """Item (epoch, step) -> (plan, pixels); runs in DataLoader workers."""

    def __init__(self, planner: Planner, source):
        self.planner, self.source = planner, source

    def __getitem__(self, key):
        epoch, step = key
        plan = self.planner.plan(epoch, step)
        return plan, render_plan(plan, self.source)


class _StepOrder(Sampler):
    """Yields (epoch, step) from the loader's position when iteration starts."""

    def __init__(self, loader: "TorchvisionLoader"):
        self.loader = loader

    def __iter__(self):
        epoch, start = self.loader._render_from
        return iter([(epoch, s) for s in range(start, len(self.loader))])

    def __len__(self):
        return len(self.loader)


class TorchvisionLoader(PlannedLoader):
    name = "torchvision"
    capabilities = frozenset({"crops", "asymmetric", "original", "mosaic", "pairs", "neighbours"})

    def __init__(self, spec, source, **kw):
        super().__init__(spec, source, **kw)
        self._render_from = (0, 0)
        # Each worker renders whole steps (pipelines/workers.py: one torch
        # thread each, signals left to the main process, gone with it).
        self._loader = DataLoader(
            _Steps(self.planner, source), batch_size=None, sampler=_StepOrder(self),
            # persistent workers would keep the planner (and its neighbour table) of their first epoch
            num_workers=self.workers, persistent_workers=self.workers > 0 and not spec.neighbours,
            prefetch_factor=2 if self.workers > 0 else None,
            pin_memory=self.device.type == "cuda", worker_init_fn=workers.worker_init_fn())

    def _render(self, epoch, start):
        self._render_from = (epoch, start)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pin_memory.*")
            it = workers.track(iter(self._loader))  # persistent workers: the same iterator every epoch
            try:
                yield from self._views(it)
            finally:
                if not self._loader.persistent_workers:  # else kept for the next epoch, stopped by close()
                    workers.stop(it)

    def _views(self, it):
        for plan, pixels in it:
            self.replaced += pixels["replaced"]
            views = self.bookkeeping(plan)
            views.crops = {k: self.normalize(v) for k, v in pixels["crops"].items()}
            if "original" in pixels:
                views.original = self.normalize(pixels["original"])
            if "mosaic" in pixels:
                views.mosaic = self.normalize(pixels["mosaic"])
            yield views

    def close(self):
        loader = getattr(self, "_loader", None)  # None when __init__ failed before making it
        if loader is not None:
            workers.stop(getattr(loader, "_iterator", None))
            loader._iterator = None
        super().close()

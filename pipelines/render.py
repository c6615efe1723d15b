"""What every renderer shares, so that no backend imports another.

The render stage turns a BatchPlan into pixels; each backend (dali.py,
ffcv.py, torchvision.py, synthetic.py) is only the glue for its engine.
What they have in common lives here and in pipelines/colour.py (everything
after a view's resize, for the CPU and CUDA):

- `decode`: encoded bytes to the RGB image every pipeline's pixels are
  defined on (the reference's decode; FFCV's writer and the evaluation
  loader use it too);
- `ViewFamily` / `view_families`: the view families of a ViewSpec, what a
  renderer loops over;
- `place_family`: a rendered family into its field of `Views`.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from .plan import BatchPlan, CropPlan
from .views import ViewSpec, Views


def decode(data: np.ndarray, path: str = None) -> Image.Image:
    """Encoded bytes -> RGB PIL image, EXIF orientation applied (as DALI does,
    and as the index's sizes assume); 16-bit images scaled to 8 bits."""
    img = Image.open(io.BytesIO(data.tobytes()))
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = Image.fromarray((np.asarray(img, dtype=np.uint32) >> 8).astype(np.uint8), "L")
    return img.convert("RGB")


@dataclass(frozen=True)
class ViewFamily:
    """Views rendered from one CropPlan: a crop family, the original, or the
    mosaic's tiles (what a renderer loops over; the same for every pipeline)."""
    kind: str   # 'crops', 'original' or 'mosaic'
    name: str
    count: int
    size: int
    augs: tuple  # one AugSpec per view

    def plan(self, plan: BatchPlan) -> CropPlan:
        if self.kind == "crops":
            return plan.crops[self.name]
        return plan.original if self.kind == "original" else plan.mosaic.crops

    @property
    def outputs(self) -> int:  # the mosaic's tiles leave a renderer pasted, as one canvas
        return 1 if self.kind == "mosaic" else self.count

    @property
    def out_size(self) -> int:
        return self.size * math.isqrt(self.count) if self.kind == "mosaic" else self.size


def view_families(spec: ViewSpec) -> list:
    families = [ViewFamily("crops", c.name, c.count, c.size, tuple(c.aug(v) for v in range(c.count)))
                for c in spec.crops]
    if spec.original is not None:
        families.append(ViewFamily("original", "original", 1, spec.original.size, (spec.original.aug,)))
    if spec.mosaic is not None:
        m = spec.mosaic
        families.append(ViewFamily("mosaic", "mosaic", m.crops_per_image, m.crop_size, (m.aug,) * m.crops_per_image))
    return families


def place_family(views: Views, family: ViewFamily, pixels: torch.Tensor) -> None:
    """A family's normalised pixels into `views`: [count, B, C, H, W] for
    crops and the original (count 1), the mosaic's canvases [B, C, S, S]."""
    if family.kind == "crops":
        views.crops[family.name] = pixels
    elif family.kind == "original":
        views.original = pixels[0]
    else:
        views.mosaic = pixels

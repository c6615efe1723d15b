"""What a method asks for (ViewSpec) and what a pipeline delivers (Views).

A method declares a ViewSpec; the planner turns it into per-step random
parameters; a pipeline renders those into a Views. The method never learns
which pipeline made its views.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass(frozen=True)
class AugSpec:
    """Photometric augmentation of one view; probabilities are per sample.

    Defaults are MoCo-v2's recipe (Chen et al. 2020, "Improved Baselines",
    Sec. 3): colour jitter 0.4/0.4/0.4/0.1 with p 0.8, grayscale p 0.2,
    Gaussian blur sigma in [0.1, 2] with p 0.5, horizontal flip p 0.5.
    """
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple = (0.1, 2.0)
    # Kernel side as a fraction of the view side (BYOL: 23 px at 224 = 10%).
    blur_kernel_frac: float = 0.1
    solarize_p: float = 0.0

    def blur_kernel(self, size: int) -> int:
        """Odd blur window for a view of `size` pixels (23 at 224)."""
        return max(3, int(self.blur_kernel_frac * size) // 2 * 2 + 1)


NO_AUG = AugSpec(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
MOCOV2_AUG = AugSpec()
# BYOL (Grill et al. 2020, Table 6): the two views differ in blur and solarize.
BYOL_AUG_1 = AugSpec(saturation=0.2, blur_p=1.0, solarize_p=0.0)
BYOL_AUG_2 = AugSpec(saturation=0.2, blur_p=0.1, solarize_p=0.2)


@dataclass(frozen=True)
class CropSpec:
    """`count` random-resized crops of one family (e.g. 'global', 'local').

    `augs` holds one AugSpec for all views or one per view (BYOL's asymmetric
    pair is `augs=(BYOL_AUG_1, BYOL_AUG_2)`).
    """
    name: str
    count: int
    size: int
    scale: tuple = (0.2, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    augs: tuple = (MOCOV2_AUG,)

    def __post_init__(self):
        if self.count < 1 or self.size < 1:
            raise ValueError(f"crop family {self.name!r}: count and size must be positive")
        if len(self.augs) not in (1, self.count):
            raise ValueError(f"crop family {self.name!r}: give 1 or {self.count} AugSpecs, not {len(self.augs)}")
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ValueError(f"crop family {self.name!r}: scale {self.scale} must lie in (0, 1]")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"crop family {self.name!r}: bad ratio {self.ratio}")

    def aug(self, view: int) -> AugSpec:
        return self.augs[view if len(self.augs) > 1 else 0]


@dataclass(frozen=True)
class OriginalSpec:
    """The whole, uncropped image resized to `size` x `size` (LeOCLR), augmented."""
    size: int
    aug: AugSpec = MOCOV2_AUG


@dataclass(frozen=True)
class MosaicSpec:
    """MosRep mosaics (Wang et al., ICLR 2023, Sec. 3.1): each image gives
    `crops_per_image` (M) small crops; the B*M crops are regrouped into B
    canvases of a sqrt(M) x sqrt(M) grid, each canvas holding crops of M
    distinct images, then shifted by a random jitter (zero fill)."""
    crops_per_image: int = 4
    crop_size: int = 112
    scale: tuple = (0.1, 0.6)
    ratio: tuple = (3 / 4, 4 / 3)
    aug: AugSpec = MOCOV2_AUG
    # Official code: int((Beta(0.5, 0.5) * 2 - 1) * 48) pixels per axis at 224.
    jitter: int = 48

    def __post_init__(self):
        side = math.isqrt(self.crops_per_image)
        if side * side != self.crops_per_image:
            raise ValueError(f"mosaic: crops_per_image={self.crops_per_image} is not a square")

    @property
    def grid(self) -> int:
        return math.isqrt(self.crops_per_image)

    @property
    def canvas_size(self) -> int:
        return self.grid * self.crop_size


@dataclass(frozen=True)
class PairSpec:
    """SCRL matched boxes (Roh et al., CVPR 2021, Sec. 3.2) between views 0 and
    1 of crop family `family`: K boxes sampled in the two windows'
    intersection, each mapped into both views' pixels. round_frame and
    keep_last are the official box generator's rules (plan.py `_pair_frame`,
    `_pair_sample`); False gives ours (every box inside both windows, the
    IoU bound always held)."""
    family: str = "global"
    boxes_per_image: int = 10
    min_size: int = 32
    max_iou: float = 0.5
    tries: int = 50
    round_frame: bool = True
    keep_last: bool = True


@dataclass(frozen=True)
class ViewSpec:
    """What a method asks for. neighbours=True (CLIM): each batch of B
    anchors gets B more rows, row B + b holding the image that the
    planner's neighbour table names for anchor b (anchor b itself where it
    names none); every crop family and the original are rendered for all
    2B rows like any other sample."""
    crops: tuple = ()
    original: Optional[OriginalSpec] = None
    mosaic: Optional[MosaicSpec] = None
    pairs: Optional[PairSpec] = None
    neighbours: bool = False

    def __post_init__(self):
        names = [c.name for c in self.crops]
        if len(set(names)) != len(names):
            raise ValueError(f"crop family names must be unique, got {names}")
        if self.neighbours and (self.mosaic is not None or self.pairs is not None):
            raise ValueError("neighbour rows go with crops and originals only, not mosaics or pairs")
        if self.pairs is not None:
            fam = {c.name: c for c in self.crops}.get(self.pairs.family)
            if fam is None or fam.count < 2:
                raise ValueError(f"pairs need crop family {self.pairs.family!r} with at least 2 views")

    def family(self, name: str) -> CropSpec:
        for c in self.crops:
            if c.name == name:
                return c
        raise KeyError(name)

    def capabilities(self) -> set:
        """The view families this spec needs; pipelines declare the ones they make."""
        caps = set()
        if self.crops:
            caps.add("crops")
        if any(len(c.augs) > 1 for c in self.crops):
            caps.add("asymmetric")
        if self.original is not None:
            caps.add("original")
        if self.mosaic is not None:
            caps.add("mosaic")
        if self.pairs is not None:
            caps.add("pairs")
        if self.neighbours:
            caps.add("neighbours")
        return caps

    def scaled(self, factor: float) -> "ViewSpec":
        """The same spec with every pixel size multiplied by `factor` (for
        small-image data such as the built-in sample); scales stay."""
        def px(v):
            return max(8, int(round(v * factor)))
        crops = tuple(dataclasses.replace(c, size=px(c.size)) for c in self.crops)
        original = self.original and dataclasses.replace(self.original, size=px(self.original.size))
        mosaic = self.mosaic and dataclasses.replace(
            self.mosaic, crop_size=px(self.mosaic.crop_size), jitter=int(round(self.mosaic.jitter * factor)))
        pairs = self.pairs and dataclasses.replace(self.pairs, min_size=max(2, int(round(self.pairs.min_size * factor))))
        return ViewSpec(crops=crops, original=original, mosaic=mosaic, pairs=pairs, neighbours=self.neighbours)


@dataclass
class Views:
    """One step's views, on the training device, normalised, channels_last.

    crops[name]:   [count, B, C, H, W]; crops[name][i] is a channels_last batch
    boxes[name]:   [count, B, 5]  (x0, y0, x1, y1) of the crop window in the
                   source image normalised to [0, 1], then the flip flag
    original:      [B, C, H, W] or None
    mosaic:        [B, C, S, S] or None
    mosaic_rois:   [B*M, 5] (canvas index, x0, y0, x1, y1) in canvas pixels
                   after the jitter, as torchvision.ops.roi_align wants them
    mosaic_src:    [B*M] batch index of each RoI's source image
    mosaic_weight: [B*M] visible fraction of each crop after the jitter
    pair_boxes:    [2, P, 5] (batch index, x0, y0, x1, y1) of the P matched
                   SCRL boxes in each view's pixels (view 0, view 1)
    index:         [B] dataset indices; labels: [B] (-1 when unknown)
    neighbour:     [B] with ViewSpec.neighbours: the dataset index of anchor
                   b's neighbour, -1 for none; then every per-row field above
                   has 2B rows, rows B..2B-1 the neighbours (the anchor
                   itself where -1), and batch_size stays B
    neighbours_found: how many anchors have a neighbour (counted on the host
                   from the plan, so a method can branch on it without a
                   device read)
    source_size:   images in the data source (host int), for a method that
                   keeps a row per image (CLIM's bank)
    """
    crops: dict = field(default_factory=dict)
    boxes: dict = field(default_factory=dict)
    original: Optional[torch.Tensor] = None
    mosaic: Optional[torch.Tensor] = None
    mosaic_rois: Optional[torch.Tensor] = None
    mosaic_src: Optional[torch.Tensor] = None
    mosaic_weight: Optional[torch.Tensor] = None
    pair_boxes: Optional[torch.Tensor] = None
    index: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    neighbour: Optional[torch.Tensor] = None
    neighbours_found: int = 0
    source_size: int = 0

    @property
    def batch_size(self) -> int:
        """Anchors per step (neighbour rows not counted)."""
        return int(self.index.shape[0]) - (0 if self.neighbour is None else int(self.neighbour.shape[0]))

    def to(self, device, non_blocking: bool = True) -> "Views":
        def mv(t):
            if not isinstance(t, torch.Tensor):
                return t
            return t.to(device, non_blocking=non_blocking)
        return Views(
            crops={k: mv(v) for k, v in self.crops.items()},
            boxes={k: mv(v) for k, v in self.boxes.items()},
            **{f.name: mv(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in ("crops", "boxes")},
        )


# ImageNet statistics, used by every pipeline's normalisation.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# What MosRep's jitter leaves uncovered: the official code shifts the
# normalised tensor with zero fill, i.e. the mean colour in pixels.
MOSAIC_FILL = tuple(int(round(m * 255)) for m in MEAN)

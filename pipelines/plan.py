"""The planner: every random choice of a training step, from its key.

A step's key is (seed, epoch, rank, step). From it the planner draws, with a
counter-based generator (splitmix64, integer arithmetic only, so the same key
gives the same plan on any machine), which samples form the batch and every
augmentation parameter of every view. Pipelines only render plans, so a step
is reproducible, a run resumes exactly mid-epoch, and pipelines can be tested
against each other.

The kernels are Numba-compiled and work per batch: one call per view family.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numba
import numpy as np

from .views import AugSpec, ViewSpec

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)

# Stream ids keep the families' draws apart; each crop family gets its own.
_STREAM_PERM = 1
_STREAM_ORIGINAL = 2
_STREAM_MOSAIC = 3
_STREAM_MOSAIC_GROUP = 4
_STREAM_PAIRS = 5
_STREAM_CROPS = 16


# ---------------------------------------------------------------- generator
@numba.njit(cache=True, inline="always")
def _mix(z):
    # splitmix64 finaliser (Steele et al. 2014): a bijection of uint64.
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@numba.njit(cache=True)
def _key(seed, epoch, rank, step, stream):
    k = _mix(np.uint64(seed) + _GOLDEN)
    k = _mix(k ^ (np.uint64(epoch) + _GOLDEN))
    k = _mix(k ^ (np.uint64(rank) + _GOLDEN))
    k = _mix(k ^ (np.uint64(step) + _GOLDEN))
    return _mix(k ^ (np.uint64(stream) + _GOLDEN))


@numba.njit(cache=True, inline="always")
def _next(state):
    state[0] += _GOLDEN
    return _mix(state[0])


@numba.njit(cache=True, inline="always")
def _uniform(state, lo, hi):
    u = np.float64(_next(state) >> np.uint64(11)) * (1.0 / 9007199254740992.0)
    return lo + (hi - lo) * u


@numba.njit(cache=True, inline="always")
def _randint(state, n):
    """Uniform integer in [0, n)."""
    r = np.int64(_uniform(state, 0.0, 1.0) * n)
    return r if r < n else n - 1


@numba.njit(cache=True, inline="always")
def _beta_half(state):
    # Beta(0.5, 0.5) is the arcsine law: sin^2(pi/2 * U).
    s = math.sin(0.5 * math.pi * _uniform(state, 0.0, 1.0))
    return s * s


@numba.njit(cache=True)
def _substream(key, a, b):
    state = np.empty(1, np.uint64)
    state[0] = _mix(key ^ _mix(np.uint64(a) * _GOLDEN + np.uint64(b)))
    return state


# ---------------------------------------------------------------- sampling
@numba.njit(cache=True)
def _permutation(n, key):
    perm = np.arange(n)
    state = _substream(key, 0, 0)
    for i in range(n - 1, 0, -1):  # Fisher-Yates
        j = _randint(state, i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


@numba.njit(cache=True, inline="always")
def _resized_crop(state, width, height, s0, s1, logr0, logr1):
    """torchvision.transforms.RandomResizedCrop.get_params, in pixels:
    10 tries of (area scale, log-uniform ratio), then the centre-crop
    fallback. Returns (top, left, h, w)."""
    area = width * height
    for _ in range(10):
        target_area = area * _uniform(state, s0, s1)
        aspect = math.exp(_uniform(state, logr0, logr1))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = _randint(state, height - h + 1)
            left = _randint(state, width - w + 1)
            return top, left, h, w
    in_ratio = width / height
    rmin, rmax = math.exp(logr0), math.exp(logr1)
    if in_ratio < rmin:
        w = width
        h = int(round(w / rmin))
    elif in_ratio > rmax:
        h = height
        w = int(round(h * rmax))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


# Columns of the per-view augmentation table handed to the kernel.
_A_FLIP, _A_JIT, _A_B, _A_C, _A_S, _A_H, _A_GRAY, _A_BLUR, _A_SIG0, _A_SIG1, _A_SOL = range(11)


def _aug_row(aug: AugSpec) -> list:
    return [aug.flip_p, aug.jitter_p, aug.brightness, aug.contrast, aug.saturation, aug.hue,
            aug.grayscale_p, aug.blur_p, aug.blur_sigma[0], aug.blur_sigma[1], aug.solarize_p]


@numba.njit(cache=True)
def _plan_views(key, stream, widths, heights, index, augs, s0, s1, logr0, logr1, whole):
    """Plan `augs.shape[0]` views of each sample of `index`.

    whole=True keeps the whole image (the 'original' view) instead of a
    random-resized crop. Each (view, sample) has its own substream, so one
    view's draws never shift another's.
    """
    count, batch = augs.shape[0], index.shape[0]
    window = np.empty((count, batch, 4), np.int32)
    flip = np.zeros((count, batch), np.bool_)
    jitter = np.zeros((count, batch), np.bool_)
    factors = np.zeros((count, batch, 4), np.float32)
    order = np.empty((count, batch, 4), np.int8)
    gray = np.zeros((count, batch), np.bool_)
    sigma = np.zeros((count, batch), np.float32)
    solarize = np.zeros((count, batch), np.bool_)
    for v in range(count):
        a = augs[v]
        for b in range(batch):
            state = _substream(key, stream * 65536 + v, b)
            width, height = widths[index[b]], heights[index[b]]
            if whole:
                window[v, b, 0], window[v, b, 1], window[v, b, 2], window[v, b, 3] = 0, 0, height, width
            else:
                t, l, h, w = _resized_crop(state, width, height, s0, s1, logr0, logr1)
                window[v, b, 0], window[v, b, 1], window[v, b, 2], window[v, b, 3] = t, l, h, w
            flip[v, b] = _uniform(state, 0.0, 1.0) < a[_A_FLIP]
            # ColorJitter.get_params: factors uniform in [1-x, 1+x] (hue in
            # [-x, x]) and a random order of the four operations.
            jitter[v, b] = _uniform(state, 0.0, 1.0) < a[_A_JIT]
            factors[v, b, 0] = _uniform(state, max(0.0, 1.0 - a[_A_B]), 1.0 + a[_A_B])
            factors[v, b, 1] = _uniform(state, max(0.0, 1.0 - a[_A_C]), 1.0 + a[_A_C])
            factors[v, b, 2] = _uniform(state, max(0.0, 1.0 - a[_A_S]), 1.0 + a[_A_S])
            factors[v, b, 3] = _uniform(state, -a[_A_H], a[_A_H])
            for i in range(4):
                order[v, b, i] = i
            for i in range(3, 0, -1):
                j = _randint(state, i + 1)
                order[v, b, i], order[v, b, j] = order[v, b, j], order[v, b, i]
            gray[v, b] = _uniform(state, 0.0, 1.0) < a[_A_GRAY]
            if _uniform(state, 0.0, 1.0) < a[_A_BLUR]:
                sigma[v, b] = _uniform(state, a[_A_SIG0], a[_A_SIG1])
            else:
                _uniform(state, 0.0, 1.0)  # keep the stream's length fixed
            solarize[v, b] = _uniform(state, 0.0, 1.0) < a[_A_SOL]
    return window, flip, jitter, factors, order, gray, sigma, solarize


# ---------------------------------------------------------------- plan types
@dataclass
class CropPlan:
    """Parameters of `count` views of each of B samples; arrays are [count, B, ...].

    window:   int32 [count, B, 4] (top, left, h, w) in source pixels
    flip:     bool  horizontal flip
    jitter:   bool  colour jitter applied
    factors:  float32 [count, B, 4] brightness, contrast, saturation factors
              and hue shift (fraction of the hue circle, torchvision's unit)
    order:    int8 [count, B, 4] order of the four jitter ops (0 b, 1 c, 2 s, 3 h)
    gray:     bool  grayscale conversion
    sigma:    float32 blur sigma, 0 when not blurred
    solarize: bool  solarize at threshold 128 (of 255)
    """
    window: np.ndarray
    flip: np.ndarray
    jitter: np.ndarray
    factors: np.ndarray
    order: np.ndarray
    gray: np.ndarray
    sigma: np.ndarray
    solarize: np.ndarray
    size: int = 0           # output side in pixels
    augs: tuple = ()        # the AugSpec of each view (blur kernel etc.)

    @property
    def count(self) -> int:
        return self.window.shape[0]

    def boxes(self, widths: np.ndarray, heights: np.ndarray) -> np.ndarray:
        """[count, B, 5] (x0, y0, x1, y1) normalised to the source image, then the flip flag."""
        top, left, h, w = (self.window[..., i].astype(np.float32) for i in range(4))
        out = np.stack([left / widths, top / heights, (left + w) / widths, (top + h) / heights,
                        self.flip.astype(np.float32)], axis=-1)
        return out.astype(np.float32)


@dataclass
class MosaicPlan:
    """MosRep mosaics for a batch of B images with M crops each.

    crops:      CropPlan with count M; crop m of image b is crops[.., m, b]
    tile_src:   int32 [B, M] batch index of the image in tile t (row-major
                grid cell) of canvas c; distinct within a canvas, each image
                exactly M times over the batch
    tile_crop:  int32 [B, M] which of that image's M crops fills the tile
    shift:      int32 [B, 2] (dx, dy) jitter of each canvas, zero fill
    paste:      int32 [B, M, 6] (src_y, src_x, h, w, dst_y, dst_x) of each
                tile after the shift, clipped to the canvas
    rois:       float32 [B*M, 5] (canvas, x0, y0, x1, y1) in canvas pixels
    src:        int64 [B*M] batch index of each RoI's source image
    weight:     float32 [B*M] visible fraction of each tile
    """
    crops: CropPlan
    tile_src: np.ndarray
    tile_crop: np.ndarray
    shift: np.ndarray
    paste: np.ndarray
    rois: np.ndarray
    src: np.ndarray
    weight: np.ndarray
    canvas_size: int = 0


@dataclass
class PairPlan:
    """SCRL matched boxes between views 0 and 1 of one crop family.

    boxes:  float32 [2, P, 5] (batch index, x0, y0, x1, y1) of each of the P
            boxes in view 0's and view 1's pixels (flips applied)
    count:  int32 [B] boxes of each image (0 when its views do not overlap
            enough)
    """
    boxes: np.ndarray
    count: np.ndarray


@dataclass
class BatchPlan:
    epoch: int
    step: int
    index: np.ndarray                       # int64 [B] dataset indices
    crops: dict = field(default_factory=dict)   # family name -> CropPlan
    original: Optional[CropPlan] = None
    mosaic: Optional[MosaicPlan] = None
    pairs: Optional[PairPlan] = None


# ---------------------------------------------------------------- planner
class Planner:
    """Plans the steps of one rank.

    Each epoch is a permutation of the dataset drawn from (seed, epoch);
    rank r takes every world_size-th element from position r, so the ranks'
    shards are disjoint and together cover the epoch (less the remainder of
    N / world_size, which the next epoch's permutation moves elsewhere). A
    rank's shard is cut into full batches; the last partial batch is
    dropped, as is usual for contrastive losses.
    """

    def __init__(self, spec: ViewSpec, widths, heights, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.spec = spec
        self.widths = np.ascontiguousarray(widths, dtype=np.int64)
        self.heights = np.ascontiguousarray(heights, dtype=np.int64)
        if self.widths.shape != self.heights.shape or self.widths.ndim != 1:
            raise ValueError("widths and heights must be 1-D arrays of one length")
        if (self.widths <= 0).any() or (self.heights <= 0).any():
            raise ValueError("image sizes must be positive")
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        per_rank = len(self.widths) // self.world_size
        if self.batch_size < 1 or per_rank < self.batch_size:
            raise ValueError(f"batch size {batch_size} is larger than the {per_rank} images each of "
                             f"{world_size} rank(s) gets from {len(self.widths)}")
        if spec.mosaic is not None and self.batch_size < spec.mosaic.crops_per_image:
            raise ValueError(f"a mosaic of {spec.mosaic.crops_per_image} distinct images needs a batch "
                             f"of at least that many, not {batch_size}")
        self.steps_per_epoch = per_rank // self.batch_size
        self._augs = {c.name: np.array([_aug_row(c.aug(v)) for v in range(c.count)], np.float64)
                      for c in spec.crops}
        self._shard_epoch, self._shard = None, None

    def __len__(self) -> int:
        return self.steps_per_epoch

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's sample order for `epoch` (all of it, before batching)."""
        if self._shard_epoch != epoch:
            n = len(self.widths)
            perm = _permutation(n, np.uint64(_key(self.seed, epoch, 0, 0, _STREAM_PERM)))
            usable = (n // self.world_size) * self.world_size
            self._shard = perm[self.rank:usable:self.world_size]
            self._shard_epoch = epoch
        return self._shard

    def plan(self, epoch: int, step: int) -> BatchPlan:
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} outside epoch of {self.steps_per_epoch} steps")
        b = self.batch_size
        index = np.ascontiguousarray(self.shard(epoch)[step * b:(step + 1) * b])
        out = BatchPlan(epoch=epoch, step=step, index=index)
        for i, c in enumerate(self.spec.crops):
            key = _key(self.seed, epoch, self.rank, step, _STREAM_CROPS + i)
            out.crops[c.name] = self._views(key, index, self._augs[c.name], c.scale, c.ratio, False,
                                            c.size, tuple(c.aug(v) for v in range(c.count)))
        if self.spec.original is not None:
            o = self.spec.original
            key = _key(self.seed, epoch, self.rank, step, _STREAM_ORIGINAL)
            out.original = self._views(key, index, np.array([_aug_row(o.aug)]), (1.0, 1.0), (1.0, 1.0),
                                       True, o.size, (o.aug,))
        if self.spec.mosaic is not None:
            out.mosaic = self._mosaic(epoch, step, index)
        if self.spec.pairs is not None:
            out.pairs = self._pairs(epoch, step, out.crops[self.spec.pairs.family])
        return out

    def _views(self, key, index, augs, scale, ratio, whole, size, aug_specs) -> CropPlan:
        arrays = _plan_views(np.uint64(key), 0, self.widths, self.heights, index, augs, float(scale[0]),
                             float(scale[1]), math.log(ratio[0]), math.log(ratio[1]), whole)
        return CropPlan(*arrays, size=size, augs=aug_specs)

    def _mosaic(self, epoch, step, index) -> MosaicPlan:
        raise NotImplementedError("mosaic planning lands with the DALI issue")

    def _pairs(self, epoch, step, crops: CropPlan) -> PairPlan:
        raise NotImplementedError("SCRL pair planning lands with the DALI issue")


def step_key(seed: int, epoch: int, rank: int, step: int, stream: int = 0) -> int:
    """The 64-bit key of a step (exposed for tests and logging)."""
    return int(_key(seed, epoch, rank, step, stream))

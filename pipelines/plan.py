"""The planner: every random choice of a training step, from its key.

Every draw comes from pipelines/draws.py's counter-based generator
(splitmix64, integer arithmetic only, so the same key gives the same plan
on any machine). The
epoch's order of samples is drawn from (seed, epoch); every per-sample draw
(crop windows, flips, colour, blur, the mosaic's tiles, SCRL boxes) from
(seed, epoch, the sample's position in that global order). The global batch
of global step s is positions [s*G, (s+1)*G) for the global batch G, and
rank r of W renders the slice [s*G + r*G/W, s*G + (r+1)*G/W): so the global
batch and every view of it are the same whatever the number of processes,
and a run checkpointed on 8 processes resumes exactly on 4 (same G).
Pipelines only render plans, so a step is reproducible, a run resumes
exactly mid-epoch, and pipelines can be tested against each other.

What still depends on the number of processes, and why: the mosaic grouping
(which images share a canvas, and each canvas's jitter) is drawn within a
rank's batch, because a canvas is pasted from images one rank holds; a
method's in-batch terms (SCRL's pairs are per image and do not change, but
BatchNorm statistics, shuffle-BN and negatives not gathered across ranks
are per rank); and the order of float reductions (DDP's gradient all-reduce,
gathers) changes the last bits.

The kernels are Numba-compiled and work per batch: one call per view family.
This module holds the generic part (order, crop windows, per-view draws,
the plan types, the Planner); the MosRep mosaic's grouping is
pipelines/plan_mosaic.py, SCRL's matched boxes pipelines/plan_pairs.py.
"""
from __future__ import annotations

import concurrent.futures
import math
import os
import threading
from dataclasses import dataclass, field
from typing import Optional

import numba
import numpy as np

from .draws import draw_index, draw_uniform, stream_key, substream
from .plan_mosaic import mosaic_draws, mosaic_geometry
from .plan_pairs import pair_boxes, pair_draws
from .views import AugSpec, ViewSpec

# Stream ids keep the families' draws apart; each crop family gets its own.
_STREAM_PERM = 1
_STREAM_ORIGINAL = 2
_STREAM_MOSAIC = 3
_STREAM_MOSAIC_GROUP = 4
_STREAM_PAIRS = 5
_STREAM_CROPS = 16
# Planner.plan's default neighbour table: the one set_neighbours set last.
_SET_TABLE = object()
_POOL_LOCK = threading.Lock()


def _new_pool_lock():  # a fork while another thread held the lock must not leave it held in the child
    global _POOL_LOCK
    _POOL_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_new_pool_lock)


# ---------------------------------------------------------------- sampling
@numba.njit(cache=True)
def _permutation(n, key):
    perm = np.arange(n)
    s = substream(key, 0, 0)
    for i in range(n - 1, 0, -1):  # Fisher-Yates
        s, j = draw_index(s, i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    return perm



@numba.njit(cache=True, inline="always")
def _resized_crop(s, width, height, s0, s1, logr0, logr1):
    """torchvision.transforms.RandomResizedCrop.get_params, in pixels:
    10 tries of (area scale, log-uniform ratio), then the centre-crop
    fallback. Returns (state, top, left, h, w)."""
    area = width * height
    for _ in range(10):
        s, u = draw_uniform(s, s0, s1)
        target_area = area * u
        s, u = draw_uniform(s, logr0, logr1)
        aspect = math.exp(u)
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            s, top = draw_index(s, height - h + 1)
            s, left = draw_index(s, width - w + 1)
            return s, top, left, h, w
    in_ratio = width / height
    rmin, rmax = math.exp(logr0), math.exp(logr1)
    # torchvision rounds a side of a tiny image to 0 here (1 x 1 px, ratio
    # 1/2: round(0.5) = 0), an empty window no renderer takes; keep >= 1 px.
    if in_ratio < rmin:
        w = width
        h = max(1, int(round(w / rmin)))
    elif in_ratio > rmax:
        h = height
        w = max(1, int(round(h * rmax)))
    else:
        w = width
        h = height
    return s, (height - h) // 2, (width - w) // 2, h, w


# Columns of the augmentation table handed to _plan_views, one float64 row
# per view: its AugSpec's probabilities and strengths.
(AUG_FLIP_P, AUG_JITTER_P, AUG_BRIGHTNESS, AUG_CONTRAST, AUG_SATURATION, AUG_HUE, AUG_GRAYSCALE_P, AUG_BLUR_P,
 AUG_BLUR_SIGMA_MIN, AUG_BLUR_SIGMA_MAX, AUG_SOLARIZE_P) = range(11)


def _aug_row(aug: AugSpec) -> list:
    """An AugSpec as a row of the augmentation table, in the AUG_* columns' order."""
    return [aug.flip_p, aug.jitter_p, aug.brightness, aug.contrast, aug.saturation, aug.hue,
            aug.grayscale_p, aug.blur_p, aug.blur_sigma[0], aug.blur_sigma[1], aug.solarize_p]


@numba.njit(cache=True, nogil=True)
def _plan_views(key, stream, widths, heights, index, positions, augs, s0, s1, logr0, logr1, whole):
    """Plan `augs.shape[0]` views of each sample of `index`.

    whole=True keeps the whole image (the 'original' view) instead of a
    random-resized crop. Each (view, sample) has its own substream, keyed
    on the sample's position in the epoch's global order (`positions`), so
    one view's draws never shift another's and a sample's views do not
    depend on which rank renders it.
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
            s = substream(key, stream * 65536 + v, positions[b])
            width, height = widths[index[b]], heights[index[b]]
            if whole:
                window[v, b, 0], window[v, b, 1], window[v, b, 2], window[v, b, 3] = 0, 0, height, width
            else:
                s, t, l, h, w = _resized_crop(s, width, height, s0, s1, logr0, logr1)
                window[v, b, 0], window[v, b, 1], window[v, b, 2], window[v, b, 3] = t, l, h, w
            s, u = draw_uniform(s, 0.0, 1.0)
            flip[v, b] = u < a[AUG_FLIP_P]
            # ColorJitter.get_params: factors uniform in [1-x, 1+x] (hue in
            # [-x, x]) and a random order of the four operations.
            s, u = draw_uniform(s, 0.0, 1.0)
            jitter[v, b] = u < a[AUG_JITTER_P]
            s, u = draw_uniform(s, max(0.0, 1.0 - a[AUG_BRIGHTNESS]), 1.0 + a[AUG_BRIGHTNESS])
            factors[v, b, 0] = u
            s, u = draw_uniform(s, max(0.0, 1.0 - a[AUG_CONTRAST]), 1.0 + a[AUG_CONTRAST])
            factors[v, b, 1] = u
            s, u = draw_uniform(s, max(0.0, 1.0 - a[AUG_SATURATION]), 1.0 + a[AUG_SATURATION])
            factors[v, b, 2] = u
            s, u = draw_uniform(s, -a[AUG_HUE], a[AUG_HUE])
            factors[v, b, 3] = u
            for i in range(4):
                order[v, b, i] = i
            for i in range(3, 0, -1):
                s, j = draw_index(s, i + 1)
                order[v, b, i], order[v, b, j] = order[v, b, j], order[v, b, i]
            s, u = draw_uniform(s, 0.0, 1.0)
            gray[v, b] = u < a[AUG_GRAYSCALE_P]
            s, u = draw_uniform(s, 0.0, 1.0)
            if u < a[AUG_BLUR_P]:
                s, u = draw_uniform(s, a[AUG_BLUR_SIGMA_MIN], a[AUG_BLUR_SIGMA_MAX])
                sigma[v, b] = u
            else:
                s, u = draw_uniform(s, 0.0, 1.0)  # keep the stream's length fixed
            s, u = draw_uniform(s, 0.0, 1.0)
            solarize[v, b] = u < a[AUG_SOLARIZE_P]
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
    shift:      int32 [B, 2] (dx, dy) jitter of each canvas; uncovered pixels take
                the mean colour (official: zero after normalisation)
                (the content moves dx px right and dy px down)
    paste:      int32 [B, M, 6] (src_y, src_x, h, w, dst_y, dst_x) of each
                tile after the shift, clipped to the canvas
    rois:       float32 [B*M, 5] (canvas, x0, y0, x1, y1) in canvas pixels
                (r = c*M + t; x1 = x0 + visible width, exclusive)
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
    index: np.ndarray                       # int64 [B] dataset indices (2B with neighbour rows)
    crops: dict = field(default_factory=dict)   # family name -> CropPlan
    original: Optional[CropPlan] = None
    mosaic: Optional[MosaicPlan] = None
    pairs: Optional[PairPlan] = None
    neighbour: Optional[np.ndarray] = None  # int64 [B]: each anchor's neighbour, -1 for none


# ---------------------------------------------------------------- planner
class Planner:
    """Plans the steps of one rank; `batch_size` is this rank's share.

    Each epoch is a permutation of the dataset drawn from (seed, epoch), cut
    into global batches of G = batch_size * world_size; at step s, rank r
    takes positions [s*G + r*batch_size, s*G + (r+1)*batch_size). The ranks'
    shards are disjoint, and the global batch of a step (and, keyed on
    positions, every view of it) is the same for any world size with the
    same G. The last partial global batch is dropped, as is usual for
    contrastive losses; the next epoch's permutation moves it elsewhere.

    With spec.neighbours the planner also takes a neighbour table, int64
    [N] (set_neighbours; -1 or a short table: none): each plan appends to
    its B anchors the B images the table names for them (rows B..2B-1,
    the anchor itself where it names none) and plans their views like any
    other row, keyed on position p + N for the anchor at position p. The
    table is an input like the sizes: a plan is a pure function of (seed,
    epoch, positions) and the table.

    A planner may plan from several threads at once (a pipeline's reader
    thread beside the training loop): its only caches, the epoch's order and
    the mosaic's thread, are replaced whole or made under a lock, and a
    reader that must not see a new table mid-iteration passes the table it
    took at the start (`plan(..., neighbours=table)`).
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
        self.global_batch = self.batch_size * self.world_size
        if spec.mosaic is not None and self.batch_size < spec.mosaic.crops_per_image:
            raise ValueError(f"a mosaic of {spec.mosaic.crops_per_image} distinct images needs a batch "
                             f"of at least that many, not {batch_size}")
        self.steps_per_epoch = len(self.widths) // self.global_batch
        self._augs = {c.name: np.array([_aug_row(c.aug(v)) for v in range(c.count)], np.float64)
                      for c in spec.crops}
        if spec.mosaic is not None:
            self._mosaic_augs = np.array([_aug_row(spec.mosaic.aug)] * spec.mosaic.crops_per_image, np.float64)
        self._order_cache = (None, None)  # (epoch, order), replaced whole: read by more than one thread
        self._pool, self._pool_pid = None, None
        self.neighbours = None

    @property
    def rows(self) -> int:
        """Rows of every planned view array: B, or 2B with neighbour rows."""
        return self.batch_size * (2 if self.spec.neighbours else 1)

    def neighbours_of(self, index: np.ndarray, table=_SET_TABLE) -> np.ndarray:
        """Each anchor's neighbour by the table (the planner's, or `table`),
        int64 of index's shape: -1 where the table names none, is too short,
        or names an image past N."""
        if table is _SET_TABLE:
            table = self.neighbours
        table = np.zeros(0, np.int64) if table is None else np.asarray(table, np.int64)
        nbr = np.full(np.shape(index), -1, np.int64)
        known = index < len(table)
        nbr[known] = table[index[known]]
        nbr[nbr >= len(self.widths)] = -1
        return nbr

    def set_neighbours(self, table) -> None:
        """The neighbour table for the plans from now on (None: no neighbours)."""
        self.neighbours = None if table is None else np.ascontiguousarray(table, dtype=np.int64)

    def __getstate__(self):  # threads do not travel to worker processes
        state = dict(self.__dict__)
        state["_pool"] = state["_pool_pid"] = None
        return state

    def close(self) -> None:
        """End the planner's thread (the next mosaic plan starts a new one)."""
        with _POOL_LOCK:
            pool, self._pool = self._pool, None
        if pool is not None and self._pool_pid == os.getpid():
            pool.shutdown(wait=True)

    def _second_thread(self) -> concurrent.futures.ThreadPoolExecutor:
        # One per process: a pool inherited through fork has no live thread.
        with _POOL_LOCK:  # two threads planning at once make one pool
            if self._pool is None or self._pool_pid != os.getpid():
                self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="planner")
                self._pool_pid = os.getpid()
            return self._pool

    def __len__(self) -> int:
        return self.steps_per_epoch

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's global order of samples (all ranks, before batching)."""
        cached, order = self._order_cache
        if cached != epoch:
            order = _permutation(len(self.widths), np.uint64(stream_key(self.seed, epoch, 0, 0, _STREAM_PERM)))
            self._order_cache = (epoch, order)
        return order

    def positions(self, step: int) -> np.ndarray:
        """int64 [batch_size]: the places in the epoch's global order of this rank's samples at `step`."""
        start = step * self.global_batch + self.rank * self.batch_size
        return np.arange(start, start + self.batch_size, dtype=np.int64)

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's sample order for `epoch` (all of its steps, before batching)."""
        order = self.order(epoch)[:self.steps_per_epoch * self.global_batch]
        return order.reshape(self.steps_per_epoch, self.world_size, self.batch_size)[:, self.rank].reshape(-1)

    def plan(self, epoch: int, step: int, neighbours=_SET_TABLE) -> BatchPlan:
        """Step `step` of `epoch`; with spec.neighbours, its neighbour rows
        by `neighbours` (a table as set_neighbours takes; default: the one set)."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} outside epoch of {self.steps_per_epoch} steps")
        positions = self.positions(step)
        index = np.ascontiguousarray(self.order(epoch)[positions])
        out = BatchPlan(epoch=epoch, step=step, index=index)
        if self.spec.neighbours:
            nbr = out.neighbour = self.neighbours_of(index, neighbours)
            index = out.index = np.concatenate([index, np.where(nbr >= 0, nbr, index)])
            positions = np.concatenate([positions, positions + len(self.widths)])  # the neighbours' own streams
        # The mosaic depends on nothing else in the plan and its kernels
        # release the GIL, so it is planned on a second thread meanwhile.
        mosaic = None
        if self.spec.mosaic is not None:
            mosaic = self._second_thread().submit(self._mosaic, epoch, index, positions)
        for i, c in enumerate(self.spec.crops):
            key = stream_key(self.seed, epoch, 0, 0, _STREAM_CROPS + i)
            out.crops[c.name] = self._views(key, index, positions, self._augs[c.name], c.scale, c.ratio, False,
                                            c.size, tuple(c.aug(v) for v in range(c.count)))
        if self.spec.original is not None:
            o = self.spec.original
            key = stream_key(self.seed, epoch, 0, 0, _STREAM_ORIGINAL)
            out.original = self._views(key, index, positions, np.array([_aug_row(o.aug)]), (1.0, 1.0),
                                       (1.0, 1.0), True, o.size, (o.aug,))
        if self.spec.pairs is not None:
            out.pairs = self._pairs(epoch, positions, out.crops[self.spec.pairs.family])
        if mosaic is not None:
            out.mosaic = mosaic.result()
        return out

    def _views(self, key, index, positions, augs, scale, ratio, whole, size, aug_specs) -> CropPlan:
        arrays = _plan_views(np.uint64(key), 0, self.widths, self.heights, index, positions, augs,
                             float(scale[0]), float(scale[1]), math.log(ratio[0]), math.log(ratio[1]), whole)
        return CropPlan(*arrays, size=size, augs=aug_specs)

    def _mosaic(self, epoch, index, positions) -> MosaicPlan:
        ms = self.spec.mosaic
        m = ms.crops_per_image
        key = stream_key(self.seed, epoch, 0, 0, _STREAM_MOSAIC)
        crops = self._views(key, index, positions, self._mosaic_augs, ms.scale, ms.ratio, False, ms.crop_size,
                            (ms.aug,) * m)
        # Which images share a canvas is drawn per rank's batch (a canvas is
        # pasted from images one rank holds), keyed on where the batch starts
        # and how long it is: the same slice of the global order gives the same mosaics.
        key = stream_key(self.seed, epoch, int(positions[0]), len(positions), _STREAM_MOSAIC_GROUP)
        # |shift| < crop keeps at least one row and column of every tile visible.
        tile_src, tile_crop, shift = mosaic_draws(np.uint64(key), len(index), m, int(ms.jitter),
                                                   ms.crop_size - 1)
        paste, rois, src, weight = mosaic_geometry(tile_src, shift, ms.grid, ms.crop_size)
        return MosaicPlan(crops=crops, tile_src=tile_src, tile_crop=tile_crop, shift=shift, paste=paste,
                          rois=rois, src=src, weight=weight, canvas_size=ms.canvas_size)

    def _pairs(self, epoch, positions, crops: CropPlan) -> PairPlan:
        ps = self.spec.pairs
        key = stream_key(self.seed, epoch, 0, 0, _STREAM_PAIRS)
        frame, count = pair_draws(np.uint64(key), crops.window, crops.size, ps.boxes_per_image, ps.min_size,
                                   float(ps.max_iou), ps.tries, ps.round_frame, ps.keep_last, positions)
        return PairPlan(boxes=pair_boxes(crops.window, crops.flip, crops.size, frame, count, ps.round_frame),
                        count=count)


def step_key(seed: int, epoch: int, a: int, b: int, stream: int = 0) -> int:
    """The 64-bit key of a stream (exposed for tests): (a, b) = (0, 0) for
    the epoch-wide streams, (first position, length) for a mosaic grouping."""
    return int(stream_key(seed, epoch, a, b, stream))

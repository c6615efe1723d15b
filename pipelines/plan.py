"""The planner: every random choice of a training step, from its key.

Every draw comes from a counter-based generator (splitmix64, integer
arithmetic only, so the same key gives the same plan on any machine). The
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

from .views import AugSpec, ViewSpec

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)

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


# ---------------------------------------------------------------- generator
@numba.njit(cache=True, inline="always")
def _mix(z):
    # splitmix64 finaliser (Steele et al. 2014): a bijection of uint64.
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@numba.njit(cache=True)
def _key(seed, epoch, a, b, stream):
    # (a, b) is (0, 0) for the epoch-wide streams; the mosaic grouping uses
    # (first position, length) of a rank's batch.
    k = _mix(np.uint64(seed) + _GOLDEN)
    k = _mix(k ^ (np.uint64(epoch) + _GOLDEN))
    k = _mix(k ^ (np.uint64(a) + _GOLDEN))
    k = _mix(k ^ (np.uint64(b) + _GOLDEN))
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


@numba.njit(cache=True, inline="always")
def _seed(key, a, b):
    """The starting state of substream (a, b) of `key`."""
    return _mix(key ^ _mix(np.uint64(a) * _GOLDEN + np.uint64(b)))


@numba.njit(cache=True)
def _substream(key, a, b):
    state = np.empty(1, np.uint64)
    state[0] = _seed(key, a, b)
    return state


# The same draws with the state threaded through as a value, `s, u = _su(s,
# lo, hi)`, so that LLVM keeps it in a register: with a state array it must
# reload the state after every store to an output array (they may alias),
# which cost the kernels a third of their time or more. Both forms give the
# same numbers for the same seed.
@numba.njit(cache=True, inline="always")
def _su(s, lo, hi):
    s = s + _GOLDEN
    u = np.float64(_mix(s) >> np.uint64(11)) * (1.0 / 9007199254740992.0)
    return s, lo + (hi - lo) * u


@numba.njit(cache=True, inline="always")
def _sint(s, n):
    """Uniform integer in [0, n), as _randint."""
    s, u = _su(s, 0.0, 1.0)
    r = np.int64(u * n)
    return s, (r if r < n else n - 1)


@numba.njit(cache=True, inline="always")
def _sbelow(s, n):
    """Uniform integer in [0, n) for 0 < n < 2**32 by a 32-bit multiply-shift
    of the draw's high half (bias below n / 2**32): no float conversions, so
    a short dependency chain where one draw's range is another's result."""
    s = s + _GOLDEN
    return s, np.int64(((_mix(s) >> np.uint64(32)) * np.uint64(n)) >> np.uint64(32))


@numba.njit(cache=True, inline="always")
def _sbeta(s):
    """Beta(0.5, 0.5), as _beta_half."""
    s, u = _su(s, 0.0, 1.0)
    v = math.sin(0.5 * math.pi * u)
    return s, v * v


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
def _resized_crop(s, width, height, s0, s1, logr0, logr1):
    """torchvision.transforms.RandomResizedCrop.get_params, in pixels:
    10 tries of (area scale, log-uniform ratio), then the centre-crop
    fallback. Returns (state, top, left, h, w)."""
    area = width * height
    for _ in range(10):
        s, u = _su(s, s0, s1)
        target_area = area * u
        s, u = _su(s, logr0, logr1)
        aspect = math.exp(u)
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            s, top = _sint(s, height - h + 1)
            s, left = _sint(s, width - w + 1)
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


# Columns of the per-view augmentation table handed to the kernel.
_A_FLIP, _A_JIT, _A_B, _A_C, _A_S, _A_H, _A_GRAY, _A_BLUR, _A_SIG0, _A_SIG1, _A_SOL = range(11)


def _aug_row(aug: AugSpec) -> list:
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
            s = _seed(key, stream * 65536 + v, positions[b])
            width, height = widths[index[b]], heights[index[b]]
            if whole:
                window[v, b, 0], window[v, b, 1], window[v, b, 2], window[v, b, 3] = 0, 0, height, width
            else:
                s, t, l, h, w = _resized_crop(s, width, height, s0, s1, logr0, logr1)
                window[v, b, 0], window[v, b, 1], window[v, b, 2], window[v, b, 3] = t, l, h, w
            s, u = _su(s, 0.0, 1.0)
            flip[v, b] = u < a[_A_FLIP]
            # ColorJitter.get_params: factors uniform in [1-x, 1+x] (hue in
            # [-x, x]) and a random order of the four operations.
            s, u = _su(s, 0.0, 1.0)
            jitter[v, b] = u < a[_A_JIT]
            s, u = _su(s, max(0.0, 1.0 - a[_A_B]), 1.0 + a[_A_B])
            factors[v, b, 0] = u
            s, u = _su(s, max(0.0, 1.0 - a[_A_C]), 1.0 + a[_A_C])
            factors[v, b, 1] = u
            s, u = _su(s, max(0.0, 1.0 - a[_A_S]), 1.0 + a[_A_S])
            factors[v, b, 2] = u
            s, u = _su(s, -a[_A_H], a[_A_H])
            factors[v, b, 3] = u
            for i in range(4):
                order[v, b, i] = i
            for i in range(3, 0, -1):
                s, j = _sint(s, i + 1)
                order[v, b, i], order[v, b, j] = order[v, b, j], order[v, b, i]
            s, u = _su(s, 0.0, 1.0)
            gray[v, b] = u < a[_A_GRAY]
            s, u = _su(s, 0.0, 1.0)
            if u < a[_A_BLUR]:
                s, u = _su(s, a[_A_SIG0], a[_A_SIG1])
                sigma[v, b] = u
            else:
                s, u = _su(s, 0.0, 1.0)  # keep the stream's length fixed
            s, u = _su(s, 0.0, 1.0)
            solarize[v, b] = u < a[_A_SOL]
    return window, flip, jitter, factors, order, gray, sigma, solarize


# ---------------------------------------------------------------- mosaic
# MosRep (Wang et al., ICLR 2023). The official code (DerrickWang005/
# MosRep.pytorch, moco/builder.py `_mosaic_ddp` and `_shift`) puts crop k of
# image (c - k) mod B into cell k of canvas c (a fixed roll of the batch),
# then moves every canvas of the batch by ONE offset
# int((Beta(.5, .5) * 2 - 1) * 48) per axis into torch.zeros_like(mosaic) of
# the already *normalised* tensor. Here the assignment is random (below)
# and every canvas gets its own shift.

@numba.njit(cache=True, error_model="numpy", nogil=True)
def _mosaic_draws(key, batch, m, jitter, limit):
    """The random part of a mosaic plan, from substream (0, 0) of `key`.

    Returns tile_src, tile_crop int32 [batch, m] (the image, and which of its
    crops, in grid cell t of canvas c) and shift int32 [batch, 2] (dx, dy),
    the displacement of each canvas's content, clamped to [-limit, limit].

    Construction: perm is a random permutation of the batch, off[0..m-1] are
    m distinct residues mod batch (a partial Fisher-Yates), and slot k of
    canvas c holds image perm[(c + off[k]) mod batch]; a random permutation
    `cell` of the grid cells places canvas c's slots, and crop_of[i] (a
    random permutation of 0..m-1 per image i) says which crop image i gives
    to its slot k. Proof of validity:
    * distinct images per canvas: within canvas c the positions
      (c + off[k]) mod batch, k = 0..m-1, are distinct because the off[k]
      are distinct residues (this needs batch >= m), and perm is injective;
    * each image exactly m times, each of its crops once: for a fixed slot
      k, c -> (c + off[k]) mod batch is a bijection of Z_batch, so every
      image fills slot k of exactly one canvas; over the m slots it appears
      m times, once per slot, with crops crop_of[i, 0..m-1], a permutation;
    * every cell of a canvas is filled once because `cell` is a permutation.
    """
    if batch < m:
        raise ValueError("a mosaic needs a batch of at least crops_per_image images")
    s = _seed(key, 0, 0)
    perm = np.arange(batch)
    for i in range(batch - 1, 0, -1):  # Fisher-Yates
        s, j = _sint(s, i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    pool = np.arange(batch)
    off = np.empty(m, np.int64)
    for k in range(m):
        s, j = _sint(s, batch - k)
        j += k
        pool[k], pool[j] = pool[j], pool[k]
        off[k] = pool[k]
    crop_of = np.empty((batch, m), np.int32)
    for i in range(batch):
        for k in range(m):
            crop_of[i, k] = k
        for k in range(m - 1, 0, -1):
            s, j = _sint(s, k + 1)
            crop_of[i, k], crop_of[i, j] = crop_of[i, j], crop_of[i, k]
    tile_src = np.empty((batch, m), np.int32)
    tile_crop = np.empty((batch, m), np.int32)
    cell = np.empty(m, np.int64)
    for c in range(batch):
        for k in range(m):
            cell[k] = k
        for k in range(m - 1, 0, -1):
            s, j = _sint(s, k + 1)
            cell[k], cell[j] = cell[j], cell[k]
        for k in range(m):
            i = c + off[k]
            img = perm[i - batch if i >= batch else i]
            tile_src[c, cell[k]] = img
            tile_crop[c, cell[k]] = crop_of[img, k]
    shift = np.zeros((batch, 2), np.int32)
    for c in range(batch):
        # official: int((np.random.beta(.5, .5) * 2 - 1) * range), y first;
        # int() truncates towards zero, so |d| <= jitter.
        s, u = _sbeta(s)
        dy = np.int64((u * 2.0 - 1.0) * jitter)
        s, u = _sbeta(s)
        dx = np.int64((u * 2.0 - 1.0) * jitter)
        shift[c, 0] = min(max(dx, -limit), limit)
        shift[c, 1] = min(max(dy, -limit), limit)
    return tile_src, tile_crop, shift


@numba.njit(cache=True, error_model="numpy", nogil=True)
def _mosaic_geometry(tile_src, shift, grid, crop):
    """The deterministic part: tiles of crop x crop px in a grid x grid
    canvas, cell t at row t // grid, column t % grid, moved by shift[c] =
    (dx, dy) and clipped to the canvas. Returns paste int32 [B, M, 6]
    (src_y, src_x, h, w, dst_y, dst_x), rois float32 [B*M, 5] (canvas, x0, y0,
    x1, y1) of the visible part with exclusive ends (x1 = x0 + w), src int64
    [B*M] and weight float32 [B*M] = visible area / crop area."""
    batch, m = tile_src.shape
    side = grid * crop
    paste = np.empty((batch, m, 6), np.int32)
    rois = np.empty((batch * m, 5), np.float32)
    src = np.empty(batch * m, np.int64)
    weight = np.empty(batch * m, np.float32)
    full = np.float64(crop * crop)
    for c in range(batch):
        dx, dy = np.int64(shift[c, 0]), np.int64(shift[c, 1])
        for t in range(m):
            row, col = divmod(t, grid)
            y, x = row * crop + dy, col * crop + dx
            y0, y1 = max(y, 0), min(y + crop, side)
            x0, x1 = max(x, 0), min(x + crop, side)
            h, w = max(y1 - y0, 0), max(x1 - x0, 0)
            paste[c, t, 0], paste[c, t, 1], paste[c, t, 2] = y0 - y, x0 - x, h
            paste[c, t, 3], paste[c, t, 4], paste[c, t, 5] = w, y0, x0
            r = c * m + t
            rois[r, 0], rois[r, 1], rois[r, 2], rois[r, 3], rois[r, 4] = c, x0, y0, x0 + w, y0 + h
            src[r] = tile_src[c, t]
            weight[r] = (h * w) / full
    return paste, rois, src, weight


# ---------------------------------------------------------------- SCRL pairs
# SCRL (Roh et al., CVPR 2021). Official code: kakaobrain/scrl,
# models/box_generator.py `SCRLBoxGenerator.generate`, with the configs'
# grid_based_box_gen=True. Boxes get integer corners in a "frame": the two
# windows' intersection scaled, per axis, by the smaller of the two views'
# scales (size / max(w0, w1) horizontally, size / max(h0, h1) vertically),
# so a box of side >= min_size there has side >= min_size in both views.
# round_frame (official): the frame's side is round() of the scaled
# intersection and must exceed min_size; a box reaching past a view's edge
# by the rounding is clipped there (official clip_box). Otherwise (ours):
# floor() and at least min_size, so every box lies inside both windows.

@numba.njit(cache=True, error_model="numpy")
def _pair_frame(window, b, size, round_frame):
    """Intersection of windows [0, b] and [1, b] (top, left, h, w) in source
    pixels. Returns (ix, iy, wmax, hmax, fw, fh): its top-left corner, the
    larger window width and height, and its integer size in the frame,
    fw = floor((x1 - x0) * size / wmax), or with round_frame the official
    round((x1 - x0) * (size / wmax)) in float64 (half to even, as Python's
    round); fw = fh = -1 when there is none."""
    t0, l0 = np.int64(window[0, b, 0]), np.int64(window[0, b, 1])
    h0, w0 = np.int64(window[0, b, 2]), np.int64(window[0, b, 3])
    t1, l1 = np.int64(window[1, b, 0]), np.int64(window[1, b, 1])
    h1, w1 = np.int64(window[1, b, 2]), np.int64(window[1, b, 3])
    ix0, ix1 = max(l0, l1), min(l0 + w0, l1 + w1)
    iy0, iy1 = max(t0, t1), min(t0 + h0, t1 + h1)
    wmax, hmax = max(w0, w1), max(h0, h1)
    if ix1 <= ix0 or iy1 <= iy0:
        return ix0, iy0, wmax, hmax, np.int64(-1), np.int64(-1)
    if round_frame:
        fw = np.int64(round(np.float64(ix1 - ix0) * (np.float64(size) / np.float64(wmax))))
        fh = np.int64(round(np.float64(iy1 - iy0) * (np.float64(size) / np.float64(hmax))))
        return ix0, iy0, wmax, hmax, fw, fh
    return ix0, iy0, wmax, hmax, (ix1 - ix0) * size // wmax, (iy1 - iy0) * size // hmax


@numba.njit(cache=True, error_model="numpy")
def _pair_sample(s, fw, fh, k, min_size, max_iou, tries, keep_last, out, cws, chs):
    """Up to k boxes (x0, y0, x1, y1) with integer corners in an fw x fh
    frame (fw, fh >= min_size >= 1) into out[:k], drawn from state s;
    returns how many. cws and chs are scratch of fw // min_size + 1 and
    fh // min_size + 1 entries.

    The official grid-based generation: split the frame into dw x dh cells
    (dw uniform in 1..fw // min_size), pick a cell, a box side uniform in
    [min_size, cell side] and a position inside the cell. A box whose IoU
    with a box of the image accepted before exceeds max_iou is drawn again,
    `tries` times at most; then keep_last keeps the last draw (official),
    otherwise that box is dropped (ours: the IoU bound always holds).
    """
    n = 0
    nw, nh = fw // min_size, fh // min_size
    ffw, ffh = np.float64(fw), np.float64(fh)
    for d in range(1, nw + 1):
        cws[d] = fw // d  # cell side for d cells
    for d in range(1, nh + 1):
        chs[d] = fh // d
    for _ in range(k):
        for _t in range(tries):
            s, dw = _sbelow(s, nw)
            s, dh = _sbelow(s, nh)
            dw += 1
            dh += 1
            s, gx = _sbelow(s, dw)
            s, gy = _sbelow(s, dh)
            cw, ch = cws[dw], chs[dh]
            s, bw = _sbelow(s, cw - min_size + 1)
            s, bh = _sbelow(s, ch - min_size + 1)
            bw += min_size
            bh += min_size
            s, x0 = _sbelow(s, cw - bw + 1)
            s, y0 = _sbelow(s, ch - bh + 1)
            # the cell's start floor(g * f / d), through float64: exact for
            # these small positive integers, and far faster than Numba's //
            x0 += np.int64(gx * ffw / dw)
            y0 += np.int64(gy * ffh / dh)
            x1, y1 = x0 + bw, y0 + bh
            area = bw * bh
            bad = False
            for j in range(n):  # IoU with the boxes accepted so far
                iw = max(min(x1, out[j, 2]) - max(x0, out[j, 0]), 0)
                ih = max(min(y1, out[j, 3]) - max(y0, out[j, 1]), 0)
                inter = iw * ih
                union = area + (out[j, 2] - out[j, 0]) * (out[j, 3] - out[j, 1]) - inter
                bad |= inter > max_iou * union
            if not bad or (keep_last and _t == tries - 1):
                out[n, 0], out[n, 1], out[n, 2], out[n, 3] = x0, y0, x1, y1
                n += 1
                break
    return n


@numba.njit(cache=True, error_model="numpy", nogil=True)
def _pair_boxes(window, flip, size, frame, count, round_frame):
    """The deterministic part: frame boxes frame[b, :count[b]] to float32
    [2, P, 5] (b, x0, y0, x1, y1) in the pixels of views 0 and 1, P =
    count.sum(), image by image.

    A frame x is x_src = ix + x * wmax / size in the source, and
    x_view = (x_src - left) * size / w in a view; computed with one rounding
    as ((ix - left) * size + x * wmax) / w, an integer over an integer, so a
    box of a floored frame lies inside [0, size] exactly; a rounded frame's
    may reach past it by the rounding and is clipped to size (official
    clip_box). A flipped view mirrors x -> size - x.
    """
    batch, total = window.shape[1], count.sum()
    num = np.empty(2 * total * 4, np.float64)
    den = np.empty(2 * total * 4, np.float64)
    p = 0
    for b in range(batch):
        if count[b] == 0:
            continue
        ix, iy, wmax, hmax, fw, fh = _pair_frame(window, b, size, round_frame)
        for v in range(2):
            top, left = np.int64(window[v, b, 0]), np.int64(window[v, b, 1])
            h, w = np.float64(window[v, b, 2]), np.float64(window[v, b, 3])
            ox, oy = (ix - left) * size, (iy - top) * size
            for i in range(count[b]):
                q = (v * total + p + i) * 4
                num[q] = ox + frame[b, i, 0] * wmax
                num[q + 1] = oy + frame[b, i, 1] * hmax
                num[q + 2] = ox + frame[b, i, 2] * wmax
                num[q + 3] = oy + frame[b, i, 3] * hmax
                den[q], den[q + 1], den[q + 2], den[q + 3] = w, h, w, h
        p += count[b]
    for q in range(num.shape[0]):  # one vectorised pass of exact divisions
        num[q] /= den[q]
    boxes = np.empty((2, total, 5), np.float32)
    p = 0
    for b in range(batch):
        for v in range(2):
            for i in range(count[b]):
                q = (v * total + p + i) * 4
                x0, x1 = num[q], min(num[q + 2], np.float64(size))
                if flip[v, b]:
                    x0, x1 = size - x1, size - x0
                r = p + i
                boxes[v, r, 0], boxes[v, r, 1], boxes[v, r, 2], boxes[v, r, 3], boxes[v, r, 4] = (
                    b, x0, num[q + 1], x1, min(num[q + 3], np.float64(size)))
        p += count[b]
    return boxes


@numba.njit(cache=True, error_model="numpy", nogil=True)
def _pair_draws(key, window, size, k, min_size, max_iou, tries, round_frame, keep_last, positions):
    """The random part of SCRL pairs: frame boxes int64 [B, k, 4] (x0, y0,
    x1, y1; rows from count[b] on are zero) and count int32 [B]. Image b
    draws from substream (0, positions[b]) of `key` (its place in the
    epoch's global order); an image whose frame is under min_size
    (round_frame, official: not above it), or whose windows do not meet,
    gets none."""
    batch = window.shape[1]
    min_size = max(min_size, 1)
    frame = np.zeros((batch, k, 4), np.int64)
    count = np.zeros(batch, np.int32)
    cells = np.empty((2, (size + 1) // min_size + 1), np.int64)  # fw, fh <= size (rounded: size + 1 at most)
    for b in range(batch):
        ix, iy, wmax, hmax, fw, fh = _pair_frame(window, b, size, round_frame)
        if fw < min_size + round_frame or fh < min_size + round_frame:
            continue
        count[b] = _pair_sample(_seed(key, 0, positions[b]), fw, fh, k, min_size, max_iou, tries, keep_last,
                                frame[b], cells[0], cells[1])
    return frame, count


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
            order = _permutation(len(self.widths), np.uint64(_key(self.seed, epoch, 0, 0, _STREAM_PERM)))
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
            key = _key(self.seed, epoch, 0, 0, _STREAM_CROPS + i)
            out.crops[c.name] = self._views(key, index, positions, self._augs[c.name], c.scale, c.ratio, False,
                                            c.size, tuple(c.aug(v) for v in range(c.count)))
        if self.spec.original is not None:
            o = self.spec.original
            key = _key(self.seed, epoch, 0, 0, _STREAM_ORIGINAL)
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
        key = _key(self.seed, epoch, 0, 0, _STREAM_MOSAIC)
        crops = self._views(key, index, positions, self._mosaic_augs, ms.scale, ms.ratio, False, ms.crop_size,
                            (ms.aug,) * m)
        # Which images share a canvas is drawn per rank's batch (a canvas is
        # pasted from images one rank holds), keyed on where the batch starts
        # and how long it is: the same slice of the global order gives the same mosaics.
        key = _key(self.seed, epoch, int(positions[0]), len(positions), _STREAM_MOSAIC_GROUP)
        # |shift| < crop keeps at least one row and column of every tile visible.
        tile_src, tile_crop, shift = _mosaic_draws(np.uint64(key), len(index), m, int(ms.jitter),
                                                   ms.crop_size - 1)
        paste, rois, src, weight = _mosaic_geometry(tile_src, shift, ms.grid, ms.crop_size)
        return MosaicPlan(crops=crops, tile_src=tile_src, tile_crop=tile_crop, shift=shift, paste=paste,
                          rois=rois, src=src, weight=weight, canvas_size=ms.canvas_size)

    def _pairs(self, epoch, positions, crops: CropPlan) -> PairPlan:
        ps = self.spec.pairs
        key = _key(self.seed, epoch, 0, 0, _STREAM_PAIRS)
        frame, count = _pair_draws(np.uint64(key), crops.window, crops.size, ps.boxes_per_image, ps.min_size,
                                   float(ps.max_iou), ps.tries, ps.round_frame, ps.keep_last, positions)
        return PairPlan(boxes=_pair_boxes(crops.window, crops.flip, crops.size, frame, count, ps.round_frame),
                        count=count)


def step_key(seed: int, epoch: int, a: int, b: int, stream: int = 0) -> int:
    """The 64-bit key of a stream (exposed for tests): (a, b) = (0, 0) for
    the epoch-wide streams, (first position, length) for a mosaic grouping."""
    return int(_key(seed, epoch, a, b, stream))

"""The mosaic planner: which crops of which images fill each MosRep canvas, and where.

`Planner._mosaic` (pipelines/plan.py) plans the crops themselves like any
view family, then calls `mosaic_draws` for the grouping and jitter and
`mosaic_geometry` for the paste table and RoIs.
"""
from __future__ import annotations

import numba
import numpy as np

from .draws import draw_arcsine, draw_index, substream

# MosRep (Wang et al., ICLR 2023). The official code (DerrickWang005/
# MosRep.pytorch, moco/builder.py `_mosaic_ddp` and `_shift`) puts crop k of
# image (c - k) mod B into cell k of canvas c (a fixed roll of the batch),
# then moves every canvas of the batch by ONE offset
# int((Beta(.5, .5) * 2 - 1) * 48) per axis into torch.zeros_like(mosaic) of
# the already *normalised* tensor. Here the assignment is random (below)
# and every canvas gets its own shift.

@numba.njit(cache=True, error_model="numpy", nogil=True)
def mosaic_draws(key, batch, m, jitter, limit):
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
    s = substream(key, 0, 0)
    perm = np.arange(batch)
    for i in range(batch - 1, 0, -1):  # Fisher-Yates
        s, j = draw_index(s, i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    pool = np.arange(batch)
    off = np.empty(m, np.int64)
    for k in range(m):
        s, j = draw_index(s, batch - k)
        j += k
        pool[k], pool[j] = pool[j], pool[k]
        off[k] = pool[k]
    crop_of = np.empty((batch, m), np.int32)
    for i in range(batch):
        for k in range(m):
            crop_of[i, k] = k
        for k in range(m - 1, 0, -1):
            s, j = draw_index(s, k + 1)
            crop_of[i, k], crop_of[i, j] = crop_of[i, j], crop_of[i, k]
    tile_src = np.empty((batch, m), np.int32)
    tile_crop = np.empty((batch, m), np.int32)
    cell = np.empty(m, np.int64)
    for c in range(batch):
        for k in range(m):
            cell[k] = k
        for k in range(m - 1, 0, -1):
            s, j = draw_index(s, k + 1)
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
        s, u = draw_arcsine(s)
        dy = np.int64((u * 2.0 - 1.0) * jitter)
        s, u = draw_arcsine(s)
        dx = np.int64((u * 2.0 - 1.0) * jitter)
        shift[c, 0] = min(max(dx, -limit), limit)
        shift[c, 1] = min(max(dy, -limit), limit)
    return tile_src, tile_crop, shift


@numba.njit(cache=True, error_model="numpy", nogil=True)
def mosaic_geometry(tile_src, shift, grid, crop):
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


"""The SCRL pair planner: matched boxes in the overlap of a sample's two views.

`Planner._pairs` (pipelines/plan.py) calls `pair_draws` for the random
frame boxes and `pair_boxes` to map them into each view's pixels.
"""
from __future__ import annotations

import numba
import numpy as np

from .draws import draw_index_multiply_shift, substream

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
def pair_frame(window, b, size, round_frame):
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
def pair_sample(s, fw, fh, k, min_size, max_iou, tries, keep_last, out, cws, chs):
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
            s, dw = draw_index_multiply_shift(s, nw)
            s, dh = draw_index_multiply_shift(s, nh)
            dw += 1
            dh += 1
            s, gx = draw_index_multiply_shift(s, dw)
            s, gy = draw_index_multiply_shift(s, dh)
            cw, ch = cws[dw], chs[dh]
            s, bw = draw_index_multiply_shift(s, cw - min_size + 1)
            s, bh = draw_index_multiply_shift(s, ch - min_size + 1)
            bw += min_size
            bh += min_size
            s, x0 = draw_index_multiply_shift(s, cw - bw + 1)
            s, y0 = draw_index_multiply_shift(s, ch - bh + 1)
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
def pair_boxes(window, flip, size, frame, count, round_frame):
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
        ix, iy, wmax, hmax, fw, fh = pair_frame(window, b, size, round_frame)
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
def pair_draws(key, window, size, k, min_size, max_iou, tries, round_frame, keep_last, positions):
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
        ix, iy, wmax, hmax, fw, fh = pair_frame(window, b, size, round_frame)
        if fw < min_size + round_frame or fh < min_size + round_frame:
            continue
        count[b] = pair_sample(substream(key, 0, positions[b]), fw, fh, k, min_size, max_iou, tries, keep_last,
                                frame[b], cells[0], cells[1])
    return frame, count


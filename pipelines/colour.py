"""Everything that follows a view's resize, written once for two targets.

A view's photometric augmentation, as torchvision's ops on PIL images do it
(pipelines/torchvision.py `render_view`, the reference): colour jitter in
the plan's order, grayscale, Gaussian blur, solarize, then normalisation.
The maths lives in `_pixel_ops`, one set of per-pixel functions compiled
twice:

- for the CPU (`numba.njit`): `augment` / `render`, run per view by the DALI
  CPU graph's Numba operator (pipelines/dali_graph.py) and FFCV's compiled stage;
- for CUDA (`numba.cuda.jit`): `render_group`, what follows the resize on
  a GPU for DALI's GPU graph and FFCV's colour on the device: per view
  family and step, `render_views` over all its views (up to three launches
  on torch's current stream, writing normalised pixels straight into the
  training tensor) and for the mosaic `paste_mosaics`, which builds MosRep's
  canvases from those tiles. A block covers a tile of one view (a 2-D grid
  of views x tiles; threads walk rows and columns, no pixel index is
  divided); each pixel goes through every colour operation in registers,
  and a blurred view is blurred tile by tile from shared memory. Numba's
  CUDA simulator (NUMBA_ENABLE_CUDASIM=1) runs the same kernels on the CPU,
  which is how CI tests them (bench/cuda_ptx.py compiles and links them
  without a GPU). The kernels compile at their first launch in a process,
  once per output dtype, into numba-cuda's on-disk cache (`_kernel`).

Bit for bit with Pillow (Blend.c, Convert.c, ImageEnhance) and torchvision's
Gaussian: float32 where they compute in float, float64 where Pillow mixes
in double literals, truncation where it casts. Every product that is later
added goes through `mul`/`add` primitives: on CUDA they are libdevice's
`__fmul_rn`/`__fadd_rn`, which the compiler never contracts into a fused
multiply-add (NVVM contracts by default, and an FMA rounds once where
Pillow rounds twice). Types are written out wherever Numba's typing and
NumPy's scalar promotion (the simulator) could disagree.

A view's parameters are one float32 vector (`view_params`, layout `P_*`).
"""
from __future__ import annotations

import math
import types as pytypes

import numba
import numba.core.cgutils
import numba.extending
import numpy as np
import torch
from numba import cuda  # the simulator's under NUMBA_ENABLE_CUDASIM=1; kernels read it as a global


from .views import MEAN, MOSAIC_FILL, STD

# The per-view parameter vector (float32), by column.
PARAM_JITTER = 0        # 1: colour jitter applies to this view
PARAM_ORDER = 1         # 4 columns: the jitter's operations in their drawn order (SKIP: left out)
PARAM_BRIGHTNESS = 5    # jitter factors
PARAM_CONTRAST = 6
PARAM_SATURATION = 7
PARAM_HUE = 8           # hue shift in PIL's uint8 steps
PARAM_GRAY = 9          # 1: grayscale
PARAM_SIGMA = 10        # blur sigma (0: no blur)
PARAM_KERNEL = 11       # blur kernel size
PARAM_SOLARIZE = 12     # 1: solarize
PARAM_LEN = 13
# An order slot holding SKIP does nothing: ColorJitter leaves out an
# operation whose strength is 0 (adjust_hue(0) is not the identity in PIL).
SKIP = 4
# x * NORM_SCALE + NORM_SHIFT = (x / 255 - MEAN) / STD, in float32 as PlannedLoader.normalize computes it.
_MEAN255, _STD255 = np.asarray(MEAN, np.float32) * np.float32(255), np.asarray(STD, np.float32) * np.float32(255)
NORM_SCALE, NORM_SHIFT = np.float32(1) / _STD255, -_MEAN255 / _STD255
# MosRep's fill colour normalised as above, float32 [3]: computed here once for
# every renderer that pastes mosaics after normalisation.
MOSAIC_FILL_NORMALISED = np.asarray(MOSAIC_FILL, np.float32) * NORM_SCALE + NORM_SHIFT
THREADS = 256  # CUDA threads per view (block); the contrast reduction's shared array has this size


def view_params(cp, augs, size: int) -> np.ndarray:
    """float32 [count, B, PARAM_LEN] from a CropPlan; `augs` one AugSpec per view."""
    p = np.zeros(cp.window.shape[:2] + (PARAM_LEN,), np.float32)
    p[..., PARAM_JITTER] = cp.jitter
    strength = np.array([[a.brightness, a.contrast, a.saturation, a.hue] for a in augs], np.float32)  # [count, 4]
    strength = np.broadcast_to(strength[:, None, :], cp.order.shape)
    active = np.take_along_axis(strength, cp.order.astype(np.int64), axis=-1) > 0
    p[..., PARAM_ORDER:PARAM_ORDER + 4] = np.where(active, cp.order, SKIP)
    p[..., PARAM_BRIGHTNESS:PARAM_HUE] = cp.factors[..., :3]
    # torchvision's PIL hue shift: int32(h * 255) mod 256 steps of H
    p[..., PARAM_HUE] = (cp.factors[..., 3].astype(np.float64) * 255).astype(np.int32) & 255
    p[..., PARAM_GRAY] = cp.gray
    p[..., PARAM_SIGMA] = cp.sigma
    p[..., PARAM_KERNEL] = np.array([a.blur_kernel(size) for a in augs], np.float32)[:, None]
    p[..., PARAM_SOLARIZE] = cp.solarize
    return p


# ---------------------------------------------------------------- the maths, once
def _pixel_ops(jit, mul, add, dmul, rint):
    """Per-pixel functions compiled by `jit` over the target's float32
    multiply and add (`mul`, `add`), float64 multiply (`dmul`) and float32
    round-half-to-even (`rint`)."""

    @jit
    def luma(r, g, b):
        """PIL's RGB -> 'L' (ITU-R 601-2, fixed point, rounded); int64 in and out."""
        return (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16

    @jit
    def blend(base, value, alpha):
        """Image.blend(base, value, alpha) of one channel value (int64, int64,
        float32): the float result truncated, clipped. (Pillow clips only when
        alpha leaves [0, 1]; inside it the result lies in [0, 255] anyway, and
        without the branch the CPU loops vectorise.)"""
        v = add(np.float32(base), mul(alpha, np.float32(value - base)))
        return np.uint8(min(max(int(v), 0), 255))

    @jit
    def contrast_centre(total, count):
        """ImageEnhance.Contrast's centre: the 'L' image's mean, rounded (int64)."""
        return np.int64(np.float64(total) / np.float64(count) + np.float64(0.5))

    @jit
    def tap(acc, weight, value):
        """One tap of torchvision's Gaussian: acc + weight * value, float32."""
        return add(acc, mul(weight, np.float32(value)))

    @jit
    def round_even_clip(v):
        """torch.round (half to even) of a float32 sum, clipped to uint8."""
        return np.uint8(min(max(rint(v), np.float32(0)), np.float32(255)))

    @jit
    def solarize(v):
        return np.uint8(255) - v if v >= 128 else v

    @jit
    def normalise(v, scale, shift):
        return add(mul(np.float32(v), scale), shift)

    @jit
    def reflect(i, n):
        """torch's 'reflect' padding (edge not repeated; DALI's reflect-101)."""
        if i < 0:
            return -i
        if i >= n:
            return 2 * n - 2 - i
        return i

    hue = _hue_op(jit, mul, dmul)
    return pytypes.SimpleNamespace(luma=luma, blend=blend, contrast_centre=contrast_centre, hue=hue, tap=tap,
                                   round_even_clip=round_even_clip, solarize=solarize, normalise=normalise,
                                   reflect=reflect)


def _hue_op(jit, mul, dmul):
    """torchvision's PIL adjust_hue of one pixel, compiled by `jit` over the
    target's float32 (`mul`) and float64 (`dmul`) multiply (_pixel_ops)."""

    @jit
    def round_clip(v):
        """Pillow's float64 -> uint8 in hsv2rgb: round half up, clip."""
        return np.uint8(min(max(int(math.floor(v + np.float64(0.5))), 0), 255))

    @jit
    def hue(r, g, b, shift):
        """torchvision's PIL adjust_hue of one pixel: Pillow's rgb2hsv, H +=
        shift (mod 256), hsv2rgb. int64 in, (uint8, uint8, uint8) out."""
        maxc = max(r, max(g, b))
        minc = min(r, min(g, b))
        if minc == maxc:  # grey: the round trip returns it unchanged
            return np.uint8(r), np.uint8(g), np.uint8(b)
        cr = np.float32(maxc - minc)
        s = cr / np.float32(maxc)
        rc = np.float32(maxc - r) / cr
        gc = np.float32(maxc - g) / cr
        bc = np.float32(maxc - b) / cr
        if r == maxc:
            hf = bc - gc
        elif g == maxc:
            hf = np.float32(np.float64(2.0) + np.float64(rc) - np.float64(bc))
        else:
            hf = np.float32(np.float64(4.0) + np.float64(gc) - np.float64(rc))
        hh = np.float64(hf) / np.float64(6.0) + np.float64(1.0)
        hf = np.float32(hh - math.floor(hh))
        h = np.int64(min(max(int(np.float64(hf) * np.float64(255.0)), 0), 255))
        sat = np.int64(min(max(int(np.float64(s) * np.float64(255.0)), 0), 255))
        if sat == 0:
            return np.uint8(r), np.uint8(g), np.uint8(b)
        h = (h + shift) & 255
        # Pillow's hsv2rgb
        x6 = np.float64(h) * np.float64(6.0) / np.float64(255.0)
        sector = np.int64(math.floor(x6))
        f = np.float32(x6 - np.float64(sector))
        fs = np.float32(np.float64(sat) / np.float64(255.0))
        vf = np.float64(maxc)
        vv = np.uint8(maxc)
        p = round_clip(dmul(vf, np.float64(1.0) - np.float64(fs)))
        q = round_clip(dmul(vf, np.float64(1.0) - np.float64(mul(fs, f))))
        t = round_clip(dmul(vf, np.float64(1.0) - dmul(np.float64(fs), np.float64(1.0) - np.float64(f))))
        sector = sector % 6
        if sector == 0:
            return vv, t, p
        if sector == 1:
            return q, vv, p
        if sector == 2:
            return p, vv, t
        if sector == 3:
            return p, q, vv
        if sector == 4:
            return t, p, vv
        return vv, p, q

    return hue


# ---------------------------------------------------------------- CPU
_cpu_jit = numba.njit(cache=True, inline="always")


@_cpu_jit
def _mul(a, b):
    return a * b


@_cpu_jit
def _add(a, b):
    return a + b


@_cpu_jit
def _rint(v):
    return np.rint(v)


_CPU = _pixel_ops(_cpu_jit, _mul, _add, _mul, _rint)
_luma, _blend, _hue_pixel, _tap = _CPU.luma, _CPU.blend, _CPU.hue, _CPU.tap
_round_even_clip, _solarize_value, _normalise, _reflect = (_CPU.round_even_clip, _CPU.solarize, _CPU.normalise,
                                                           _CPU.reflect)
_contrast_centre = _CPU.contrast_centre


@numba.njit(cache=True)
def _brightness(x, alpha):
    flat = x.reshape(-1)  # one loop over every value vectorises; x is contiguous
    for i in range(flat.size):
        flat[i] = _blend(np.int64(0), np.int64(flat[i]), alpha)


@numba.njit(cache=True)
def _contrast(x, alpha):
    """ImageEnhance.Contrast: blend with the 'L' image's mean, rounded."""
    h, w, _ = x.shape
    total = np.int64(0)
    for i in range(h):
        for j in range(w):
            total += _luma(np.int64(x[i, j, 0]), np.int64(x[i, j, 1]), np.int64(x[i, j, 2]))
    mean = _contrast_centre(total, np.int64(h * w))
    flat = x.reshape(-1)
    for i in range(flat.size):
        flat[i] = _blend(mean, np.int64(flat[i]), alpha)


@numba.njit(cache=True)
def _saturation(x, alpha):
    """ImageEnhance.Color: blend with the pixel's 'L' value."""
    px = x.reshape(-1, 3)
    for i in range(px.shape[0]):
        lum = _luma(np.int64(px[i, 0]), np.int64(px[i, 1]), np.int64(px[i, 2]))
        for c in range(3):
            px[i, c] = _blend(lum, np.int64(px[i, c]), alpha)


@numba.njit(cache=True)
def _hue(x, shift):
    hgt, wid, _ = x.shape
    for i in range(hgt):
        for j in range(wid):
            x[i, j, 0], x[i, j, 1], x[i, j, 2] = _hue_pixel(np.int64(x[i, j, 0]), np.int64(x[i, j, 1]),
                                                            np.int64(x[i, j, 2]), shift)


@numba.njit(cache=True)
def _grayscale(x):
    h, w, _ = x.shape
    for i in range(h):
        for j in range(w):
            lum = np.uint8(_luma(np.int64(x[i, j, 0]), np.int64(x[i, j, 1]), np.int64(x[i, j, 2])))
            x[i, j, 0], x[i, j, 1], x[i, j, 2] = lum, lum, lum


@numba.njit(cache=True)
def gaussian(k, sigma):
    """torchvision's _get_gaussian_kernel1d in float32 (x = -r..r). Both
    targets take their weights from here (computed on the host for CUDA),
    so the two cannot differ through exp()."""
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


@numba.njit(cache=True)
def blur(x, k, sigma):
    """torchvision's gaussian_blur (k x k, reflect borders, float32, then
    rounded) as two 1-D passes: its 2-D kernel is their outer product. Each
    output sums its taps in the same order on both targets."""
    h, w, c = x.shape
    r = k // 2
    wt = gaussian(k, sigma)
    rows = np.empty((h, w * c), np.float32)
    padded = np.empty((w + 2 * r) * c, np.float32)  # converted once, not once per tap
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
                out[i] = _tap(out[i], kj, padded[off + i])
    acc = np.empty(w * c, np.float32)
    for y in range(h):
        acc[:] = 0
        for j in range(k):
            kj, src = wt[j], rows[_reflect(y + j - r, h)]
            for i in range(w * c):
                acc[i] = _tap(acc[i], kj, src[i])
        for i in range(w):
            for ch in range(c):
                x[y, i, ch] = _round_even_clip(acc[i * c + ch])


@numba.njit(cache=True)
def _solarize(x):
    h, w, _ = x.shape
    for i in range(h):
        for j in range(w):
            for c in range(3):
                x[i, j, c] = _solarize_value(x[i, j, c])


@numba.njit(cache=True)
def augment(out, image, p):
    """All that follows the resize, for one view of one sample, as
    pipelines.torchvision.render_view: out = image after colour jitter in
    the order p[PARAM_ORDER:PARAM_ORDER+4] (0 brightness, 1 contrast, 2 saturation,
    3 hue, SKIP) when p[PARAM_JITTER], grayscale, blur, solarize.
    out, image: (H, W, 3) uint8; p: `view_params`."""
    out[:] = image
    if p[PARAM_JITTER] > 0.5:
        for k in range(4):
            op = int(p[PARAM_ORDER + k])
            if op == 0:
                _brightness(out, p[PARAM_BRIGHTNESS])
            elif op == 1:
                _contrast(out, p[PARAM_CONTRAST])
            elif op == 2:
                _saturation(out, p[PARAM_SATURATION])
            elif op == 3:
                _hue(out, np.int64(p[PARAM_HUE]))
    if p[PARAM_GRAY] > 0.5:
        _grayscale(out)
    if p[PARAM_SIGMA] > 0:
        blur(out, int(p[PARAM_KERNEL]), p[PARAM_SIGMA])
    if p[PARAM_SOLARIZE] > 0.5:
        _solarize(out)


@numba.njit(cache=True)
def render(out, image, p):
    """`augment` (skipped, with its copy, when p asks for nothing), then
    normalisation into out: (H, W, 3) float32; image: (H, W, 3) uint8."""
    if p[PARAM_JITTER] > 0.5 or p[PARAM_GRAY] > 0.5 or p[PARAM_SIGMA] > 0 or p[PARAM_SOLARIZE] > 0.5:
        src = np.empty_like(image)
        augment(src, image, p)
    else:
        src = image
    h, w, _ = src.shape
    scale, shift = NORM_SCALE, NORM_SHIFT
    for y in range(h):
        for x in range(w):
            for c in range(3):
                out[y, x, c] = _normalise(src[y, x, c], scale[c], shift[c])


@numba.njit(cache=True)
def _weight_table(params, width):
    """float32 [N, width]: each view's Gaussian weights (zeros when unblurred)."""
    out = np.zeros((params.shape[0], width), np.float32)
    for n in range(params.shape[0]):
        if params[n, PARAM_SIGMA] > 0:
            k = int(params[n, PARAM_KERNEL])
            out[n, :k] = gaussian(k, params[n, PARAM_SIGMA])
    return out


@numba.extending.intrinsic
def void_ptr(typingctx, address):
    """An integer address as a void pointer, for numba.carray: how the C
    functions that DALI's Numba operator and FFCV's stage call by address
    reach their buffers."""
    sig = numba.types.voidptr(address)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], numba.core.cgutils.voidptr_t)
    return sig, codegen


# ---------------------------------------------------------------- CUDA
# A launch's block: THREADS threads, 32 along a row; each block covers a
# TILE x TILE tile of one view (the blur's, up to 2 TILE x TILE: _blur_tile;
# grid: view x tile rows x tile columns), so threads walk rows and columns
# and no pixel index is divided. SHARED_BYTES: the dynamic shared memory a
# blur block may use (48 KB: every GPU's limit without an opt-in).
THREADS, TILE, SHARED_BYTES = 256, 32, 48 * 1024
_KERNELS = {}
_FILLS = {}  # (device, dtype) -> MosRep's fill colour, normalised, on that device


def _simulated() -> bool:
    return bool(numba.config.ENABLE_CUDASIM)


def _kernel(fn):
    """cuda.jit with numba-cuda's on-disk cache: a kernel's first launch in a
    process compiles it (NVVM, then nvJitLink) and stores the PTX and cubin
    (in NUMBA_CACHE_DIR when set, else pipelines/__pycache__, else
    ~/.cache/numba); later processes load them. The key: the kernel's code
    and device functions, colour.py's time stamp, the signature (output
    dtype), the GPU's compute capability, the CUDA runtime's and
    numba-cuda's versions."""
    if _simulated():
        return cuda.jit(fn)
    try:
        return cuda.jit(cache=True)(fn)
    except RuntimeError:  # no writable cache folder: compile in every process
        return cuda.jit(fn)


def _cuda_kernels() -> dict:
    """The kernels for numba.cuda, built on first use; under
    NUMBA_ENABLE_CUDASIM=1 the simulator's, with plain float32 primitives.

    render_views launches them over a family's views [N, H, W, 3]: `pixel`
    twice, the totals pass over the views with contrast (the jitter slots
    before contrast, written back, and the exact int64 sum of the 'L' image
    that contrast centres on), then the colour pass over every view (the
    rest of the jitter, grayscale, then for an unblurred view solarize and
    normalisation into out, for a blurred one the uint8 pixels back in
    place); then `blur` over the blurred views (each block blurs a tile from
    shared memory, then solarize and normalisation into out), or, for a
    radius whose tile does not fit in shared memory, `blur_pass` twice
    (rows, then columns) through a float32 scratch of the blurred views."""
    if _KERNELS:
        return _KERNELS
    device = cuda.jit(device=True)
    if _simulated():
        mul, add, dmul = device(lambda a, b: a * b), device(lambda a, b: a + b), device(lambda a, b: a * b)
        rint = device(lambda v: np.float32(np.rint(v)))
    else:
        from numba.cuda import libdevice
        mul, add, dmul, rint = libdevice.fmul_rn, libdevice.fadd_rn, libdevice.dmul_rn, libdevice.rintf
    ops = _pixel_ops(device, mul, add, dmul, rint)
    d = _device_helpers(device, ops)
    _KERNELS.update(pixel=_pixel_kernel(d), blur=_blur_kernel(d), blur_pass=_blur_pass_kernel(d),
                    paste=_paste_kernel(d))
    return _KERNELS


def _device_helpers(device, ops):
    """The kernels' device functions: the per-pixel maths (`ops`, from
    _pixel_ops) and the helpers over a view's parameters and a block's tile."""
    luma, blend, hue, solarize, normalise = ops.luma, ops.blend, ops.hue, ops.solarize, ops.normalise

    @device
    def contrast_slot(p):
        """The slot of contrast in the view's jitter order, -1 when none runs."""
        slot = -1
        if p[PARAM_JITTER] > 0.5:
            for k in range(4):
                if int(p[PARAM_ORDER + k]) == 1:
                    slot = k
        return slot

    @device
    def jitter(r, g, b, p, first, last, mean):
        """Jitter slots first..last-1 of view p on one pixel (int64 values)."""
        for k in range(first, last):
            op = int(p[PARAM_ORDER + k])
            if op == 0:
                alpha = p[PARAM_BRIGHTNESS]
                r, g, b = (np.int64(blend(np.int64(0), r, alpha)), np.int64(blend(np.int64(0), g, alpha)),
                           np.int64(blend(np.int64(0), b, alpha)))
            elif op == 1:
                alpha = p[PARAM_CONTRAST]
                r, g, b = (np.int64(blend(mean, r, alpha)), np.int64(blend(mean, g, alpha)),
                           np.int64(blend(mean, b, alpha)))
            elif op == 2:
                alpha, lum = p[PARAM_SATURATION], luma(r, g, b)
                r, g, b = np.int64(blend(lum, r, alpha)), np.int64(blend(lum, g, alpha)), np.int64(blend(lum, b, alpha))
            elif op == 3:
                hr, hg, hb = hue(r, g, b, np.int64(p[PARAM_HUE]))
                r, g, b = np.int64(hr), np.int64(hg), np.int64(hb)
        return r, g, b

    @device
    def pick(t, c):
        """t[c] of a 3-tuple by selects (a runtime index puts the tuple in local memory)."""
        return t[0] if c == 0 else t[1] if c == 1 else t[2]

    @device
    def tile_walk(tile, h, w):
        """A thread's first row, the tile's row end, its first column and the
        column end, for the block's tile (grid y, z) of an h x w image."""
        y0, x0 = cuda.blockIdx.y * tile, cuda.blockIdx.z * tile
        return y0 + cuda.threadIdx.y, min(y0 + tile, h), x0 + cuda.threadIdx.x, min(x0 + tile, w)

    @device
    def finish(out, v, y, x, c, value, sol, scale, shift):
        """Solarize (when asked) and normalise one uint8 value into out."""
        if sol:
            value = solarize(value)
        out[v, y, x, c] = normalise(value, pick(scale, c), pick(shift, c))

    return pytypes.SimpleNamespace(**vars(ops), contrast_slot=contrast_slot, jitter=jitter, pick=pick,
                                   tile_walk=tile_walk, finish=finish)


def _pixel_kernel(d):
    contrast_slot, centre, tile_walk, jitter, luma, finish = (d.contrast_slot, d.contrast_centre, d.tile_walk,
                                                              d.jitter, d.luma, d.finish)

    @_kernel
    def pixel_kernel(img, params, views, totals, out, tile, totals_pass, scale, shift):
        """Block (i, ty, tx): tile (ty, tx) of view views[i], one pixel at a
        time in registers. The totals pass (views with contrast): the jitter
        slots before contrast, written back, and the 'L' values of the tile
        added to totals[view] (integers: exact in any order). The colour pass
        (every view): the rest of the jitter, grayscale; then a blurred
        view's pixels go back into img, an unblurred one's, solarized when
        asked, normalised into out."""
        v = views[cuda.blockIdx.x]
        p = params[v]
        h, w = img.shape[1], img.shape[2]
        jittered, gray, sol = p[PARAM_JITTER] > 0.5, p[PARAM_GRAY] > 0.5, p[PARAM_SOLARIZE] > 0.5
        first = contrast_slot(p)  # the totals pass runs the slots before it, the colour pass the rest
        mean = centre(totals[v], np.int64(h * w)) if first >= 0 and not totals_pass else np.int64(0)
        back = first > 0 if totals_pass else p[PARAM_SIGMA] > 0  # pixels written back into img, not out
        first = max(first, 0)
        block = cuda.shared.array(1, numba.int64)
        lead = cuda.threadIdx.x == 0 and cuda.threadIdx.y == 0
        if lead:
            block[0] = 0
        cuda.syncthreads()
        total = np.int64(0)
        y, y1, x_first, x1 = tile_walk(tile, h, w)
        while y < y1:
            x = x_first
            while x < x1:
                r, g, b = np.int64(img[v, y, x, 0]), np.int64(img[v, y, x, 1]), np.int64(img[v, y, x, 2])
                if totals_pass:
                    r, g, b = jitter(r, g, b, p, 0, first, np.int64(0))
                    total += luma(r, g, b)
                else:
                    if jittered:
                        r, g, b = jitter(r, g, b, p, first, 4, mean)
                    if gray:
                        r = g = b = luma(r, g, b)
                if back:
                    img[v, y, x, 0], img[v, y, x, 1], img[v, y, x, 2] = np.uint8(r), np.uint8(g), np.uint8(b)
                elif not totals_pass:
                    finish(out, v, y, x, 0, np.uint8(r), sol, scale, shift)
                    finish(out, v, y, x, 1, np.uint8(g), sol, scale, shift)
                    finish(out, v, y, x, 2, np.uint8(b), sol, scale, shift)
                x += cuda.blockDim.x
            y += cuda.blockDim.y
        if totals_pass:
            cuda.atomic.add(block, 0, total)
            cuda.syncthreads()
            if lead:
                cuda.atomic.add(totals, v, block[0])

    return pixel_kernel


def _blur_kernel(d):
    reflect, tap, round_even_clip, finish = d.reflect, d.tap, d.round_even_clip, d.finish

    @_kernel
    def blur_kernel(img, params, views, weights, out, tile_h, tile_w, k_max, scale, shift):
        """Block (i, ty, tx): the output tile (ty, tx) of blurred view
        views[i]. Dynamic shared memory (float32 first, then bytes): the
        weights [k_max]; the rows pass [tile_h + 2r_max, tile_w, 3] float32;
        the source tile with its reflected halo [tile_h + 2r_max, tile_w +
        2r_max, 3] uint8. Every output sums its taps in colour.blur's order."""
        i = cuda.blockIdx.x
        v = views[i]
        p = params[v]
        h, w = img.shape[1], img.shape[2]
        k = int(p[PARAM_KERNEL])
        r, r_max = k // 2, k_max // 2
        y0, x0 = cuda.blockIdx.y * tile_h, cuda.blockIdx.z * tile_w
        ny, nx = min(tile_h, h - y0), min(tile_w, w - x0)
        tx, ty, bx, by = cuda.threadIdx.x, cuda.threadIdx.y, cuda.blockDim.x, cuda.blockDim.y
        fbuf = cuda.shared.array(0, numba.float32)
        ubuf = cuda.shared.array(0, numba.uint8)
        rows_at = k_max                                       # float32 index
        rows_stride = tile_w * 3
        src_at = 4 * (k_max + (tile_h + 2 * r_max) * rows_stride)  # byte index
        src_stride = (tile_w + 2 * r_max) * 3
        # the taps index shared memory with unsigned integers: Numba wraps negative indices, unsigned ones need not
        uk, three, ustride = np.uint64(k), np.uint64(3), np.uint64(rows_stride)
        t = ty * bx + tx
        while t < k:
            fbuf[t] = weights[i, t]
            t += bx * by
        yy = ty
        while yy < ny + 2 * r:  # the source tile and its halo, reflected at the view's borders
            sy = reflect(y0 + yy - r, h)
            xx = tx
            while xx < nx + 2 * r:
                sx = reflect(x0 + xx - r, w)
                at = src_at + yy * src_stride + xx * 3
                ubuf[at], ubuf[at + 1], ubuf[at + 2] = img[v, sy, sx, 0], img[v, sy, sx, 1], img[v, sy, sx, 2]
                xx += bx
            yy += by
        sol = p[PARAM_SOLARIZE] > 0.5
        for along_rows in (True, False):  # the source tile -> float32 rows (halo rows too) -> rounded columns
            cuda.syncthreads()
            yy = ty
            while yy < ny + (2 * r if along_rows else 0):
                xx = tx
                while xx < nx:
                    for c in range(3):
                        at = np.uint64(rows_at + yy * rows_stride + xx * 3 + c)
                        acc = np.float32(0)
                        if along_rows:
                            src = np.uint64(src_at + yy * src_stride + xx * 3 + c)
                            for j in range(uk):
                                acc = tap(acc, fbuf[j], ubuf[src + three * j])
                            fbuf[at] = acc
                        else:
                            for j in range(uk):
                                acc = tap(acc, fbuf[j], fbuf[at + ustride * j])
                            finish(out, v, y0 + yy, x0 + xx, c, round_even_clip(acc), sol, scale, shift)
                    xx += bx
                yy += by

    return blur_kernel


def _blur_pass_kernel(d):
    tile_walk, reflect, tap, round_even_clip, finish = d.tile_walk, d.reflect, d.tap, d.round_even_clip, d.finish

    @_kernel
    def blur_pass_kernel(img, rows, params, views, weights, out, tile, along_rows, scale, shift):
        """The fallback, one pass a launch over tiles of the blurred views:
        along rows, img -> rows[i] [H, W, 3] float32; or along columns,
        rows[i] -> rounded, solarized when asked, normalised into out."""
        i = cuda.blockIdx.x
        v = views[i]
        h, w = img.shape[1], img.shape[2]
        k = int(params[v, PARAM_KERNEL])
        r = k // 2
        sol = params[v, PARAM_SOLARIZE] > 0.5
        y, y1, x_first, x1 = tile_walk(tile, h, w)
        while y < y1:
            x = x_first
            while x < x1:
                for c in range(3):
                    acc = np.float32(0)
                    for j in range(k):
                        if along_rows:
                            acc = tap(acc, weights[i, j], img[v, y, reflect(x + j - r, w), c])
                        else:
                            acc = tap(acc, weights[i, j], rows[i, reflect(y + j - r, h), x, c])
                    if along_rows:
                        rows[i, y, x, c] = acc
                    else:
                        finish(out, v, y, x, c, round_even_clip(acc), sol, scale, shift)
                x += cuda.blockDim.x
            y += cuda.blockDim.y

    return blur_pass_kernel


def _paste_kernel(d):
    tile_walk = d.tile_walk

    @_kernel
    def paste_kernel(tiles, tile_crop, tile_src, paste, fill, canvas, tile):
        """Block (b, ty, tx): tile (ty, tx) of canvas[b] (S x S x 3) from tiles
        [M, B, s, s, 3]: tile t of canvas b is rows [sy, sy + h) and columns
        [sx, sx + w) of tiles[tile_crop[b, t], tile_src[b, t]] at (dy, dx);
        the rest takes fill (paste[b, t] = sy, sx, h, w, dy, dx; tiles never
        overlap)."""
        b = cuda.blockIdx.x
        size = canvas.shape[1]
        yy, y1, x_first, x1 = tile_walk(tile, size, size)
        while yy < y1:
            xx = x_first
            while xx < x1:
                found = False
                for t in range(paste.shape[1]):
                    sy, sx, h, w, dy, dx = (paste[b, t, 0], paste[b, t, 1], paste[b, t, 2], paste[b, t, 3],
                                            paste[b, t, 4], paste[b, t, 5])
                    if dy <= yy < dy + h and dx <= xx < dx + w:
                        src = tiles[tile_crop[b, t], tile_src[b, t]]
                        for c in range(3):
                            canvas[b, yy, xx, c] = src[sy + yy - dy, sx + xx - dx, c]
                        found = True
                        break
                if not found:
                    for c in range(3):
                        canvas[b, yy, xx, c] = fill[c]
                xx += cuda.blockDim.x
            yy += cuda.blockDim.y

    return paste_kernel


def _launch(kernel, grid, threads: int, args, device: torch.device, shared: int = 0) -> None:
    """One launch on torch's current stream: tensors become device arrays
    over torch's memory (no copy, no host synchronisation), or numpy arrays
    in the simulator (CPU tensors); other arguments pass as they are."""
    if 0 in grid:
        return
    block = (min(threads, 32), max(1, threads // 32))
    if device.type == "cuda":
        stream = cuda.external_stream(torch.cuda.current_stream(device).cuda_stream)
        args = [cuda.as_cuda_array(a, sync=False) if isinstance(a, torch.Tensor) else a for a in args]
    elif _simulated():
        # the simulator copies each array in and back: inputs may be copies, outputs are contiguous already
        stream = 0
        args = [np.ascontiguousarray(a.numpy()) if isinstance(a, torch.Tensor) else a for a in args]
    else:
        raise RuntimeError("colour: CUDA kernels need CUDA tensors, or NUMBA_ENABLE_CUDASIM=1 for CPU tensors")
    kernel[grid, block, stream, shared](*args)


def _blur_tile(k_max: int, tile: int, budget: int):
    """(tile_h, tile_w, bytes) of blur_kernel's shared memory for kernels up
    to k_max: from 2 x 1 tiles, the largest that fits `budget`, tall before
    wide (the height sets the rows pass's repeated halo rows, (h + 2r) / h:
    a narrower tile goes first); None when not even one pixel's fits (then
    the two-pass fallback)."""
    r = k_max // 2
    th, tw = 2 * tile, tile
    while True:
        need = 4 * (k_max + (th + 2 * r) * tw * 3) + (th + 2 * r) * (tw + 2 * r) * 3
        if need <= budget:
            return th, tw, need
        if tw > 1:
            tw //= 2
        elif th > 1:
            th //= 2
        else:
            return None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def render_views(tiles: torch.Tensor, params: np.ndarray, out: torch.Tensor, threads: int = THREADS,
                 tile: int = TILE, shared: int = SHARED_BYTES) -> None:
    """Every view of a family at once: tiles uint8 [N, H, W, 3] (resized
    crops; overwritten), params float32 [N, PARAM_LEN] (`view_params` flattened)
    -> out [N, H, W, 3], normalised, float32 or float16. One pinned H2D copy
    of the parameters, blur weights and view lists (built here: the host has
    the parameters), then three launches on torch's current stream (four
    for a blur no shared-memory tile fits; see _cuda_kernels). `threads` per block, `tile` pixels a side per block,
    `shared` bytes of shared memory for a blur block: settable small for the
    simulator."""
    if out.dtype not in (torch.float32, torch.float16):
        raise ValueError(f"colour: the kernel writes float32 or float16, not {out.dtype}")
    n, h, w, c = tiles.shape
    if tiles.dtype != torch.uint8 or c != 3 or out.shape != tiles.shape or params.shape != (n, PARAM_LEN):
        raise ValueError(f"colour: tiles {tuple(tiles.shape)} {tiles.dtype}, params {params.shape}, "
                         f"out {tuple(out.shape)} do not fit together")
    if not 1 <= threads <= 1024 or threads > 32 and threads % 32:
        raise ValueError(f"colour: {threads} threads per block: 1 to 32, or a multiple of 32 up to 1024")
    if n == 0:
        return
    params = np.ascontiguousarray(params, np.float32)
    jittered = params[:, PARAM_JITTER] > 0.5
    contrast = np.flatnonzero(jittered & (params[:, PARAM_ORDER:PARAM_ORDER + 4] == 1).any(axis=1)).astype(np.int32)
    blurred = np.flatnonzero(params[:, PARAM_SIGMA] > 0).astype(np.int32)
    k_max = int(params[blurred, PARAM_KERNEL].max()) if len(blurred) else 1
    # one float32 upload: params [n, PARAM_LEN], weights [blurred, k_max], then the view lists as int32
    lists = [contrast, np.arange(n, dtype=np.int32), blurred]
    host = np.concatenate([params.reshape(-1), _weight_table(params[blurred], k_max).reshape(-1)]
                          + [views.view(np.float32) for views in lists])
    packed = torch.from_numpy(host)
    if tiles.is_cuda:
        packed = packed.pin_memory().to(tiles.device, non_blocking=True)
    at = np.cumsum([0, n * PARAM_LEN, len(blurred) * k_max] + [len(views) for views in lists])
    dev_params = packed[at[0]:at[1]].view(n, PARAM_LEN)
    dev_weights = packed[at[1]:at[2]].view(len(blurred), k_max)
    dev_contrast, dev_all, dev_blurred = (packed[at[i]:at[i + 1]].view(torch.int32) for i in (2, 3, 4))
    scale, shift = tuple(np.float32(x) for x in NORM_SCALE), tuple(np.float32(x) for x in NORM_SHIFT)
    kernels, device = _cuda_kernels(), tiles.device
    totals = torch.zeros(n if len(contrast) else 1, dtype=torch.int64, device=device)
    for views, totals_pass in ((dev_contrast, True), (dev_all, False)):
        _launch(kernels["pixel"], (len(views), _cdiv(h, tile), _cdiv(w, tile)), threads,
                [tiles, dev_params, views, totals, out, tile, totals_pass, scale, shift], device)
    if not len(blurred):
        return
    fits = _blur_tile(k_max, tile, shared)
    if fits:
        th, tw, need = fits
        _launch(kernels["blur"], (len(blurred), _cdiv(h, th), _cdiv(w, tw)), threads,
                [tiles, dev_params, dev_blurred, dev_weights, out, th, tw, k_max, scale, shift], device, need)
    else:  # a radius too large for any tile in shared memory: through a scratch of the blurred views
        rows = torch.empty((len(blurred), h, w, 3), dtype=torch.float32, device=device)
        for along_rows in (True, False):
            _launch(kernels["blur_pass"], (len(blurred), _cdiv(h, tile), _cdiv(w, tile)), threads,
                    [tiles, rows, dev_params, dev_blurred, dev_weights, out, tile, along_rows, scale, shift], device)


def mosaic_fill(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """MOSAIC_FILL_NORMALISED, [3] in `dtype` on
    `device`: made and copied once per (device, dtype), not every step (a
    pageable copy to a GPU waits for the host)."""
    key = (torch.device(device), dtype)
    if key not in _FILLS:
        _FILLS[key] = torch.from_numpy(MOSAIC_FILL_NORMALISED).to(device, dtype)
    return _FILLS[key]


def paste_mosaics(tiles: torch.Tensor, mosaic, fill: torch.Tensor, canvas: torch.Tensor,
                  threads: int = THREADS, tile: int = TILE) -> None:
    """MosRep canvases [B, S, S, 3] from rendered tiles [M, B, s, s, 3] by the
    plan's paste table (pipelines.torchvision.paste_mosaics' semantics);
    `fill` [3] in the canvas's dtype on its device (mosaic_fill)."""
    tables = np.concatenate([mosaic.tile_crop[..., None], mosaic.tile_src[..., None], mosaic.paste], axis=-1)
    tables = torch.from_numpy(np.ascontiguousarray(tables, np.int32))
    if canvas.is_cuda:
        tables = tables.pin_memory().to(canvas.device, non_blocking=True)
    size = canvas.shape[1]
    _launch(_cuda_kernels()["paste"], (canvas.shape[0], _cdiv(size, tile), _cdiv(size, tile)), threads,
            [tiles, tables[..., 0], tables[..., 1], tables[..., 2:], fill.to(canvas.device, canvas.dtype), canvas,
             tile], canvas.device)


def render_group(family, plan, tiles: torch.Tensor, dtype: torch.dtype, threads: int = THREADS,
                  tile: int = TILE) -> torch.Tensor:
    """Everything after the resize for one view family on the device (DALI's
    GPU graph, FFCV's colour on the device): resized tiles uint8 [count, B,
    s, s, 3] (overwritten) -> normalised [count, B, 3, s, s] (the mosaic:
    canvases [B, 3, S, S]) in `dtype`, channels_last. `family` is a
    pipelines.render.ViewFamily, `plan` its BatchPlan. CPU tensors run the
    kernels in Numba's CUDA simulator (tests)."""
    n, batch, s = tiles.shape[0], tiles.shape[1], tiles.shape[2]
    # the kernels write float32 or float16; bfloat16 takes one conversion pass after them
    kernel_dtype = dtype if dtype in (torch.float32, torch.float16) else torch.float32
    out = torch.empty((n, batch, s, s, 3), dtype=kernel_dtype, device=tiles.device)
    params = view_params(family.plan(plan), family.augs, s).reshape(n * batch, PARAM_LEN)
    render_views(tiles.view(n * batch, s, s, 3), params, out.view(n * batch, s, s, 3), threads, tile)
    if family.kind == "mosaic":
        canvas = torch.empty((batch, family.out_size, family.out_size, 3), dtype=kernel_dtype, device=tiles.device)
        paste_mosaics(out, plan.mosaic, mosaic_fill(tiles.device, kernel_dtype), canvas, threads, tile)
        out = canvas
    return out.to(dtype).movedim(-1, -3)


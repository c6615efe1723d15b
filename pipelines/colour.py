"""Everything that follows a view's resize, written once for two targets.

A view's photometric augmentation, as torchvision's ops on PIL images do it
(pipelines/torchvision.py `render_view`, the reference): colour jitter in
the plan's order, grayscale, Gaussian blur, solarize, then normalisation.
The maths lives in `_pixel_ops`, one set of per-pixel functions compiled
twice:

- for the CPU (`numba.njit`): `augment` / `render`, run per view by the DALI
  CPU graph's Numba operator (pipelines/dali.py);
- for CUDA (`numba.cuda.jit`): `render_views`, one kernel launch per view
  family and step over all its views, on torch's current stream, writing
  normalised pixels straight into the training tensor; `paste_mosaics`
  builds MosRep's canvases from those tiles. Numba's CUDA simulator
  (NUMBA_ENABLE_CUDASIM=1) runs the same kernels on the CPU, which is how
  CI tests them.

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

# The per-view parameter vector (float32).
P_JITTER, P_ORDER, P_B, P_C, P_S, P_H, P_GRAY, P_SIGMA, P_KERNEL, P_SOLARIZE = 0, 1, 5, 6, 7, 8, 9, 10, 11, 12
P_LEN = 13
# An order slot holding SKIP does nothing: ColorJitter leaves out an
# operation whose strength is 0 (adjust_hue(0) is not the identity in PIL).
SKIP = 4
# x * NORM_SCALE + NORM_SHIFT = (x / 255 - MEAN) / STD, in float32 as PlannedLoader.normalize computes it.
_MEAN255, _STD255 = np.asarray(MEAN, np.float32) * np.float32(255), np.asarray(STD, np.float32) * np.float32(255)
NORM_SCALE, NORM_SHIFT = np.float32(1) / _STD255, -_MEAN255 / _STD255
THREADS = 256  # CUDA threads per view (block); the contrast reduction's shared array has this size


def view_params(cp, augs, size: int) -> np.ndarray:
    """float32 [count, B, P_LEN] from a CropPlan; `augs` one AugSpec per view."""
    p = np.zeros(cp.window.shape[:2] + (P_LEN,), np.float32)
    p[..., P_JITTER] = cp.jitter
    strength = np.array([[a.brightness, a.contrast, a.saturation, a.hue] for a in augs], np.float32)  # [count, 4]
    strength = np.broadcast_to(strength[:, None, :], cp.order.shape)
    active = np.take_along_axis(strength, cp.order.astype(np.int64), axis=-1) > 0
    p[..., P_ORDER:P_ORDER + 4] = np.where(active, cp.order, SKIP)
    p[..., P_B:P_H] = cp.factors[..., :3]
    # torchvision's PIL hue shift: int32(h * 255) mod 256 steps of H
    p[..., P_H] = (cp.factors[..., 3].astype(np.float64) * 255).astype(np.int32) & 255
    p[..., P_GRAY] = cp.gray
    p[..., P_SIGMA] = cp.sigma
    p[..., P_KERNEL] = np.array([a.blur_kernel(size) for a in augs], np.float32)[:, None]
    p[..., P_SOLARIZE] = cp.solarize
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

    return pytypes.SimpleNamespace(luma=luma, blend=blend, contrast_centre=contrast_centre, hue=hue, tap=tap,
                                   round_even_clip=round_even_clip, solarize=solarize, normalise=normalise,
                                   reflect=reflect)


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
    the order p[P_ORDER:P_ORDER+4] (0 brightness, 1 contrast, 2 saturation,
    3 hue, SKIP) when p[P_JITTER], grayscale, blur, solarize.
    out, image: (H, W, 3) uint8; p: `view_params`."""
    out[:] = image
    if p[P_JITTER] > 0.5:
        for k in range(4):
            op = int(p[P_ORDER + k])
            if op == 0:
                _brightness(out, p[P_B])
            elif op == 1:
                _contrast(out, p[P_C])
            elif op == 2:
                _saturation(out, p[P_S])
            elif op == 3:
                _hue(out, np.int64(p[P_H]))
    if p[P_GRAY] > 0.5:
        _grayscale(out)
    if p[P_SIGMA] > 0:
        blur(out, int(p[P_KERNEL]), p[P_SIGMA])
    if p[P_SOLARIZE] > 0.5:
        _solarize(out)


@numba.njit(cache=True)
def render(out, image, p):
    """`augment` (skipped, with its copy, when p asks for nothing), then
    normalisation into out: (H, W, 3) float32; image: (H, W, 3) uint8."""
    if p[P_JITTER] > 0.5 or p[P_GRAY] > 0.5 or p[P_SIGMA] > 0 or p[P_SOLARIZE] > 0.5:
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
        if params[n, P_SIGMA] > 0:
            k = int(params[n, P_KERNEL])
            out[n, :k] = gaussian(k, params[n, P_SIGMA])
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
_KERNELS = {}
_FILLS = {}  # (device, dtype) -> MosRep's fill colour, normalised, on that device


def _simulated() -> bool:
    return bool(numba.config.ENABLE_CUDASIM)


def _cuda_kernels():
    """(render, paste) kernels for numba.cuda, built on first use; under
    NUMBA_ENABLE_CUDASIM=1 the simulator's, with plain float32 primitives."""
    if _KERNELS:
        return _KERNELS["render"], _KERNELS["paste"]
    device = cuda.jit(device=True)
    if _simulated():
        mul, add, dmul = device(lambda a, b: a * b), device(lambda a, b: a + b), device(lambda a, b: a * b)
        rint = device(lambda v: np.float32(np.rint(v)))
    else:
        from numba.cuda import libdevice
        mul, add, dmul, rint = libdevice.fmul_rn, libdevice.fadd_rn, libdevice.dmul_rn, libdevice.rintf
    ops = _pixel_ops(device, mul, add, dmul, rint)
    luma, blend, centre, hue, tap = ops.luma, ops.blend, ops.contrast_centre, ops.hue, ops.tap
    round_even_clip, solarize, normalise, reflect = ops.round_even_clip, ops.solarize, ops.normalise, ops.reflect
    threads = THREADS

    @cuda.jit
    def render_kernel(img, params, weights, rows, out, scale, shift):
        """Block n renders view n in place in img [N, H, W, 3] uint8 (rows:
        float32 [N, H, W*3] scratch for the blur) and writes it normalised
        into out [N, H, W, 3]. Thread t owns pixels t, t + T, ... in every
        per-pixel pass; passes that read other threads' pixels (contrast's
        mean, the blur) sit between barriers."""
        n = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        h, w = img.shape[1], img.shape[2]
        x, p = img[n], params[n]
        partial = cuda.shared.array(threads, numba.int64)
        centre_of = cuda.shared.array(1, numba.int64)
        if p[P_JITTER] > 0.5:
            for k in range(4):
                op = int(p[P_ORDER + k])
                if op == 1:
                    cuda.syncthreads()
                    total = np.int64(0)
                    for i in range(tid, h * w, nt):
                        yy, xx = i // w, i % w
                        total += luma(np.int64(x[yy, xx, 0]), np.int64(x[yy, xx, 1]), np.int64(x[yy, xx, 2]))
                    partial[tid] = total
                    cuda.syncthreads()
                    if tid == 0:
                        total = np.int64(0)
                        for j in range(nt):
                            total += partial[j]
                        centre_of[0] = centre(total, np.int64(h * w))
                    cuda.syncthreads()
                    mean = centre_of[0]
                    for i in range(tid, h * w, nt):
                        yy, xx = i // w, i % w
                        for c in range(3):
                            x[yy, xx, c] = blend(mean, np.int64(x[yy, xx, c]), p[P_C])
                elif op == 0 or op == 2:
                    for i in range(tid, h * w, nt):
                        yy, xx = i // w, i % w
                        if op == 0:
                            base = np.int64(0)
                        else:
                            base = luma(np.int64(x[yy, xx, 0]), np.int64(x[yy, xx, 1]), np.int64(x[yy, xx, 2]))
                        alpha = p[P_B] if op == 0 else p[P_S]
                        for c in range(3):
                            x[yy, xx, c] = blend(base, np.int64(x[yy, xx, c]), alpha)
                elif op == 3:
                    shift_h = np.int64(p[P_H])
                    for i in range(tid, h * w, nt):
                        yy, xx = i // w, i % w
                        x[yy, xx, 0], x[yy, xx, 1], x[yy, xx, 2] = hue(
                            np.int64(x[yy, xx, 0]), np.int64(x[yy, xx, 1]), np.int64(x[yy, xx, 2]), shift_h)
        if p[P_GRAY] > 0.5:
            for i in range(tid, h * w, nt):
                yy, xx = i // w, i % w
                lum = np.uint8(luma(np.int64(x[yy, xx, 0]), np.int64(x[yy, xx, 1]), np.int64(x[yy, xx, 2])))
                x[yy, xx, 0], x[yy, xx, 1], x[yy, xx, 2] = lum, lum, lum
        if p[P_SIGMA] > 0:
            k, wt, row = int(p[P_KERNEL]), weights[n], rows[n]
            r = k // 2
            cuda.syncthreads()
            for i in range(tid, h * w * 3, nt):  # along rows, into float32
                yy, rest = i // (w * 3), i % (w * 3)
                xx, c = rest // 3, rest % 3
                acc = np.float32(0)
                for j in range(k):
                    acc = tap(acc, wt[j], x[yy, reflect(xx + j - r, w), c])
                row[yy, rest] = acc
            cuda.syncthreads()
            for i in range(tid, h * w * 3, nt):  # along columns, rounded
                yy, rest = i // (w * 3), i % (w * 3)
                acc = np.float32(0)
                for j in range(k):
                    acc = tap(acc, wt[j], row[reflect(yy + j - r, h), rest])
                x[yy, rest // 3, rest % 3] = round_even_clip(acc)
            cuda.syncthreads()
        sol = p[P_SOLARIZE] > 0.5
        dest = out[n]
        for i in range(tid, h * w, nt):
            yy, xx = i // w, i % w
            for c in range(3):
                v = x[yy, xx, c]
                if sol:
                    v = solarize(v)
                dest[yy, xx, c] = normalise(v, scale[c], shift[c])

    @cuda.jit
    def paste_kernel(tiles, tile_crop, tile_src, paste, fill, canvas):
        """canvas[b] (S x S x 3) from tiles [M, B, s, s, 3]: tile t of canvas b
        is rows [sy, sy + h) and columns [sx, sx + w) of tiles[tile_crop[b, t],
        tile_src[b, t]] at (dy, dx); the rest takes fill (paste[b, t] =
        sy, sx, h, w, dy, dx; tiles never overlap)."""
        b = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        size = canvas.shape[1]
        for i in range(tid, size * size, nt):
            yy, xx = i // size, i % size
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

    _KERNELS.update(render=render_kernel, paste=paste_kernel)
    return render_kernel, paste_kernel


def _launch_args(tensors, device: torch.device, threads: int):
    """Kernel arguments and (grid) stream: device arrays over torch's memory
    on torch's current stream (no host synchronisation), or numpy arrays in
    the simulator (CPU tensors)."""
    if device.type == "cuda":
        stream = cuda.external_stream(torch.cuda.current_stream(device).cuda_stream)
        return [cuda.as_cuda_array(t, sync=False) for t in tensors], stream, threads
    if not _simulated():
        raise RuntimeError("colour: CUDA kernels need CUDA tensors, or NUMBA_ENABLE_CUDASIM=1 for CPU tensors")
    # the simulator copies each argument in and back: inputs may be copies, outputs are contiguous already
    return [np.ascontiguousarray(t.numpy()) for t in tensors], 0, threads


def render_views(tiles: torch.Tensor, params: np.ndarray, out: torch.Tensor, threads: int = THREADS) -> None:
    """Every view of a family at once: tiles uint8 [N, H, W, 3] (resized
    crops; overwritten), params float32 [N, P_LEN] (`view_params` flattened)
    -> out [N, H, W, 3], normalised, float32 or float16. One H2D copy of the
    parameters and weights (pinned), one launch on torch's current stream."""
    if out.dtype not in (torch.float32, torch.float16):
        raise ValueError(f"colour: the kernel writes float32 or float16, not {out.dtype}")
    n, h, w, c = tiles.shape
    if tiles.dtype != torch.uint8 or c != 3 or out.shape != tiles.shape or params.shape != (n, P_LEN):
        raise ValueError(f"colour: tiles {tuple(tiles.shape)} {tiles.dtype}, params {params.shape}, "
                         f"out {tuple(out.shape)} do not fit together")
    if threads > THREADS:
        raise ValueError(f"colour: at most {THREADS} threads per view")
    width = int(max(3, params[:, P_KERNEL].max())) if n else 3
    host = np.concatenate([params.astype(np.float32), _weight_table(params.astype(np.float32), width)], axis=1)
    packed = torch.from_numpy(host)
    if tiles.is_cuda:
        packed = packed.pin_memory().to(tiles.device, non_blocking=True)
    blurred = bool((params[:, P_SIGMA] > 0).any())
    rows = torch.empty((n, h, w * 3) if blurred else (1, 1, 1), dtype=torch.float32, device=tiles.device)
    norm = torch.from_numpy(np.stack([NORM_SCALE, NORM_SHIFT]))
    norm = norm.to(tiles.device, non_blocking=True) if tiles.is_cuda else norm
    render_kernel, _ = _cuda_kernels()
    args, stream, threads = _launch_args([tiles, packed[:, :P_LEN], packed[:, P_LEN:], rows, out, norm[0], norm[1]],
                                         tiles.device, threads)
    if n:
        render_kernel[n, threads, stream](*args)


def mosaic_fill(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """MOSAIC_FILL normalised as the kernels normalise, [3] in `dtype` on
    `device`: made and copied once per (device, dtype), not every step (a
    pageable copy to a GPU waits for the host)."""
    key = (torch.device(device), dtype)
    if key not in _FILLS:
        fill = np.asarray(MOSAIC_FILL, np.float32) * NORM_SCALE + NORM_SHIFT
        _FILLS[key] = torch.from_numpy(fill).to(device, dtype)
    return _FILLS[key]


def paste_mosaics(tiles: torch.Tensor, mosaic, fill: torch.Tensor, canvas: torch.Tensor,
                  threads: int = THREADS) -> None:
    """MosRep canvases [B, S, S, 3] from rendered tiles [M, B, s, s, 3] by the
    plan's paste table (pipelines.torchvision.paste_mosaics' semantics);
    `fill` [3] in the canvas's dtype on its device (mosaic_fill)."""
    tables = np.concatenate([mosaic.tile_crop[..., None], mosaic.tile_src[..., None], mosaic.paste], axis=-1)
    tables = torch.from_numpy(np.ascontiguousarray(tables, np.int32))
    if canvas.is_cuda:
        tables = tables.pin_memory().to(canvas.device, non_blocking=True)
    _, paste_kernel = _cuda_kernels()
    args, stream, threads = _launch_args([tiles, tables[..., 0], tables[..., 1], tables[..., 2:],
                                          fill.to(canvas.device, canvas.dtype), canvas], canvas.device, threads)
    paste_kernel[canvas.shape[0], threads, stream](*args)


def render_group(family, plan, tiles: torch.Tensor, dtype: torch.dtype, threads: int = THREADS) -> torch.Tensor:
    """Everything after the resize for one view family on the device (DALI's
    GPU graph, FFCV's colour on the device): resized tiles uint8 [count, B,
    s, s, 3] (overwritten) -> normalised [count, B, 3, s, s] (the mosaic:
    canvases [B, 3, S, S]) in `dtype`, channels_last. `family` is a
    pipelines.base.ViewFamily, `plan` its BatchPlan. CPU tensors run the
    kernels in Numba's CUDA simulator (tests)."""
    n, batch, s = tiles.shape[0], tiles.shape[1], tiles.shape[2]
    # the kernels write float32 or float16; bfloat16 takes one conversion pass after them
    kernel_dtype = dtype if dtype in (torch.float32, torch.float16) else torch.float32
    out = torch.empty((n, batch, s, s, 3), dtype=kernel_dtype, device=tiles.device)
    params = view_params(family.plan(plan), family.augs, s).reshape(n * batch, P_LEN)
    render_views(tiles.view(n * batch, s, s, 3), params, out.view(n * batch, s, s, 3), threads)
    if family.kind == "mosaic":
        canvas = torch.empty((batch, family.out_size, family.out_size, 3), dtype=kernel_dtype, device=tiles.device)
        paste_mosaics(out, plan.mosaic, mosaic_fill(tiles.device, kernel_dtype), canvas, threads)
        out = canvas
    return out.to(dtype).movedim(-1, -3)

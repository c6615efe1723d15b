"""pipelines/colour.py: one colour pipeline on two targets, against the
torchvision reference (pipelines/torchvision.py, PIL).

The CUDA kernels run on a GPU when there is one, else in Numba's CUDA
simulator (tests/conftest.py turns it on), so CI checks them on the CPU.
The simulator is slow (a Python thread per CUDA thread), hence views of
5-12 px, a few samples, and small blocks and tiles (4-8 threads, tiles of
3-4 px), which also put tile edges inside the views and blur halos wider
than a tile. Tolerances: none. The CPU operator, the CUDA
kernel and the reference agree bit for bit everywhere (same maths, same
summation order, no fused multiply-adds), blur included: the reference
blurs with the same separable pass, which is torchvision's gaussian_blur
within one level on rare values (its 2-D kernel sums in another order;
test_separable_blur_is_torchvisions).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import colour
from pipelines.data import open_source
from pipelines.plan import CropPlan, Planner
from pipelines.render import decode
from pipelines.torchvision import paste_mosaics, render_family, render_plan, render_view
from pipelines.views import MOCOV2_AUG, AugSpec, CropSpec, MosaicSpec, OriginalSpec, ViewSpec

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
kernels = pytest.mark.skipif(DEVICE == "cpu" and not numba.config.ENABLE_CUDASIM,
                             reason="needs a GPU or NUMBA_ENABLE_CUDASIM=1")
THREADS = 256 if DEVICE == "cuda" else 8
# every operation often, so that a few samples exercise them all
BUSY = AugSpec(flip_p=0.5, jitter_p=0.9, grayscale_p=0.25, blur_p=0.4, solarize_p=0.3)


def photo(rng, h, w) -> np.ndarray:
    """Smooth colour waves plus noise: every hue, edges for the blur."""
    y, x = np.mgrid[0:h, 0:w] / 6.0
    waves = [128 + 110 * np.sin(rng.uniform(1, 3) * x + rng.uniform(0, 6) * y + rng.uniform(0, 6)) for _ in range(3)]
    return np.clip(np.stack(waves, -1) + rng.normal(0, 15, (h, w, 3)), 0, 255).astype(np.uint8)


def random_plan(rng, count, batch, size, augs) -> CropPlan:
    """Whole-image windows with random colour parameters in every order."""
    order = np.stack([np.stack([rng.permutation(4) for _ in range(batch)]) for _ in range(count)]).astype(np.int8)
    factors = np.stack([rng.uniform(0, 2, (count, batch)), rng.uniform(0, 2, (count, batch)),
                        rng.uniform(0, 2, (count, batch)), rng.uniform(-0.5, 0.5, (count, batch))], -1)
    blurred = rng.random((count, batch)) < 0.3
    return CropPlan(window=np.tile(np.array([0, 0, size, size], np.int32), (count, batch, 1)),
                    flip=np.zeros((count, batch), bool), jitter=rng.random((count, batch)) < 0.9,
                    factors=factors.astype(np.float32), order=order, gray=rng.random((count, batch)) < 0.3,
                    sigma=np.where(blurred, rng.uniform(0.1, 2.0, (count, batch)), 0).astype(np.float32),
                    solarize=rng.random((count, batch)) < 0.3, size=size, augs=augs)


def levels(x: torch.Tensor) -> np.ndarray:
    """Normalised HWC values back to their uint8 levels (exact: the inverse of one float32 multiply-add)."""
    return np.rint((x.float().cpu().numpy() - colour.NORM_SHIFT) / colour.NORM_SCALE).astype(np.int16)


def assert_like_pil(got: np.ndarray, want: np.ndarray, where=""):
    assert np.array_equal(got.astype(np.int16), want.astype(np.int16)), where


# ---------------------------------------------------------------- parameters
def test_an_operation_of_zero_strength_is_left_out():
    """ColorJitter leaves out an operation whose strength is 0; PIL's
    adjust_hue(0) is not the identity, so calling it would change pixels."""
    rng = np.random.default_rng(1)
    size = 24
    image = photo(rng, size, size)
    no_hue = dataclasses.replace(MOCOV2_AUG, hue=0.0, grayscale_p=0.0, blur_p=0.0)
    cp = random_plan(rng, 1, 6, size, (no_hue,))
    cp = dataclasses.replace(cp, jitter=np.ones_like(cp.jitter), gray=np.zeros_like(cp.gray),
                             sigma=np.zeros_like(cp.sigma), solarize=np.zeros_like(cp.solarize),
                             factors=cp.factors * np.array([1, 1, 1, 0], np.float32))
    params = colour.view_params(cp, cp.augs, size)
    assert (params[..., colour.PARAM_ORDER:colour.PARAM_ORDER + 4] == colour.SKIP).sum(-1).tolist() == [[1] * 6]
    for b in range(6):
        want = render_view(Image.fromarray(image), cp, 0, b)
        got = np.empty_like(image)
        colour.augment(got, image, params[0, b])
        assert np.array_equal(got, want)
    round_trip = np.asarray(torchvision_adjust_hue_zero(image))
    assert not np.array_equal(round_trip, image)  # what the reference used to do


def torchvision_adjust_hue_zero(image):
    import torchvision.transforms.functional as F
    return F.adjust_hue(Image.fromarray(image), 0.0)


def test_separable_blur_is_torchvisions():
    """colour.blur (two 1-D passes) against F.gaussian_blur (the k x k kernel,
    their outer product): within one level, on under 1% of the values."""
    import torchvision.transforms.functional as F

    rng = np.random.default_rng(3)
    for k, sigma, (h, w) in [(23, 2.0, (60, 50)), (3, 0.1, (9, 12)), (9, 1.3, (24, 24)), (5, 0.7, (7, 31))]:
        image = photo(rng, h, w)
        want = np.asarray(F.gaussian_blur(Image.fromarray(image), [k, k], [sigma, sigma]))
        got = image.copy()
        colour.blur(got, k, np.float32(sigma))
        diff = np.abs(got.astype(np.int16) - want)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (k, sigma)


def test_cpu_operator_is_torchvision_bit_for_bit():
    """The CPU operator against render_view on the same pixels (a whole-image
    window at the image's own size: PIL's resize is then a copy): jitter in
    every order, grayscale, blur and solarize, exactly."""
    rng = np.random.default_rng(0)
    count, batch, size = 3, 16, 40
    images = [photo(rng, size, size) for _ in range(batch)]
    cp = random_plan(rng, count, batch, size,
                     (MOCOV2_AUG, dataclasses.replace(MOCOV2_AUG, blur_kernel_frac=0.2), MOCOV2_AUG))
    params = colour.view_params(cp, cp.augs, size)
    for v in range(count):
        for b in range(batch):
            want = render_view(Image.fromarray(images[b]), cp, v, b)
            got = np.empty_like(images[b])
            colour.augment(got, images[b], params[v, b])
            assert_like_pil(got, want, (v, b))


# ---------------------------------------------------------------- the CUDA kernels
@kernels
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_kernel_is_the_cpu_operator_bit_for_bit(out_dtype):
    """render_views against colour.render, view by view, on random
    parameters (blur included: the same sums in the same order)."""
    rng = np.random.default_rng(2)
    count, batch, size = 2, 4, 10
    cp = random_plan(rng, count, batch, size, (MOCOV2_AUG, dataclasses.replace(MOCOV2_AUG, blur_kernel_frac=0.5)))
    cp = dataclasses.replace(cp, sigma=np.where(rng.random((count, batch)) < 0.5, cp.sigma, 1.3).astype(np.float32))
    params = colour.view_params(cp, cp.augs, size).reshape(count * batch, colour.PARAM_LEN)
    images = np.stack([photo(rng, size, size) for _ in range(count * batch)])
    tiles = torch.from_numpy(images.copy()).to(DEVICE)
    out = torch.empty(tiles.shape, dtype=out_dtype, device=DEVICE)
    colour.render_views(tiles, params, out, threads=THREADS)
    want = np.empty(images.shape, np.float32)
    for n in range(len(images)):
        colour.render(want[n], images[n], params[n])
    assert torch.equal(out.cpu(), torch.from_numpy(want).to(out_dtype))


def mixed_params(rng, n, kernels) -> np.ndarray:
    """n views' parameters: jitter in a random order with contrast in every
    slot in turn (view i: slot i % 4), view 4j+3 without jitter; grayscale
    and solarize at random; blur with kernels[i] (0: unblurred)."""
    p = np.zeros((n, colour.PARAM_LEN), np.float32)
    for i in range(n):
        others = rng.permutation([0, 2, 3]).tolist()
        p[i, colour.PARAM_ORDER:colour.PARAM_ORDER + 4] = others[:i % 4] + [1] + others[i % 4:]
    p[:, colour.PARAM_JITTER] = np.arange(n) % 8 != 7
    p[:, colour.PARAM_BRIGHTNESS:colour.PARAM_HUE] = rng.uniform(0.2, 1.8, (n, 3))
    p[:, colour.PARAM_HUE] = rng.integers(0, 256, n)
    p[:, colour.PARAM_GRAY] = rng.random(n) < 0.3
    p[:, colour.PARAM_SOLARIZE] = rng.random(n) < 0.5
    p[:, colour.PARAM_KERNEL] = np.maximum(kernels, 3)
    p[:, colour.PARAM_SIGMA] = np.where(np.asarray(kernels) > 0, rng.uniform(0.3, 2.5, n), 0)
    return p


def kernels_against_cpu(params, h, w, out_dtype=torch.float32, **launch):
    """render_views on photos against colour.render, view by view."""
    rng = np.random.default_rng(len(params) * 100 + h * 10 + w)
    images = np.stack([photo(rng, h, w) for _ in range(len(params))])
    out = torch.empty(images.shape, dtype=out_dtype, device=DEVICE)
    colour.render_views(torch.from_numpy(images.copy()).to(DEVICE), params, out, **launch)
    want = np.empty(images.shape, np.float32)
    for n in range(len(images)):
        colour.render(want[n], images[n], params[n])
    for n in range(len(images)):
        assert torch.equal(out[n].cpu(), torch.from_numpy(want[n]).to(out_dtype)), (n, params[n])


@kernels
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("h, w, tile, threads", [(10, 7, 4, 8), (9, 11, 3, 4), (5, 6, 32, 8)])
def test_tiles_cut_any_view_size_with_any_blur_radius(h, w, tile, threads, out_dtype):
    """Views whose sides are no multiple of the tile (tiles of 3 and 4 px,
    one tile larger than the view), blur radii up to 4 (beyond a 3 px tile:
    the halo spans neighbouring tiles), blurred and unblurred views in one
    launch, contrast in each slot of the jitter order: all as the CPU
    operator, bit for bit."""
    rng = np.random.default_rng(h * w)
    kernels = [9, 0, 5, 7, 3, 0, 9, 0]
    kernels_against_cpu(mixed_params(rng, 8, kernels), h, w, out_dtype, threads=threads, tile=tile)


@kernels
def test_a_blur_too_wide_for_shared_memory_takes_narrower_tiles_then_the_fallback():
    """The tiled blur's shared memory is bounded: wider radii take narrower
    tiles, and a radius no tile fits goes through the two-pass fallback
    (a float32 scratch of the blurred views): the same pixels either way."""
    k, tile = 9, 4

    def need(th, tw):  # bytes: weights and the rows pass in float32, the source tile with its halo in uint8
        return 4 * (k + (th + 8) * tw * 3) + (th + 8) * (tw + 8) * 3
    assert colour._blur_tile(k, tile, 10 ** 6) == (8, 4, need(8, 4))
    narrow = colour._blur_tile(k, tile, need(8, 2))
    assert narrow == (8, 2, need(8, 2))
    assert colour._blur_tile(k, tile, 100) is None
    # at the real sizes: 23 at 224 px (blur_kernel_frac 0.1) fits 64 x 32 tiles; 45 (0.2) 64 x 16; 129 no tile
    assert colour._blur_tile(23, 32, colour.SHARED_BYTES)[:2] == (64, 32)
    assert colour._blur_tile(45, 32, colour.SHARED_BYTES)[:2] == (64, 16)
    assert colour._blur_tile(129, 32, colour.SHARED_BYTES) is None
    params = mixed_params(np.random.default_rng(4), 4, [9, 0, 7, 9])
    for shared in (narrow[2], 100):
        kernels_against_cpu(params, 10, 10, threads=8, tile=tile, shared=shared)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_kernels_at_full_size_on_the_gpu(out_dtype):
    """The default launch (256 threads, 32 px tiles) at the recipes' sizes:
    224 px with k = 23 and 45 (blur_kernel_frac 0.1 and 0.2), 96 px, and a
    kernel of 129 that takes the fallback."""
    rng = np.random.default_rng(7)
    kernels_against_cpu(mixed_params(rng, 8, [23, 0, 45, 23, 0, 45, 23, 0]), 224, 224, out_dtype)
    kernels_against_cpu(mixed_params(rng, 8, [9, 0, 9, 9, 0, 0, 9, 9]), 96, 96, out_dtype)
    kernels_against_cpu(mixed_params(rng, 4, [129, 0, 129, 23]), 160, 160, out_dtype)


def test_kernels_use_numba_cudas_disk_cache_with_a_key_every_process_shares():
    """Outside the simulator each kernel is built with numba-cuda's on-disk
    cache, and its cache key (the kernel's code and the device functions it
    closes over, with the signature and the GPU's compute capability) comes
    out the same in every process: a second process or rank loads the
    kernel instead of compiling it. Building needs no GPU; the compiler's
    part (the capability, the CUDA runtime) is left out here."""
    if importlib.util.find_spec("numba_cuda") is None:
        pytest.skip("needs numba-cuda[cu13] (the dali extra)")
    code = ("import types; from pipelines import colour; ks = colour._cuda_kernels(); "
            "fake = types.SimpleNamespace(magic_tuple=lambda: ('runtime', (9, 0))); "
            "print([(name, type(k._cache).__name__, k._cache._index_key('sig', fake)) for name, k in ks.items()])")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    root = Path(__file__).resolve().parents[2]
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                           cwd=root) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-3000:]
    assert runs[0].stdout == runs[1].stdout
    assert runs[0].stdout.count("'CUDACache'") == len(colour._cuda_kernels())


def family_data(tmp_path, spec, batch=4, seed=0):
    """A plan of `spec` over lossless photos, and the decoded images."""
    rng = np.random.default_rng(seed)
    for i, (w, h) in enumerate([(30, 22), (22, 30), (26, 26), (40, 18), (18, 18), (33, 25)]):
        Image.fromarray(photo(rng, h, w)).save(tmp_path / f"{i}.png")
    source = open_source(str(tmp_path), cache_dir=str(tmp_path / "cache"), progress=False)
    plan = Planner(spec, source.widths, source.heights, batch, seed=seed).plan(0, 0)
    images = [decode(source.read(int(i))) for i in plan.index]
    return source, plan, images


def colourless(cp: CropPlan) -> CropPlan:
    """The same windows and flips, no colour operation: what the GPU graph's resize hands the kernel."""
    off = np.zeros_like(cp.jitter)
    return dataclasses.replace(cp, jitter=off, gray=off, solarize=off, sigma=np.zeros_like(cp.sigma))


@kernels
@pytest.mark.parametrize("family", ["crops", "original", "mosaic"])
def test_every_view_family_through_the_kernels(family, tmp_path):
    """What follows the GPU graph (colour.render_group), fed the
    reference's resized tiles, renders the reference's views: crops, the
    original, and mosaic canvases pasted from coloured tiles."""
    from pipelines.render import view_families as _groups

    spec = {"crops": ViewSpec(crops=(CropSpec("global", 2, 10, augs=(BUSY,)),)),
            "original": ViewSpec(crops=(CropSpec("global", 1, 8, augs=(BUSY,)),), original=OriginalSpec(9, BUSY)),
            "mosaic": ViewSpec(crops=(CropSpec("global", 1, 8, augs=(BUSY,)),),
                               mosaic=MosaicSpec(crop_size=6, jitter=2, aug=BUSY))}[family]
    source, plan, images = family_data(tmp_path, spec)
    reference = render_plan(plan, source)
    group = _groups(spec)[-1]
    cp = group.plan(plan)
    tiles = torch.from_numpy(render_family(images, colourless(cp))).to(DEVICE)
    got = colour.render_group(group, plan, tiles, torch.float32)
    assert got.is_contiguous(memory_format=torch.channels_last) if got.dim() == 4 else \
        got.movedim(-3, -1).is_contiguous()
    got = levels(got.movedim(-3, -1))
    if family == "mosaic":
        want = reference["mosaic"].numpy()
        # the CPU operator on the same tiles, pasted as the reference pastes: bit for bit
        params = colour.view_params(cp, group.augs, group.size)
        raw = render_family(images, colourless(cp))
        coloured = np.empty_like(raw)
        for v in range(cp.count):
            for b in range(raw.shape[1]):
                colour.augment(coloured[v, b], raw[v, b], params[v, b])
        assert np.array_equal(got, paste_mosaics(coloured, plan.mosaic))
        for c in range(len(want)):
            assert_like_pil(got[c], want[c], c)
        return
    want = reference["original"].numpy()[None] if family == "original" else reference["crops"]["global"].numpy()
    for v in range(cp.count):
        for b in range(len(images)):
            assert_like_pil(got[v, b], want[v, b], (v, b))


@kernels
def test_bfloat16_views_are_the_float32_views_rounded(tmp_path):
    from pipelines.render import view_families as _groups

    spec = ViewSpec(crops=(CropSpec("global", 1, 8, augs=(BUSY,)),))
    _, plan, images = family_data(tmp_path, spec, batch=2)
    group = _groups(spec)[0]
    tiles = render_family(images, colourless(group.plan(plan)))
    full = colour.render_group(group, plan, torch.from_numpy(tiles.copy()).to(DEVICE), torch.float32)
    half = colour.render_group(group, plan, torch.from_numpy(tiles.copy()).to(DEVICE), torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half.cpu(), full.cpu().to(torch.bfloat16))


@kernels
def test_mismatched_buffers_are_refused():
    tiles = torch.zeros((2, 4, 4, 3), dtype=torch.uint8)
    params = np.zeros((2, colour.PARAM_LEN), np.float32)
    with pytest.raises(ValueError, match="do not fit"):
        colour.render_views(tiles, params, torch.empty((2, 4, 5, 3)))
    with pytest.raises(ValueError, match="float32 or float16"):
        colour.render_views(tiles, params, torch.empty((2, 4, 4, 3), dtype=torch.bfloat16))


@kernels
def test_the_mosaic_fill_is_made_once_per_device_and_dtype(tmp_path, monkeypatch):
    """Every step pastes with the same fill tensor on the device: no host
    tensor and no pageable copy per step."""
    from pipelines.render import view_families

    spec = ViewSpec(crops=(CropSpec("global", 1, 8, augs=(BUSY,)),), mosaic=MosaicSpec(crop_size=6, jitter=2, aug=BUSY))
    _, plan, images = family_data(tmp_path, spec)
    group = view_families(spec)[-1]
    fills = []
    real = colour.paste_mosaics
    monkeypatch.setattr(colour, "paste_mosaics", lambda tiles, mosaic, fill, *a: (fills.append(fill),
                                                                                  real(tiles, mosaic, fill, *a)))
    for _ in range(2):
        tiles = torch.from_numpy(render_family(images, colourless(group.plan(plan)))).to(DEVICE)
        colour.render_group(group, plan, tiles, torch.float32, threads=THREADS)
    assert len(fills) == 2 and fills[0] is fills[1] and fills[0].device.type == DEVICE
    assert colour.mosaic_fill(DEVICE, torch.float32) is fills[0]
    assert colour.mosaic_fill(DEVICE, torch.float16).dtype == torch.float16

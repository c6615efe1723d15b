"""DALI-specific tests of pipelines/dali.py: the Views every view family
gets, determinism, mid-epoch resume and restarts, and (marked `gpu`,
skipped without CUDA) the nvJPEG graph against the CPU graph.

Images are the 24 px JPEGs of tests/conftest.py; views are small (8-24 px)
and batches 8, so each loader builds in about a second.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from pipelines import build
from pipelines.data import open_source
from pipelines.views import (BYOL_AUG_1, BYOL_AUG_2, MOCOV2_AUG, CropSpec, MosaicSpec, OriginalSpec, PairSpec,
                             ViewSpec)

from tests.conftest import make_image_folder

B = 8
SPECS = {
    "two_views": ViewSpec(crops=(CropSpec("global", 2, 16),)),
    "byol": ViewSpec(crops=(CropSpec("global", 2, 16, augs=(BYOL_AUG_1, BYOL_AUG_2)),)),
    "multicrop": ViewSpec(crops=(CropSpec("global", 2, 24, scale=(0.14, 1.0)),
                                 CropSpec("local", 4, 12, scale=(0.05, 0.14)))),
    "original": ViewSpec(crops=(CropSpec("global", 2, 16),), original=OriginalSpec(20)),
    "mosaic": ViewSpec(crops=(CropSpec("global", 2, 16),), mosaic=MosaicSpec(crop_size=8, jitter=3)),
    "pairs": ViewSpec(crops=(CropSpec("global", 2, 16, scale=(0.5, 1.0)),), pairs=PairSpec(min_size=2)),
}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp("dali") / "train", per_class=16)
    return open_source(str(root), cache_dir=str(tmp_path_factory.mktemp("cache")), progress=False)


def loader(spec, source, **kw):
    kw.setdefault("batch_size", B)
    kw.setdefault("cpu", True)
    return build("dali", spec, source, **kw)


def epoch(ld, limit=None):
    out = []
    for i, views in enumerate(ld):
        out.append(views)
        if limit is not None and i + 1 == limit:
            break
    return out


def pixels(views):
    """Every pixel tensor of a Views, in a fixed order."""
    out = [views.crops[k] for k in sorted(views.crops)]
    return out + [t for t in (views.original, views.mosaic) if t is not None]


def assert_same(a, b):
    assert torch.equal(a.index, b.index)
    for x, y in zip(pixels(a), pixels(b), strict=True):
        assert torch.equal(x, y)


def check_image_batch(t, size, dtype, device="cpu"):
    assert t.shape == (B, 3, size, size)
    assert t.dtype == dtype and t.device.type == device
    assert t.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(t.float()).all()


# ---------------------------------------------------------------- the Views contract
@pytest.mark.parametrize("name", SPECS)
def test_views_of_every_family(name, source):
    spec = SPECS[name]
    ld = loader(spec, source, dtype=torch.bfloat16 if name == "multicrop" else torch.float32)
    views = next(iter(ld))
    dtype = ld.dtype
    assert views.index.shape == (B,) and views.labels.shape == (B,)
    for c in spec.crops:
        t = views.crops[c.name]
        assert t.shape == (c.count, B, 3, c.size, c.size)
        for i in range(c.count):  # each view a channels_last batch ...
            check_image_batch(t[i], c.size, dtype)
        # ... of one [count, B, H, W, C] block
        assert t.movedim(2, -1).is_contiguous()
        assert views.boxes[c.name].shape == (c.count, B, 5)
    if spec.original is not None:
        check_image_batch(views.original, spec.original.size, dtype)
    if spec.mosaic is not None:
        m = spec.mosaic
        check_image_batch(views.mosaic, m.canvas_size, dtype)
        assert views.mosaic_rois.shape == (B * m.crops_per_image, 5)
        assert views.mosaic_src.shape == views.mosaic_weight.shape == (B * m.crops_per_image,)
    if spec.pairs is not None:
        assert views.pair_boxes.shape[0] == 2 and views.pair_boxes.shape[2] == 5
    # normalised with ImageNet statistics: roughly zero-centred, unit scale
    assert -3 < float(views.crops["global"].float().mean()) < 3
    ld.close()


def test_unknown_colour_option(source):
    from pipelines import PipelineError
    with pytest.raises(PipelineError):
        loader(SPECS["two_views"], source, colour="fast")


# ---------------------------------------------------------------- determinism and position
def test_same_plan_same_pixels(source):
    spec = SPECS["mosaic"]
    a, b = epoch(loader(spec, source, seed=3)), epoch(loader(spec, source, seed=3))
    assert len(a) == len(b) == len(source) // B
    for x, y in zip(a, b):
        assert_same(x, y)
    c = next(iter(loader(spec, source, seed=4)))
    assert not torch.equal(c.crops["global"], a[0].crops["global"])


def test_resume_mid_epoch_and_restart_after_break(source):
    spec = dataclasses.replace(SPECS["original"], crops=(CropSpec("global", 2, 16, augs=(MOCOV2_AUG,)),))
    full = loader(spec, source, seed=1)
    first, second = epoch(full), epoch(full)  # epochs 0 and 1, uninterrupted
    assert len(first) == 6

    resumed = loader(spec, source, seed=1)
    resumed.load_state_dict({"epoch": 0, "step": 4, "seed": 1, "batch_size": B, "world_size": 1})
    rest = epoch(resumed)
    assert len(rest) == 2
    for x, y in zip(rest, first[4:]):
        assert_same(x, y)
    assert_same(next(iter(resumed)), second[0])  # then on into the next epoch

    # `break` leaves prefetched batches in the graph; the next iteration drops them
    ld = loader(spec, source, seed=1)
    got = epoch(ld, limit=2)
    assert ld.state_dict()["step"] == 2
    got += epoch(ld)
    assert len(got) == 6
    for x, y in zip(got, first):
        assert_same(x, y)
    got = epoch(ld, limit=1) + epoch(ld, limit=1)  # break twice in epoch 1
    assert_same(got[0], second[0]) and assert_same(got[1], second[1])
    ld.close()
    ld.close()  # idempotent
    assert_same(next(iter(ld)), second[2])  # a closed loader builds a new graph when iterated


def test_a_newer_iteration_takes_over(source):
    ld = loader(SPECS["two_views"], source)
    old = iter(ld)
    next(old)
    new = iter(ld)
    next(new)
    with pytest.raises(RuntimeError, match="superseded"):
        next(old)


def test_dali_colour_operators_on_the_cpu(source):
    """colour='dali' runs the GPU graph's colour operators on the CPU graph."""
    spec = ViewSpec(crops=(CropSpec("global", 2, 16, augs=(BYOL_AUG_2,)),), original=OriginalSpec(12))
    views = next(iter(loader(spec, source, colour="dali")))
    check_image_batch(views.crops["global"][1], 16, torch.float32)
    check_image_batch(views.original, 12, torch.float32)


# ---------------------------------------------------------------- the GPU graph
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", ["multicrop", "mosaic"])
def test_gpu_graph_views(name, source):
    spec = SPECS[name]
    g = epoch(loader(spec, source, cpu=False, device="cuda"), limit=2)
    for c in spec.crops:
        t = g[0].crops[c.name]
        assert t.device.type == "cuda" and t.shape == (c.count, B, 3, c.size, c.size)
        assert t[0].is_contiguous(memory_format=torch.channels_last)
    if spec.mosaic is not None:
        assert g[0].mosaic.device.type == "cuda" and g[0].mosaic_rois.device.type == "cuda"


@pytest.mark.gpu
@gpu
def test_gpu_graph_matches_cpu_graph(source):
    """nvJPEG and the GPU operators against the CPU graph: no colour jitter
    (hue differs by design), so decode, resize, flip, grayscale, blur and
    solarize must agree to a few levels (nvJPEG's IDCT and chroma
    upsampling differ from libjpeg-turbo's by a level or two)."""
    aug = dataclasses.replace(MOCOV2_AUG, jitter_p=0.0, solarize_p=0.3)
    spec = ViewSpec(crops=(CropSpec("global", 2, 16, augs=(aug,)),), mosaic=MosaicSpec(crop_size=8, jitter=3, aug=aug))
    g = next(iter(loader(spec, source, cpu=False, device="cuda")))
    c = next(iter(loader(spec, source, cpu=True)))
    std = 255 * 0.229
    for x, y in zip(pixels(g), pixels(c)):
        d = (x.cpu().float() - y.float()).abs() * std  # in levels
        assert float(d.mean()) < 2.0
        assert float(torch.quantile(d.flatten(), 0.99)) < 12


# ---------------------------------------------------------------- the CPU operator
def test_cpu_operator_is_torchvision_bit_for_bit():
    """The Numba operator against pipelines.torchvision.render_view on the
    same pixels (a full-image window at the image's own size: PIL's resize
    is then a copy): jitter in every order, grayscale and solarize exactly;
    blur within one level on a few pixels (float summation order)."""
    from PIL import Image

    from pipelines import dali as D
    from pipelines.plan import CropPlan
    from pipelines.torchvision import render_view

    rng = np.random.default_rng(0)
    count, batch, size = 3, 16, 40
    y, x = np.mgrid[0:size, 0:size] / 15.0
    images = [np.clip(np.stack([128 + 110 * np.sin(rng.uniform(1, 3) * x + rng.uniform(0, 6) * y + rng.uniform(0, 6))
                                for _ in range(3)], -1) + rng.normal(0, 15, (size, size, 3)), 0, 255).astype(np.uint8)
              for _ in range(batch)]
    order = np.stack([np.stack([rng.permutation(4) for _ in range(batch)]) for _ in range(count)]).astype(np.int8)
    factors = np.stack([rng.uniform(0, 2, (count, batch)), rng.uniform(0, 2, (count, batch)),
                        rng.uniform(0, 2, (count, batch)), rng.uniform(-0.5, 0.5, (count, batch))], -1)
    blurred = rng.random((count, batch)) < 0.3
    cp = CropPlan(window=np.tile(np.array([0, 0, size, size], np.int32), (count, batch, 1)),
                  flip=np.zeros((count, batch), bool), jitter=rng.random((count, batch)) < 0.9,
                  factors=factors.astype(np.float32), order=order, gray=rng.random((count, batch)) < 0.3,
                  sigma=np.where(blurred, rng.uniform(0.1, 2.0, (count, batch)), 0).astype(np.float32),
                  solarize=rng.random((count, batch)) < 0.3, size=size,
                  augs=(MOCOV2_AUG, dataclasses.replace(MOCOV2_AUG, blur_kernel_frac=0.2), MOCOV2_AUG))
    group = D._Group("crops", "global", count, size, cp.augs)
    params = D._cpu_params(cp, group)
    for v in range(count):
        for b in range(batch):
            want = render_view(Image.fromarray(images[b]), cp, v, b)
            got = np.empty_like(images[b])
            D.augment(got, images[b], params[v, b])
            diff = np.abs(got.astype(np.int16) - want)
            if blurred[v, b]:
                assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (v, b)
            else:
                assert diff.max() == 0, (v, b, cp.order[v, b], cp.factors[v, b])

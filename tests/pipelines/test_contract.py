"""The contract every pipeline keeps, parametrised over the registered ones:
Views shapes, dtypes, layout and bookkeeping, epochs, and mid-epoch resume."""
import pytest
import torch

import pipelines
from pipelines.data import open_source
from pipelines.views import (BYOL_AUG_1, BYOL_AUG_2, CropSpec, MosaicSpec, OriginalSpec, PairSpec, ViewSpec)

from ..conftest import make_image_folder

B = 8
SPEC = ViewSpec(
    crops=(CropSpec("global", 2, 32, augs=(BYOL_AUG_1, BYOL_AUG_2)), CropSpec("local", 3, 16, scale=(0.05, 0.4))),
    original=OriginalSpec(24),
    mosaic=MosaicSpec(crops_per_image=4, crop_size=16, jitter=4),
    pairs=PairSpec(family="global", min_size=4),
)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp("contract"), classes=2, per_class=12, size=(40, 30))
    return open_source(str(root), cache_dir=str(tmp_path_factory.mktemp("cache")), progress=False)


def build(name, source, **kw):
    return pipelines.build(name, SPEC, source, batch_size=kw.pop("batch_size", B), seed=3,
                           workers=kw.pop("workers", 1), **kw)


@pytest.fixture(params=sorted(pipelines.PIPELINES))
def name(request):
    return request.param


def first(loader):
    it = iter(loader)
    views = next(it)
    it.close()
    return views


def test_views_shapes_dtypes_layout(name, source):
    loader = build(name, source)
    views = first(loader)
    loader.close()
    assert views.crops["global"].shape == (2, B, 3, 32, 32)
    assert views.crops["local"].shape == (3, B, 3, 16, 16)
    for fam in views.crops.values():
        assert fam.dtype == torch.float32
        assert fam[0].is_contiguous(memory_format=torch.channels_last)
    assert views.original.shape == (B, 3, 24, 24)
    assert views.mosaic.shape == (B, 3, 32, 32)
    assert views.mosaic_rois.shape == (B * 4, 5) and views.mosaic_src.shape == (B * 4,)
    assert views.mosaic_weight.shape == (B * 4,)
    assert views.boxes["global"].shape == (2, B, 5) and views.boxes["local"].shape == (3, B, 5)
    assert views.pair_boxes.ndim == 3 and views.pair_boxes.shape[0] == 2 and views.pair_boxes.shape[2] == 5
    assert views.index.shape == (B,) and views.labels.shape == (B,)
    # Normalised with ImageNet statistics: pixel values 0..255 land in about [-2.2, 2.7].
    assert -2.2 <= float(views.crops["global"].min()) and float(views.crops["global"].max()) <= 2.7


def test_bookkeeping_invariants(name, source):
    loader = build(name, source)
    views = first(loader)
    loader.close()
    assert torch.equal(views.labels, torch.as_tensor(source.labels)[views.index])
    boxes = views.boxes["global"]
    assert (boxes[..., :4] >= 0).all() and (boxes[..., :4] <= 1).all()
    assert (boxes[..., 2] > boxes[..., 0]).all() and (boxes[..., 3] > boxes[..., 1]).all()
    src = views.mosaic_src.view(B, 4)
    for canvas in src:  # every canvas holds crops of distinct images, every image 4 times
        assert len(set(canvas.tolist())) == 4
    assert torch.equal(torch.bincount(views.mosaic_src, minlength=B), torch.full((B,), 4))
    assert ((views.mosaic_weight > 0) & (views.mosaic_weight <= 1)).all()


def test_epoch_covers_disjoint_samples_and_advances(name, source):
    loader = build(name, source)
    assert len(loader) == len(source) // B
    seen = [v.index for v in loader]
    assert len(seen) == len(loader)
    seen = torch.cat(seen)
    assert len(set(seen.tolist())) == len(seen)
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["step"] == 0
    again = torch.cat([v.index for v in loader])
    assert not torch.equal(seen, again), "each epoch has its own order"
    loader.close()


def test_resume_mid_epoch_gives_the_same_batches(name, source):
    whole = build(name, source)
    reference = [v for _, v in zip(range(3), whole)]
    whole.close()
    first_part = build(name, source)
    for i, _ in enumerate(first_part):
        if i == 0:
            break
    state = first_part.state_dict()
    first_part.close()
    assert state == {**state, "epoch": 0, "step": 1}
    resumed = build(name, source)
    resumed.load_state_dict(state)
    got = [v for _, v in zip(range(2), resumed)]
    resumed.close()
    for ref, new in zip(reference[1:], got):
        assert torch.equal(ref.index, new.index)
        assert torch.equal(ref.mosaic_rois, new.mosaic_rois)
        if name != "synthetic":  # synthetic pixels are fixed noise, not renders
            assert torch.equal(ref.crops["global"], new.crops["global"])
            assert torch.equal(ref.mosaic, new.mosaic)


def test_resume_refuses_another_global_batch(name, source):
    loader = build(name, source)
    state = loader.state_dict()
    other = pipelines.build(name, SPEC, source, batch_size=4, seed=3, workers=1)
    with pytest.raises(pipelines.PipelineError, match="global batch is 8 .*this run's 4"):
        other.load_state_dict(state)
    loader.close()
    other.close()


def test_resume_on_another_number_of_processes(name, source):
    """Two ranks of 4 checkpointed after step 1, resumed by one process of 8:
    the same global batches, and each sample's crops rendered the same."""
    ranks = [build(name, source, batch_size=4, rank=r, world_size=2) for r in range(2)]
    per_rank = [[v for _, v in zip(range(3), loader)] for loader in ranks]
    state = ranks[0].state_dict()
    for loader in ranks:
        loader.close()
    assert state["world_size"] == 2 and state["batch_size"] == 4
    state["step"] = 1  # as if the checkpoint was written after the first step
    single = build(name, source)
    single.load_state_dict(state)
    got = [v for _, v in zip(range(2), single)]
    single.close()
    for step, views in enumerate(got, start=1):
        halves = [per_rank[r][step] for r in range(2)]
        assert torch.equal(views.index, torch.cat([h.index for h in halves]))
        assert torch.equal(views.boxes["global"], torch.cat([h.boxes["global"] for h in halves], dim=1))
        if name != "synthetic":  # synthetic pixels are fixed noise, not renders
            for family in ("global", "local"):
                assert torch.equal(views.crops[family], torch.cat([h.crops[family] for h in halves], dim=1))


def test_unknown_pipeline_lists_the_available_ones(source):
    with pytest.raises(pipelines.PipelineError, match="available: .*torchvision"):
        pipelines.build("nope", SPEC, source, batch_size=B)


def test_batch_larger_than_data_is_a_clear_error(name, source):
    with pytest.raises(pipelines.PipelineError, match="larger than"):
        pipelines.build(name, SPEC, source, batch_size=len(source) + 1)

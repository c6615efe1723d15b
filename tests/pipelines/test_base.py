"""pipelines/base.py's upload of a step's bookkeeping: one pinned buffer,
one non_blocking copy, so that a CUDA step never waits on a copy from
pageable memory. The CPU has no pinned memory, so the CUDA case is mocked:
what is checked is that the buffer is asked for pinned, copied once
without blocking, and unpacked to the plan's values."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pipelines
from pipelines import base
from pipelines.data import open_source
from pipelines.views import CropSpec, MosaicSpec, ViewSpec

DTYPES = [np.bool_, np.uint8, np.int32, np.int64, np.float32, np.float64]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 5), min_size=0, max_size=3)),
                min_size=1, max_size=6), st.integers(0, 2 ** 31))
def test_pack_then_unpack_gives_back_every_array(fields, seed):
    rng = np.random.default_rng(seed)
    arrays = {f"f{i}": (rng.random(shape) * 100).astype(dtype) for i, (dtype, shape) in enumerate(fields)}
    buffer, layout = base.pack(arrays, pinned=False)
    assert buffer.dtype == torch.uint8 and buffer.dim() == 1
    out = base.unpack(buffer, layout)
    for name, a in arrays.items():
        assert out[name].shape == a.shape and np.array_equal(out[name].numpy(), a), name
        assert out[name].numpy().dtype == a.dtype


def test_the_cpu_shares_the_plan_arrays():
    a = np.arange(5, dtype=np.int64)
    t = base.host_to_device({"a": a}, "cpu")["a"]
    a[0] = 7
    assert t[0] == 7


SPECS = {"mosaic": ViewSpec(crops=(CropSpec("global", 2, 16),), mosaic=MosaicSpec(crops_per_image=4, crop_size=8)),
         "neighbours": ViewSpec(crops=(CropSpec("global", 2, 16),), neighbours=True)}


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_bookkeeping_for_cuda_is_one_pinned_non_blocking_copy(labelled_folder, monkeypatch, kind):
    source = open_source(str(labelled_folder), "train")
    loader = pipelines.build("synthetic", SPECS[kind], source, batch_size=8)
    if kind == "neighbours":
        loader.set_neighbours(np.roll(np.arange(len(source)), 3))
    plan = loader.planner.plan(0, 1)
    want = loader.bookkeeping(plan)  # on the CPU: straight from the plan

    buffers, copies = [], []
    real_buffer = base._host_buffer

    def host_buffer(nbytes, pinned):
        buffers.append(pinned)
        return real_buffer(nbytes, False)  # no pinned memory without CUDA

    def upload(buffer, device):
        copies.append(device)
        return buffer.clone()  # stands in for the device copy

    monkeypatch.setattr(base, "_host_buffer", host_buffer)
    monkeypatch.setattr(base, "_upload", upload)
    loader.device = torch.device("cuda", 0)
    got = loader.bookkeeping(plan)
    assert buffers == [True] and copies == [torch.device("cuda", 0)]
    fields = {"mosaic": ("index", "labels", "mosaic_rois", "mosaic_src", "mosaic_weight"),
              "neighbours": ("index", "labels", "neighbour")}[kind]
    for name in fields:
        assert getattr(got, name) is not None and torch.equal(getattr(got, name), getattr(want, name)), name
    assert torch.equal(got.boxes["global"], want.boxes["global"])
    if kind == "neighbours":
        assert got.neighbours_found == want.neighbours_found == int((plan.neighbour >= 0).sum()) > 0
    assert got.source_size == want.source_size == len(source)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bookkeeping_on_a_gpu_is_pinned_and_exact(labelled_folder):
    source = open_source(str(labelled_folder), "train")
    loader = pipelines.build("synthetic", SPECS["mosaic"], source, batch_size=8)
    plan = loader.planner.plan(0, 0)
    want = loader.bookkeeping(plan)
    buffer, layout = base.pack({"index": plan.index}, pinned=True)
    assert buffer.is_pinned()
    loader.device = torch.device("cuda")
    got = loader.bookkeeping(plan)
    assert torch.equal(got.index.cpu(), want.index) and torch.equal(got.mosaic_rois.cpu(), want.mosaic_rois)

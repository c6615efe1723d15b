"""DALI-specific tests of pipelines/dali.py: the Views every view family
gets, determinism, mid-epoch resume and restarts, and (marked `gpu`,
skipped without CUDA) the nvJPEG graph against the CPU graph.

Images are the 24 px JPEGs of tests/conftest.py; views are small (8-24 px)
and batches 8, so each loader builds in about a second.
"""
from __future__ import annotations

import dataclasses
import faulthandler
import gc
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from pipelines import build, dali
from pipelines.data import open_source
from pipelines.views import (BYOL_AUG_1, BYOL_AUG_2, MEAN, MOCOV2_AUG, STD, AugSpec, CropSpec, MosaicSpec, OriginalSpec,
                             PairSpec, ViewSpec)

from PIL import Image

from tests.conftest import make_image_folder

ROOT = Path(__file__).resolve().parents[2]

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


# ---------------------------------------------------------------- the feed's reader
class LoopThreadFeed(dali._Feed):
    """The feed without its reader thread (as it was before it): each call
    plans, reads and prepares its step on the thread that runs the graph."""

    def start(self, epoch, step, known_bad=frozenset()):
        self.plans.clear()
        self.replacements.clear()
        self.epoch, self.step, self.known_bad, self.stop = epoch, step, frozenset(known_bad), False

    def halt(self):
        self.stop = True

    def __call__(self):
        if self.stop or self.step >= self.planner.steps_per_epoch:
            raise StopIteration
        plan, replaced, batch = dali._prepare(self.planner, self.source, self.groups, self.views, self.keys,
                                              self.mode, self.planner.neighbours, self.known_bad, self.epoch,
                                              self.step)
        self.plans.append(plan)
        self.replacements.append(replaced)
        self.step += 1
        return batch


def feed_threads() -> set:
    return {t for t in threading.enumerate() if t.name == "dali-feed" and t.is_alive()}


def run_iterations(ld) -> list:
    """Epoch 0 broken after 2 steps, then its rest, then epoch 1 broken after 1: every Views with its neighbours."""
    return epoch(ld, limit=2) + epoch(ld) + epoch(ld, limit=1)


@pytest.mark.parametrize("name", ["mosaic", "neighbours"])
def test_the_reader_renders_what_the_loop_thread_would(name, source, monkeypatch):
    """Steps read ahead on the reader thread are bit for bit the steps read
    on the loop thread when DALI asks for them, through breaks and
    restarts; and no file is read on the loop thread."""
    from pipelines import dali

    if name == "neighbours":
        spec = ViewSpec(crops=(CropSpec("global", 2, 16),), original=OriginalSpec(12), neighbours=True)
        table = (np.arange(len(source)) * 7 + 3) % len(source)
        table[::5] = -1
    else:
        spec, table = SPECS[name], None
    readers = set()
    read_checked = dali.read_checked

    def recorded(*args):
        readers.add(threading.current_thread().name)
        return read_checked(*args)

    monkeypatch.setattr(dali, "read_checked", recorded)
    ahead = loader(spec, source, seed=6)
    ahead.set_neighbours(table)
    got = run_iterations(ahead)
    ahead.close()
    assert readers == {"dali-feed"}
    monkeypatch.setattr(dali, "_Feed", LoopThreadFeed)
    readers.clear()
    inline = loader(spec, source, seed=6)
    inline.set_neighbours(table)
    want = run_iterations(inline)
    inline.close()
    assert readers == {threading.current_thread().name}
    assert len(got) == len(want) == 7
    for x, y in zip(got, want):
        assert_same(x, y)
        assert (x.neighbour is None) == (table is None)
        if table is not None:
            assert torch.equal(x.neighbour, y.neighbour)


def test_a_new_table_applies_to_the_next_iteration_not_the_current_one(source):
    """set_neighbours mid-epoch, or the caller's table array changed in
    place: the steps the reader has not read yet still take the table the
    iteration started with; the next iteration the one set then."""
    spec = ViewSpec(crops=(CropSpec("global", 2, 8),), neighbours=True)
    n = len(source)
    first, second = (np.arange(n) + 1) % n, (np.arange(n) + 2) % n
    table = first.copy()  # int64: the planner keeps this very array
    ld = loader(spec, source, seed=1)
    ld.set_neighbours(table)
    it = iter(ld)
    views = [next(it)]
    table[:] = (np.arange(n) + 3) % n
    ld.set_neighbours(second)
    views += list(it)
    assert len(views) == len(ld)
    for step, v in enumerate(views):
        plan = ld.planner.plan(0, step, neighbours=first)
        assert torch.equal(v.index, torch.as_tensor(plan.index))  # anchors, then the rows the table names
        assert torch.equal(v.neighbour, torch.as_tensor(plan.neighbour))
    v = next(iter(ld))
    assert torch.equal(v.neighbour, torch.as_tensor(ld.planner.plan(1, 0, neighbours=second).neighbour))
    ld.close()


def test_the_next_epoch_is_read_before_it_is_asked_for(source, monkeypatch):
    """After an epoch's last step the reader goes on with the next epoch's
    first steps, so they are read before the next iteration starts, by the
    same reader; a restart anywhere else starts a new one."""
    reads = []
    read_checked = dali.read_checked

    def recorded(source, indices, known_bad=frozenset()):
        reads.append(list(indices))
        return read_checked(source, indices, known_bad)

    monkeypatch.setattr(dali, "read_checked", recorded)
    gc.collect()
    before = feed_threads()
    ld = loader(SPECS["two_views"], source, seed=4)
    first = epoch(ld)
    (reader,) = feed_threads() - before
    ahead = [ld.planner.plan(1, s).index.tolist() for s in range(dali._Feed.AHEAD)]
    deadline = time.monotonic() + 30
    while not all(i in reads for i in ahead) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(i in reads for i in ahead), "epoch 1's first steps were not read ahead"
    second = epoch(ld, limit=3)
    assert feed_threads() - before == {reader}
    for step, views in enumerate(second):
        assert views.index.tolist() == ld.planner.plan(1, step).index.tolist()
    assert [v.index.tolist() for v in first] == [ld.planner.plan(0, s).index.tolist() for s in range(len(ld))]
    epoch(ld)  # resumes at step 3: the reader had gone further, so a new one reads
    assert reader not in feed_threads() and len(feed_threads() - before) == 1
    ld.close()


def test_the_reader_stops_on_close_restart_and_collection(source):
    gc.collect()
    before = feed_threads()
    ld = loader(SPECS["two_views"], source)
    it = iter(ld)
    next(it)  # the reader now waits on its full queue
    running = feed_threads() - before
    assert len(running) == 1
    next(iter(ld))  # a new iteration at step 1 (the reader is past it): the old reader joined, a new one reads
    now = feed_threads() - before
    assert len(now) == 1 and not (now & running) and not any(t.is_alive() for t in running)
    ld.close()
    assert feed_threads() - before == set() and not any(t.is_alive() for t in now)
    it = iter(ld)
    next(it)  # a closed loader builds again, and reads again
    assert len(feed_threads() - before) == 1
    del ld, it  # neither closed nor finished: dropped
    gc.collect()
    assert feed_threads() - before == set()


def test_an_error_in_the_reader_reaches_the_loop(source, monkeypatch):
    """An exception raised while reading step 3 leaves the iteration as
    itself, after the steps before it, with the reader gone; the loader then
    goes on from where it stopped."""
    spec = SPECS["two_views"]
    want = epoch(loader(spec, source, seed=2))
    ld = loader(spec, source, seed=2)
    read, calls = source.read, []

    def failing(i):
        calls.append(i)
        if len(calls) == 3 * B + 1:
            raise ValueError("step 3 cannot be read")
        return read(i)

    monkeypatch.setattr(source, "read", failing)
    gc.collect()
    before = feed_threads()
    got = []
    faulthandler.dump_traceback_later(120, exit=True)  # a hang fails the run rather than stalling it
    try:
        with pytest.raises(ValueError, match="step 3 cannot be read"):
            for views in ld:
                got.append(views)
    finally:
        faulthandler.cancel_dump_traceback_later()
    # DALI's prefetch queue asks the feed for step 3 up to two steps before the loop
    # takes it, so the error ends the loop after 1 to 3 delivered steps; ld.step counts
    # exactly those, which is what the resume below relies on
    assert 1 <= len(got) <= 3 and ld.step == len(got)
    assert feed_threads() - before == set()
    monkeypatch.setattr(source, "read", read)
    got += epoch(ld)
    assert len(got) == len(want)
    for x, y in zip(got, want):
        assert_same(x, y)
    ld.close()


def test_a_reader_left_running_does_not_hold_the_interpreter(source, tmp_path):
    """A process that ends with a loader mid-epoch, neither closed nor
    dropped (its reader waiting on a full queue), exits at once and cleanly."""
    with open(tmp_path / "source.pkl", "wb") as f:
        pickle.dump(source, f)
    code = f"""
import pickle, sys, threading
sys.path.insert(0, {str(ROOT)!r})
from pipelines import build, dali
from pipelines.views import CropSpec, ViewSpec
with open({str(tmp_path / "source.pkl")!r}, "rb") as f:
    source = pickle.load(f)
ld = build("dali", ViewSpec(crops=(CropSpec("global", 2, 16),)), source, batch_size={B}, cpu=True)
it = iter(ld)
next(it)
assert any(t.name == "dali-feed" and t.is_alive() for t in threading.enumerate())
print("exiting")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "exiting", proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Exception" not in proc.stderr, proc.stderr


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


@pytest.fixture(scope="module")
def png_source(tmp_path_factory):
    """Lossless photos: nvJPEG's IDCT cannot differ from libjpeg-turbo's on them."""
    root = tmp_path_factory.mktemp("png") / "train"
    make_image_folder(root, per_class=8)
    for path in root.rglob("*.jpg"):
        Image.open(path).save(path.with_suffix(".png"))
        path.unlink()
    return open_source(str(root), cache_dir=str(tmp_path_factory.mktemp("pngcache")), progress=False)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", ["byol", "multicrop", "original", "mosaic"])
def test_gpu_graph_matches_cpu_graph(name, png_source):
    """The GPU graph (DALI's GPU resize, then the CUDA colour kernel) against
    the CPU graph (DALI's CPU resize, then the same maths compiled for the
    CPU), every operation on, hue included. The decode is identical (PNG)
    and the colour maths is bit for bit (tests/pipelines/test_colour.py), so
    what differs is the two resizes' rounding, carried through the colour
    operations: a mean under 1 level, and 99% of values within 6."""
    spec = SPECS[name]
    g = next(iter(loader(spec, png_source, cpu=False, device="cuda", seed=2)))
    c = next(iter(loader(spec, png_source, cpu=True, seed=2)))
    for x, y in zip(pixels(g), pixels(c), strict=True):
        d = (levels(x.cpu()) - levels(y)).abs().float()
        assert float(d.mean()) < 1.0, name
        assert float(torch.quantile(d.flatten(), 0.99)) <= 6, name


@pytest.mark.gpu
@gpu
def test_gpu_views_under_a_side_stream(source):
    """Rendering on a side stream gives the default stream's pixels: DALI's
    outputs, the copies and the kernels all follow torch's current stream."""
    spec = SPECS["mosaic"]
    want = epoch(loader(spec, source, cpu=False, device="cuda", seed=4), limit=3)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        got = epoch(loader(spec, source, cpu=False, device="cuda", seed=4), limit=3)
        got = [[t.clone() for t in pixels(v)] for v in got]  # consumed on the side stream
    side.synchronize()
    for x, y in zip(got, want, strict=True):
        for a, b in zip(x, pixels(y), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["multicrop", "original", "mosaic", "pairs"])
def test_gpu_graph_traced_without_cuda(name, source):
    """The GPU graph, traced on the CPU (DALI builds it with a device id and
    no CUDA): nvJPEG, then one resize per view and nothing else on the GPU;
    every argument input is a CPU node; no colour arithmetic is left."""
    import collections

    spec = SPECS[name]
    ld = loader(spec, source)
    ld.gpu, ld.mode, ld.device_id = True, "cuda", 0  # as a loader on a CUDA device sets them
    pipe = ld._pipeline()
    pipe._build_graph()
    kinds = collections.Counter()
    for op in pipe._ops:
        kind = op._op._schema.Name()
        kinds[kind] += 1
        regular = op.spec.NumRegularInput()
        for arg in list(op.inputs)[regular:]:
            assert arg.device == "cpu", (kind, arg.name)
        if kind == "decoders__Image":
            assert op._op._device == "mixed"
            spec_text = str(op.spec)  # set for H100/H200's hardware decoder, preallocated
            assert "hw_decoder_load: 0.99" in spec_text and "preallocate_width_hint: 5980" in spec_text
        elif kind != "ExternalSource":
            assert kind == "Resize" and op._op._device == "gpu", kind
    views = sum(c.count for c in spec.crops) + (spec.original is not None) + \
        (spec.mosaic.crops_per_image if spec.mosaic else 0)
    # per view: its resize and the two external-source outputs of its window
    assert kinds == {"decoders__Image": 1, "Resize": views, "ExternalSource": 1 + 2 * views}
    assert len(pipe._ops) == 2 + 3 * views


class _RecordingBatch:
    """A GPU TensorList's copy interface, recording what it is handed."""

    def __init__(self, shape, count, dtype):
        from nvidia.dali import types
        self._shapes, self.dtype, self.calls = [shape] * count, getattr(types, dtype), []

    def shape(self):
        return self._shapes

    def copy_to_external(self, ptr, stream=None, non_blocking=False, use_copy_kernel=False):
        self.calls.append((ptr, stream, non_blocking, use_copy_kernel))


def test_gpu_copies_go_on_the_given_stream_as_one_kernel():
    """DALI reads a stream through ctypes.c_void_p's value: a bare int would
    silently send the copy to the legacy default stream, racing torch's."""
    import ctypes

    from pipelines.dali import _copy_out
    dest = torch.empty((4, 6, 6, 3), dtype=torch.uint8)
    batch = _RecordingBatch((6, 6, 3), 4, "UINT8")
    _copy_out(batch, dest, stream=0x5EED)
    (ptr, stream, non_blocking, kernel), = batch.calls
    assert isinstance(ptr, ctypes.c_void_p) and ptr.value == dest.data_ptr()
    assert isinstance(stream, ctypes.c_void_p) and stream.value == 0x5EED
    assert non_blocking and kernel


def test_raw_copies_check_shape_and_dtype_first():
    from nvidia.dali.tensors import TensorListCPU

    from pipelines.dali import _copy_out
    batch = TensorListCPU(np.arange(4 * 5 * 5 * 3, dtype=np.uint8).reshape(4, 5, 5, 3))
    dest = torch.empty((4, 5, 5, 3), dtype=torch.uint8)
    _copy_out(batch, dest)
    assert torch.equal(dest, torch.from_numpy(np.asarray(batch.as_tensor())))
    for bad in (torch.empty((4, 5, 6, 3), dtype=torch.uint8), torch.empty((3, 5, 5, 3), dtype=torch.uint8),
                torch.empty((4, 5, 5, 3), dtype=torch.float32), torch.empty((4, 5, 5, 6), dtype=torch.uint8)[..., :3]):
        with pytest.raises(RuntimeError, match="cannot fill"):
            _copy_out(batch, bad)


# ---------------------------------------------------------------- colour='dali' against the reference
# DALI's own CPU colour operators (the fallback without DALI's Numba plugin)
# against the Numba operator, which is torchvision bit for bit
# (tests/pipelines/test_colour.py): one operation at a time, always on,
# tolerances in levels (max, mean). Hue is left out: color_twist rotates in
# YIQ, not in PIL's HSV.
ONLY = dict(flip_p=0.0, jitter_p=0.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, grayscale_p=0.0,
            blur_p=0.0, solarize_p=0.0)
DALI_COLOUR = {  # measured on these images (2026-11-30): brightness 1 / 0.0002, contrast 1 / 0.0014, the rest 0 / 0
    "brightness": (dict(jitter_p=1.0, brightness=0.6), 1, 0.01),
    "contrast": (dict(jitter_p=1.0, contrast=0.6), 2, 0.02),
    "saturation": (dict(jitter_p=1.0, saturation=0.6), 1, 0.01),
    "grayscale": (dict(grayscale_p=1.0), 1, 0.01),
    "blur": (dict(blur_p=1.0), 1, 0.05),
    "solarize": (dict(solarize_p=1.0), 0, 0.0),
}


@pytest.mark.parametrize("op", DALI_COLOUR)
def test_dali_colour_operators_against_the_reference(op, source):
    settings, worst, mean = DALI_COLOUR[op]
    aug = AugSpec(**{**ONLY, **settings})
    spec = ViewSpec(crops=(CropSpec("global", 2, 16, augs=(aug,)),), original=OriginalSpec(12, aug))
    dali = next(iter(loader(spec, source, colour="dali", seed=5)))
    exact = next(iter(loader(spec, source, colour="numba", seed=5)))
    for x, y in zip(pixels(dali), pixels(exact), strict=True):
        d = (levels(x) - levels(y)).abs().float()
        assert float(d.max()) <= worst, (op, float(d.max()))
        assert float(d.mean()) <= mean, (op, float(d.mean()))


def levels(x: torch.Tensor) -> torch.Tensor:
    """Normalised [..., C, H, W] back to integer levels."""
    return (x.float() * torch.tensor(STD).view(3, 1, 1) * 255 + torch.tensor(MEAN).view(3, 1, 1) * 255).round()

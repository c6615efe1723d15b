"""model/step.py: the loop's training step reads nothing from the device
(so a GPU never waits for the host), a NaN is noted on the device and read
only when asked, and the data-wait clock measures what the loop waits for.

A CPU cannot show a GPU sync, but it can show what causes most of them: a
value read on the host from a tensor (`.item()`, `bool(t)`, `int(t)`), or
an op whose output shape depends on tensor values (nonzero, masked_select,
boolean indexing, unique). `HostReads` records those ops as the dispatcher
runs them, backward included. The GPU test beside it runs the same step
under torch.cuda.set_sync_debug_mode("error"), which also catches copies
from pageable memory.
"""
from __future__ import annotations

import time
import traceback

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pipelines
from configs import apply_small_profile, resolve_config
from model import evaluation
from model.methods import METHODS
from model.optim import build_optimizer
from model.step import TrainStep, WaitClock
from pipelines.data import open_source

aten = torch.ops.aten
# ops that make the host wait for the device's values
_HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "_unique", "_unique2",
               "unique_consecutive", "unique_dim"}
_INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}


class HostReads(TorchDispatchMode):
    """Records every op that reads tensor values on the host, with where it was called."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        read = name in _HOST_READS
        if name in _INDEXING:  # boolean-mask indexing: the output's shape is the mask's count
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            read = any(t is not None and t.dtype == torch.bool for t in indices)
        if read:
            self.seen.append(f"{func}:\n" + "".join(traceback.format_stack(limit=12)[:-1]))
        return func(*args, **kwargs)


def method_and_loader(name, source, pipeline="synthetic", device="cpu", batch=8):
    cfg, _ = resolve_config(["--method", name])
    apply_small_profile(cfg, {}, 28, torch.device(device).type)
    cfg.batch_size, cfg.image_size, cfg.amp = batch, 16, "fp32"
    if hasattr(cfg, "queue_size"):
        cfg.queue_size = 32
    torch.manual_seed(0)
    method = METHODS[name](cfg).to(device, memory_format=torch.channels_last)
    loader = pipelines.build(pipeline, METHODS[name].spec(cfg), source, batch_size=batch, device=device, workers=1)
    if hasattr(method, "neighbour_table"):  # CLIM: a table that gives most anchors a neighbour, so it mixes
        loader.set_neighbours(np.roll(np.arange(len(source)), 1))
    step = TrainStep(method, build_optimizer(cfg, method, 0.01), torch.amp.GradScaler(enabled=False),
                     evaluation.autocast(device, "fp32"), np.full(8, 0.01))
    return method, loader, step


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_step_reads_no_tensor_value_on_the_host(labelled_folder, name):
    """Every method's step (bookkeeping, forward, backward, optimizer,
    step_end) after a first one (which may size buffers)."""
    source = open_source(str(labelled_folder), "train")
    _, loader, step = method_and_loader(name, source)
    it = iter(loader)
    step(next(it), 0)
    reads = HostReads()
    with reads:
        loss, metrics = step(next(it), 1)
    assert not reads.seen, "\n".join(reads.seen)
    assert torch.isfinite(loss)


def test_host_reads_are_caught():
    """The check itself: each kind of read it must see."""
    x = torch.arange(6.0)
    for read in (lambda: x.sum().item(), lambda: bool(x.any()), lambda: x[x > 2], lambda: x.nonzero(),
                 lambda: torch.unique(x)):
        reads = HostReads()
        with reads:
            read()
        assert reads.seen


def test_a_nonfinite_loss_is_noted_and_read_only_when_asked(labelled_folder):
    source = open_source(str(labelled_folder), "train")
    method, loader, step = method_and_loader("simclr", source)
    step.lr_schedule = np.array([0.01, 1e12, 1e12, 1e12])
    it = iter(loader)
    first, _ = step(next(it), 0)
    assert step.first_nonfinite() is None
    for k in (1, 2, 3):
        step(next(it), k)
    bad = step.first_nonfinite()
    assert bad is not None and 2 <= bad[0] <= 4, bad  # a step after the huge rate, 1-based
    assert np.isfinite(bad[1]) and (bad[0] > 2 or bad[1] == pytest.approx(float(first)))


class Slow:
    """A loader whose batches take `wait` seconds each; remembers being closed."""

    def __init__(self, n, wait):
        self.n, self.wait, self.closed = n, wait, False

    def __iter__(self):
        try:
            for i in range(self.n):
                time.sleep(self.wait)
                yield i
        finally:
            self.closed = True


def test_wait_clock_splits_waiting_from_stepping():
    clock, data = WaitClock(), Slow(4, 0.04)
    for _ in clock.batches(data):
        time.sleep(0.12)  # the step
    assert clock.steps == 4 and data.closed
    assert 0.14 <= clock.wait_s < 0.3 and 0.6 <= clock.step_s < 0.9
    assert 0.18 <= clock.share <= 0.3
    record = clock.reset()
    assert record["steps"] == 4 and record["wait_share"] == pytest.approx(clock_share(record), abs=1e-3)
    assert clock.steps == 0 and clock.wait_s == 0 and clock.share == 0


def clock_share(record):
    return record["data_wait_s"] / record["step_s"]


def test_wait_clock_counts_the_last_step_of_a_loop_that_breaks():
    clock, data = WaitClock(), Slow(10, 0.0)
    for i in clock.batches(data):
        time.sleep(0.05)
        if i == 2:
            break
    assert clock.steps == 3 and clock.step_s >= 0.15 and data.closed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pipeline", ["dali", "ffcv"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_gpu_step_never_waits_for_the_device(labelled_folder, pipeline, name):
    """Bookkeeping, the colour kernels, forward, backward and the optimizer
    under torch's sync debug mode: any host sync raises."""
    if pipeline not in pipelines.PIPELINES:
        pytest.skip(f"{pipeline} is not installed")
    source = open_source(str(labelled_folder), "train")
    _, loader, step = method_and_loader(name, source, pipeline=pipeline, device="cuda")
    it = iter(loader)
    for k in range(2):  # compile the kernels, size the buffers
        step(next(it), k)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for k in range(2, 4):
            step(next(it), k)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        loader.close()

"""What every pipeline shares: the plan-driven loader and its bookkeeping.

A pipeline subclasses `PlannedLoader` and implements `_render(epoch, start)`,
a generator of `Views` for steps start, start+1, ... of `epoch`, rendered
from `self.planner.plan(epoch, step)`, and `close()`, which ends whatever
it started (workers, threads, graphs). Iteration, `len`, mid-epoch
`state_dict()` / `load_state_dict()` and every non-pixel field of `Views`
(boxes, RoIs, indices, labels) live here, written once; what the
renderers share lives in pipelines/render.py and pipelines/colour.py.

A loader is a context manager, and is also closed when it is garbage
collected and at interpreter exit, so that nothing it started outlives
the process, however the caller stops:

    with pipelines.build("torchvision", spec, source, batch_size=64) as loader:
        for views in loader:
            ...
"""
from __future__ import annotations

import abc
import atexit
import weakref
from typing import Iterator

import numpy as np
import torch

from .plan import BatchPlan, Planner
from .views import MEAN, STD, ViewSpec, Views


class PipelineError(ValueError):
    """A pipeline cannot serve a request (shown to the user as-is, exit 2)."""


_OPEN = weakref.WeakSet()  # every loader alive: interpreter exit closes them (closing twice is harmless)


@atexit.register
def close_all() -> None:
    for loader in list(_OPEN):
        try:
            loader.close()
        except Exception:  # exiting: one loader's failure must not keep the others open
            pass


class PlannedLoader(abc.ABC):
    name = "base"
    # View families this pipeline can render (see ViewSpec.capabilities).
    capabilities = frozenset()

    def __init__(self, spec: ViewSpec, source, *, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device="cpu", dtype=torch.float32, workers: int = 2):
        missing = spec.capabilities() - set(self.capabilities)
        if missing:
            raise PipelineError(f"pipeline {self.name!r} cannot make {', '.join(sorted(missing))} views "
                                f"(it makes: {', '.join(sorted(self.capabilities))})")
        self.spec, self.source = spec, source
        self.device, self.dtype = torch.device(device), dtype
        self.workers = int(workers)
        try:
            self.planner = Planner(spec, source.widths, source.heights, batch_size, seed=seed, rank=rank,
                                   world_size=world_size)
        except ValueError as e:
            raise PipelineError(str(e)) from None
        self.epoch, self.step = 0, 0
        # Dataset indices of files found unreadable since indexing and rendered
        # as data.replacement_image (counted when read; the caller logs and clears).
        self.replaced = []
        labels = getattr(source, "labels", None)
        self._labels = None if labels is None else np.asarray(labels, np.int64)
        mean = torch.tensor(MEAN, dtype=torch.float32) * 255
        std = torch.tensor(STD, dtype=torch.float32) * 255
        self._scale = (1.0 / std).to(self.device)
        self._shift = (-mean / std).to(self.device)
        self._rows = {}  # image width -> (shift, scale) tiled over a row of W*C values
        _OPEN.add(self)

    # -- the loader protocol -------------------------------------------------
    def __len__(self) -> int:
        return self.planner.steps_per_epoch

    @property
    def batch_size(self) -> int:
        return self.planner.batch_size

    def __iter__(self) -> Iterator[Views]:
        """One epoch from the current position; afterwards the loader points
        at the start of the next epoch. `self.step` counts the batches handed
        out, so a checkpoint taken after consuming a batch resumes right
        after it whatever the backend prefetched."""
        epoch, start = self.epoch, self.step
        if start < len(self):
            for step, views in zip(range(start, len(self)), self._render(epoch, start)):
                self.step = step + 1
                yield views
        self.epoch, self.step = epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.planner.seed,
                "batch_size": self.batch_size, "world_size": self.planner.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Resume at the checkpoint's (epoch, step). Another number of
        processes is fine when the global batch (batch_size * world_size) is
        unchanged: the plan keys every sample on its place in the epoch's
        global order, so the run continues with the same global batches."""
        mine = self.state_dict()
        if "seed" in state and state["seed"] != mine["seed"]:
            raise PipelineError(f"cannot resume: the checkpoint's loader has seed={state['seed']}, "
                                f"this run {mine['seed']}")
        if "batch_size" in state:
            theirs = state["batch_size"] * state.get("world_size", mine["world_size"])
            if theirs != self.planner.global_batch:
                raise PipelineError(f"cannot resume: the checkpoint's global batch is {theirs} "
                                    f"({state['batch_size']} x {state.get('world_size', mine['world_size'])} "
                                    f"processes), this run's {self.planner.global_batch} "
                                    f"({mine['batch_size']} x {mine['world_size']})")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    def set_neighbours(self, table) -> None:
        """The planner's neighbour table (ViewSpec.neighbours) for the plans of
        the iterations started from now on; int64 [N], -1 for none."""
        self.planner.set_neighbours(table)

    def close(self) -> None:
        """End the workers, threads or graphs this loader started (idempotent;
        a subclass's close calls this one)."""
        planner = getattr(self, "planner", None)
        if planner is not None:
            planner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    @abc.abstractmethod
    def _render(self, epoch: int, start: int) -> Iterator[Views]:
        """Views for steps start, start+1, ... of `epoch` (each backend's renderer)."""

    # -- shared by the backends ----------------------------------------------
    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [..., H, W, C] (any device) -> normalised [..., C, H, W] in
        self.dtype on self.device; a view of HWC memory, so every [B, C, H, W]
        slice is channels_last without a copy."""
        x = pixels.to(self.device, non_blocking=True)
        *lead, h, w, c = x.shape
        # One fused pass, uint8 in, float out, against per-channel constants
        # tiled over a whole row: broadcasting a length-3 vector over the
        # innermost axis vectorises poorly (about 30% slower on the CPU).
        rows = self._rows.get(w)
        if rows is None:
            rows = self._rows[w] = (self._shift.repeat(w), self._scale.repeat(w))
        x = torch.addcmul(rows[0], x.reshape(*lead, h, w * c), rows[1]).view(*lead, h, w, c)
        return x.to(self.dtype).movedim(-1, -3)

    def bookkeeping(self, plan: BatchPlan) -> Views:
        """Every field of Views except pixels, from the plan: one upload of
        host arrays (host_to_device), so a CUDA step waits on no copy."""
        w = self.planner.widths[plan.index]
        h = self.planner.heights[plan.index]
        fields = {"index": plan.index}
        if self._labels is not None:
            fields["labels"] = self._labels[plan.index]
        fields.update({f"boxes.{name}": cp.boxes(w, h) for name, cp in plan.crops.items()})
        if plan.mosaic is not None:
            fields.update(mosaic_rois=plan.mosaic.rois, mosaic_src=plan.mosaic.src, mosaic_weight=plan.mosaic.weight)
        if plan.pairs is not None:
            fields["pair_boxes"] = plan.pairs.boxes
        if plan.neighbour is not None:
            fields["neighbour"] = plan.neighbour
        on_device = host_to_device(fields, self.device)
        views = Views(boxes={name.split(".", 1)[1]: t for name, t in on_device.items() if name.startswith("boxes.")},
                      **{name: t for name, t in on_device.items() if not name.startswith("boxes.")})
        if plan.neighbour is not None:  # counted here, so a method can branch on it without reading the device
            views.neighbours_found = int((plan.neighbour >= 0).sum())
        views.source_size = len(self.planner.widths)
        return views


# -- host arrays to the device without a host sync ----------------------------
_ALIGN = 16  # every field starts on a 16-byte boundary of the packed buffer (any dtype can view it)


def pack(arrays: dict, pinned: bool) -> tuple:
    """numpy arrays -> (one uint8 tensor holding them all, layout): pinned
    host memory when `pinned`, so that its copy to a GPU is asynchronous.
    The caching host allocator keeps a pinned block until the copies that
    read it have run, so a fresh buffer per step is safe and cheap."""
    layout, total = {}, 0
    arrays = {name: np.asarray(a, order="C") for name, a in arrays.items()}  # 0-d stays 0-d
    for name, a in arrays.items():
        total = -(-total // _ALIGN) * _ALIGN
        layout[name] = (total, a.dtype, a.shape)
        total += a.nbytes
    buffer = _host_buffer(total, pinned)
    flat = buffer.numpy()
    for name, a in arrays.items():
        offset = layout[name][0]
        flat[offset:offset + a.nbytes] = a.reshape(-1).view(np.uint8)
    return buffer, layout


def unpack(buffer: torch.Tensor, layout: dict) -> dict:
    """pack's arrays as tensors viewing `buffer` (on whatever device it is)."""
    out = {}
    for name, (offset, dtype, shape) in layout.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        out[name] = buffer[offset:offset + nbytes].view(_TORCH_DTYPES[dtype]).view(shape)
    return out


def host_to_device(arrays: dict, device) -> dict:
    """numpy arrays as tensors on `device`. The CPU shares their memory; a
    GPU gets them in one non_blocking copy from pinned memory: a copy from
    pageable memory would make the host wait for the GPU every step."""
    device = torch.device(device)
    if device.type == "cpu":
        return {name: torch.from_numpy(np.asarray(a, order="C")) for name, a in arrays.items()}
    buffer, layout = pack(arrays, pinned=device.type == "cuda")
    return unpack(_upload(buffer, device), layout)


def upload(array: np.ndarray, device) -> torch.Tensor:
    """One numpy array onto `device` as host_to_device moves them."""
    return host_to_device({"array": array}, device)["array"]


def _host_buffer(nbytes: int, pinned: bool) -> torch.Tensor:
    return torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pinned)


def _upload(buffer: torch.Tensor, device: torch.device) -> torch.Tensor:
    return buffer.to(device, non_blocking=True)


_TORCH_DTYPES = {np.dtype(d): t for d, t in ((np.bool_, torch.bool), (np.uint8, torch.uint8), (np.int8, torch.int8),
                                              (np.int16, torch.int16), (np.int32, torch.int32),
                                              (np.int64, torch.int64), (np.float16, torch.float16),
                                              (np.float32, torch.float32), (np.float64, torch.float64))}

"""Pipelines turn (data source, ViewSpec, plan) into Views.

`PIPELINES` lists the backends whose dependencies import here; `build` is the
one factory every backend shares.
"""
from __future__ import annotations

import importlib
import importlib.util

from .base import PipelineError, PlannedLoader

# name -> (module, class, the import that must work for it to be offered)
_BACKENDS = {
    "dali": ("pipelines.dali", "DaliLoader", "nvidia.dali"),
    "ffcv": ("pipelines.ffcv", "FfcvLoader", "ffcv"),
    "torchvision": ("pipelines.torchvision", "TorchvisionLoader", "torchvision"),
    "synthetic": ("pipelines.synthetic", "SyntheticLoader", "torch"),
}


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


PIPELINES = {name: entry for name, entry in _BACKENDS.items()
             if _importable(entry[2]) and _importable(entry[0])}


def loader_class(name: str) -> type:
    if name not in PIPELINES:
        known = ", ".join(sorted(PIPELINES))
        extra = f" (its package is not installed: pip install -e .[{name}])" if name in _BACKENDS else ""
        raise PipelineError(f"unknown pipeline {name!r}{extra}; available: {known}")
    module, cls, _ = PIPELINES[name]
    return getattr(importlib.import_module(module), cls)


def build(name: str, spec, source, *, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
          device="cpu", dtype=None, workers: int = 2, **options) -> PlannedLoader:
    """The loader of pipeline `name` for `spec` over `source`: iterating it
    yields one epoch of Views from its current position; `len` is steps per
    epoch; `state_dict()`/`load_state_dict()` resume mid-epoch."""
    import torch
    return loader_class(name)(spec, source, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
                              device=device, dtype=dtype or torch.float32, workers=workers, **options)


def backend_options(name: str, cfg) -> dict:
    """The options of backend `name` (build's **options) that a run's config
    sets, so that a caller passes them without naming a backend: --cpu-graph
    runs DALI's graph on the CPU even with a GPU."""
    return {"cpu": True} if name == "dali" and getattr(cfg, "cpu_graph", False) else {}


__all__ = ["PIPELINES", "PipelineError", "PlannedLoader", "backend_options", "build", "loader_class"]

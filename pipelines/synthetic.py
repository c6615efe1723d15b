"""Correctly shaped random views made once on the device: the ceiling that
benchmarks compare the real pipelines against. Bookkeeping (boxes, RoIs,
indices) still comes from the plan, so every method runs on it."""
from __future__ import annotations

import torch

from .base import PlannedLoader


class SyntheticLoader(PlannedLoader):
    name = "synthetic"
    capabilities = frozenset({"crops", "asymmetric", "original", "mosaic", "pairs", "neighbours"})

    def __init__(self, spec, source, **kw):
        super().__init__(spec, source, **kw)
        gen = torch.Generator().manual_seed(self.planner.seed)
        b = self.planner.rows

        def pixels(*shape):
            return self.normalize(torch.randint(0, 256, (*shape, 3), dtype=torch.uint8, generator=gen))

        self._crops = {c.name: pixels(c.count, b, c.size, c.size) for c in spec.crops}
        self._original = pixels(b, spec.original.size, spec.original.size) if spec.original else None
        self._mosaic = pixels(b, spec.mosaic.canvas_size, spec.mosaic.canvas_size) if spec.mosaic else None

    def _render(self, epoch, start):
        for step in range(start, len(self)):
            views = self.bookkeeping(self.planner.plan(epoch, step))
            views.crops, views.original, views.mosaic = dict(self._crops), self._original, self._mosaic
            yield views

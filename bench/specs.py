"""What one sample holds, for the bench's tables: the ViewSpecs the sweeps
vary, a short text of a spec, and its views and output pixels per sample."""
from __future__ import annotations

from pipelines.views import CropSpec, ViewSpec


def two_views(size: int) -> ViewSpec:
    return ViewSpec(crops=(CropSpec("global", 2, size),))


def with_locals(n: int, size: int = 224, local: int = 96) -> ViewSpec:
    """2 x `size` + n x `local` (multi-crop's local scale, Caron et al. 2020)."""
    crops = (CropSpec("global", 2, size),)
    if n:
        crops += (CropSpec("local", n, local, scale=(0.05, 0.14)),)
    return ViewSpec(crops=crops)


def scaled(spec: ViewSpec, factor: float) -> ViewSpec:
    return spec if factor == 1.0 else spec.scaled(factor)


def describe(spec: ViewSpec) -> str:
    """'2x224+6x96+mosaic4x112': what one sample holds."""
    parts = [f"{c.count}x{c.size}" for c in spec.crops]
    if spec.original is not None:
        parts.append(f"orig{spec.original.size}")
    if spec.mosaic is not None:
        parts.append(f"mosaic{spec.mosaic.crops_per_image}x{spec.mosaic.crop_size}")
    if spec.pairs is not None:
        parts.append(f"pairs{spec.pairs.boxes_per_image}")
    return "+".join(parts) or "none"


def views_per_sample(spec: ViewSpec) -> int:
    """Rendered views per sample: every crop, the original, and each mosaic tile."""
    n = sum(c.count for c in spec.crops) + (spec.original is not None)
    return n + (spec.mosaic.crops_per_image if spec.mosaic is not None else 0)


def pixels_per_sample(spec: ViewSpec) -> int:
    """Output pixels per sample (a mosaic canvas counts once)."""
    n = sum(c.count * c.size ** 2 for c in spec.crops)
    n += spec.original.size ** 2 if spec.original is not None else 0
    return n + (spec.mosaic.canvas_size ** 2 if spec.mosaic is not None else 0)

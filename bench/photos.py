"""Bench data: ImageNet-like photographs cut from the wallpapers a package installs.

`make_photo_folder` writes a flat folder of JPEGs of ImageNet's most common
sizes for bench/throughput.py, so that the pipelines are timed on real
photographs rather than noise; the folder is indexed like any other source.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
from typing import Optional, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipelines.data import DataError, Source, index_source

PHOTO_SOURCES = ("/usr/share/backgrounds/mate/nature", "/usr/share/backgrounds/gnome")
PHOTO_PACKAGE = "mate-backgrounds"
_PHOTO_SETTINGS = ".viewforge-photos.json"
_PORTRAIT_P = 0.25  # ImageNet holds mostly 500x375 landscapes and fewer 375x500 portraits
_PHOTO_AREA = (0.1, 1.0)  # crop area as a fraction of the largest window of the right shape


def make_photo_folder(out_dir, count: int, size=(500, 375), quality: int = 90, seed: int = 0,
                      sources: Sequence[str] = PHOTO_SOURCES, progress: bool = True,
                      cache_dir: Optional[str] = None) -> Source:
    """`count` ImageNet-like JPEGs cut from large wallpaper photos into `out_dir` (flat, unlabelled).

    Image i is a random crop (random photo, orientation, scale, position and
    mirror, drawn from (seed, i)) resized to `size` or its transpose, so a
    folder made with a larger count extends a smaller one. Existing files
    made with the same settings are kept; the returned Source holds exactly
    photo_000000.jpg ... of the requested count; its index is cached under
    `cache_root(cache_dir)` like any other source's.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = (sources,)
    photos = sorted(
        os.path.join(d, f) for d in sources if os.path.isdir(d) for f in os.listdir(d)
        if os.path.splitext(f)[1].lower() in {".jpg", ".jpeg", ".png"})
    if not photos:
        raise DataError(f"no source photos in {', '.join(map(str, sources))}: install them with "
                        f"`apt-get install {PHOTO_PACKAGE}`")
    if count < 1:
        raise DataError(f"make_photo_folder: count must be positive, not {count}")
    out = pathlib.Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    targets = [out / f"photo_{i:06d}.jpg" for i in range(count)]

    settings = {"size": [int(s) for s in size], "quality": int(quality), "seed": int(seed),
                "photos": [os.path.basename(p) for p in photos]}
    try:
        old_settings = json.loads((out / _PHOTO_SETTINGS).read_text())
    except (OSError, ValueError):
        old_settings = None
    if old_settings != settings:
        # Files made otherwise would mix into this folder: remove ours before writing the new settings.
        for stale in out.glob("photo_*.jpg"):
            stale.unlink()
        (out / _PHOTO_SETTINGS).write_text(json.dumps(settings))
    # Files appear by rename only, so an existing one is complete.
    todo = [i for i in range(count) if not targets[i].exists()]

    by_photo = {}
    for i in todo:
        rng = np.random.default_rng([seed, i])
        photo = int(rng.integers(len(photos)))
        by_photo.setdefault(photo, []).append((i, rng))
    with tqdm(total=len(todo), desc=f"cutting photos into {out}", unit="img", disable=not progress or not todo,
              leave=False, file=sys.stderr) as bar:
        for photo, jobs in sorted(by_photo.items()):
            with Image.open(photos[photo]) as im:
                picture = im.convert("RGB")
            for i, rng in jobs:
                _cut_photo(picture, rng, size, quality, targets[i])
                bar.update()

    labels = np.full(count, -1, dtype=np.int64)
    return index_source(str(out_dir), "train", str(out_dir), ("dir", str(out)), [str(t) for t in targets],
                         labels, [], cache_dir, progress)


def _cut_photo(picture: Image.Image, rng: np.random.Generator, size, quality: int, target: pathlib.Path) -> None:
    out_w, out_h = (size[1], size[0]) if rng.random() < _PORTRAIT_P else (size[0], size[1])
    pic_w, pic_h = picture.size
    # Largest window with the output's aspect ratio, then a random fraction of its area.
    full_scale = min(pic_w / out_w, pic_h / out_h)
    scale = full_scale * np.sqrt(rng.uniform(*_PHOTO_AREA))
    crop_w, crop_h = min(pic_w, out_w * scale), min(pic_h, out_h * scale)
    left = rng.uniform(0, pic_w - crop_w)
    top = rng.uniform(0, pic_h - crop_h)
    crop = picture.resize((out_w, out_h), Image.Resampling.BICUBIC,
                          box=(left, top, left + crop_w, top + crop_h), reducing_gap=3.0)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    tmp = target.with_name(f".{target.name}.tmp")
    crop.save(tmp, format="JPEG", quality=quality)
    os.replace(tmp, target)

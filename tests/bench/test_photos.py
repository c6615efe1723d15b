"""Tests of bench/photos.py: ImageNet-like photographs cut from wallpapers, for the bench."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from bench.photos import make_photo_folder
from pipelines.data import DataError
from tests.pipelines.test_data import decoded_size

@pytest.fixture
def wallpaper_dir(tmp_path):
    """One large smooth 'photo' standing in for /usr/share/backgrounds."""
    y, x = np.mgrid[0:900, 0:1200]
    pixels = np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)
    folder = tmp_path / "wallpapers"
    folder.mkdir()
    Image.fromarray(pixels).save(folder / "big.jpg", quality=90)
    return folder


def test_make_photo_folder(tmp_path, wallpaper_dir):
    out = tmp_path / "photos"
    src = make_photo_folder(out, 6, seed=3, sources=(str(wallpaper_dir),), progress=False,
                          cache_dir=str(tmp_path / "cache"))
    assert len(src) == 6 and src.classes == [] and not src.has_labels
    assert [os.path.basename(p) for p in src.paths] == [f"photo_{i:06d}.jpg" for i in range(6)]
    assert set(zip(src.widths.tolist(), src.heights.tolist())) <= {(500, 375), (375, 500)}
    assert all(decoded_size(p) == (w, h) for p, w, h in zip(src.paths, src.widths, src.heights))

    # Complete output is kept as it is; a larger count extends it with the same first images.
    before = {p: os.stat(p).st_mtime_ns for p in src.paths}
    again = make_photo_folder(out, 8, seed=3, sources=(str(wallpaper_dir),), progress=False,
                              cache_dir=str(tmp_path / "cache"))
    assert len(again) == 8 and all(os.stat(p).st_mtime_ns == t for p, t in before.items())

    # Deterministic from the seed.
    twin = make_photo_folder(tmp_path / "twin", 6, seed=3, sources=(str(wallpaper_dir),), progress=False,
                             cache_dir=str(tmp_path / "cache"))
    assert [open(p, "rb").read() for p in twin.paths] == [open(p, "rb").read() for p in src.paths]


def test_make_photo_folder_needs_photos(tmp_path):
    with pytest.raises(DataError, match="apt-get install mate-backgrounds"):
        make_photo_folder(tmp_path / "out", 3, sources=(str(tmp_path / "none"),), progress=False,
                          cache_dir=str(tmp_path / "cache"))

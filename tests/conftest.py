"""Shared test fixtures: tiny real image data built in temporary directories."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Without a GPU, numba.cuda is Numba's CUDA simulator, so the CUDA kernels of
# pipelines/colour.py run in the tests (it must be chosen before numba loads).
if "NUMBA_ENABLE_CUDASIM" not in os.environ:
    import torch
    if not torch.cuda.is_available():
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def make_image_folder(root: Path, classes: int = 3, per_class: int = 16, size=(24, 24), seed: int = 0) -> Path:
    """An ImageFolder of small JPEGs whose classes differ in colour and texture."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        base = np.array([255 * (c == 0), 255 * (c == 1), 255 * (c == 2)], np.float64)
        for i in range(per_class):
            noise = rng.normal(0, 40, (size[1], size[0], 3))
            stripes = (np.arange(size[0]) // (2 + c) % 2)[None, :, None] * 60
            img = np.clip(base * 0.7 + noise + stripes, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def labelled_folder(tmp_path_factory) -> Path:
    """root/train and root/val ImageFolders (3 classes, 24 px)."""
    root = tmp_path_factory.mktemp("folder")
    make_image_folder(root / "train", per_class=16, seed=0)
    make_image_folder(root / "val", per_class=4, seed=1)
    return root


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's cache: indexes and materialised samples go to a temp dir."""
    monkeypatch.setenv("VIEWFORGE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it")

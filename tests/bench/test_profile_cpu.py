"""bench/profile_cpu.py on a tiny JPEG folder: every stage of each
pipeline's profile is timed and the loader covers at least the stages'
work. Nothing here depends on how fast anything runs."""
import math

import pytest

from bench import profile_cpu
from pipelines.data import open_source
from pipelines.views import BYOL_AUG_2, CropSpec, MosaicSpec, ViewSpec
from tests.conftest import make_image_folder

SPEC = ViewSpec(crops=(CropSpec("global", 2, 16, augs=(BYOL_AUG_2,)), CropSpec("local", 1, 8)),
                mosaic=MosaicSpec(crops_per_image=4, crop_size=6, jitter=2))
STAGES = {"dali": {"plan", "read", "decode", "resize", "brightness", "contrast", "saturation", "hue", "grayscale",
                   "blur", "solarize", "normalise", "op copies", "graph", "loader"},
          "ffcv": {"plan", "params", "decode", "resize", "colour", "loader"}}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp("profile") / "train", per_class=4, size=(40, 30))
    return open_source(str(root), cache_dir=str(tmp_path_factory.mktemp("cache")), progress=False)


@pytest.mark.parametrize("pipeline", sorted(profile_cpu.PROFILES))
def test_every_stage_is_timed(pipeline, source):
    pytest.importorskip("nvidia.dali" if pipeline == "dali" else "ffcv")
    got = profile_cpu.PROFILES[pipeline]("tiny", SPEC, source, 4, 2)
    assert set(got) == STAGES[pipeline]
    assert all(math.isfinite(ms) for ms in got.values())
    assert all(got[stage] > 0 for stage in ("decode", "loader"))

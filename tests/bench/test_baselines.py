"""bench/baselines.py: the stock pipelines make every view a recipe asks for,
normalised, in [B, 3, H, W] batches, from the same files as ours."""
import numpy as np
import pytest
import torch

from bench import baselines, recipes, throughput
from pipelines.data import open_source
from pipelines.views import BYOL_AUG_2, CropSpec, MosaicSpec, ViewSpec
from tests.conftest import make_image_folder

SPEC = ViewSpec(crops=(CropSpec("global", 2, 16, augs=(BYOL_AUG_2,)), CropSpec("local", 1, 8)),
                mosaic=MosaicSpec(crops_per_image=4, crop_size=6, jitter=2))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp("stock") / "train", per_class=6)
    return open_source(str(root), cache_dir=str(tmp_path_factory.mktemp("cache")), progress=False)


@pytest.mark.parametrize("name", baselines.BASELINES)
def test_stock_pipelines_make_every_view(name, source):
    if name == "stock-dali":
        pytest.importorskip("nvidia.dali")
    it, close = baselines.BUILDERS[name](SPEC, source.paths, 4, 1)
    try:
        for _ in range(3):  # past an epoch of 18 images: they go on
            batch = next(it)
            assert [tuple(v.shape) for v in batch] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] + [(4, 3, 6, 6)] * 4
            for v in batch:
                assert v.dtype == torch.float32 and torch.isfinite(v).all() and -3 < float(v.mean()) < 3
    finally:
        close()


def test_recipe_rows_name_the_best_stock_pipeline(source, tmp_path):
    args = throughput.get_args_parser().parse_args(
        ["--pipelines", "torchvision", "--recipes", "byol", "--recipe-batch", "4", "--recipe-workers", "0",
         "--recipe-epochs", "2", "--view-scale", "0.1", "--baselines", "stock-torchvision"])
    rows = recipes.run_recipes(source, args)
    assert [(r["pipeline"], r["status"]) for r in rows] == [("torchvision", "ok"), ("stock-torchvision", "ok")]
    epoch = len(source) // 4
    for r in rows:  # each window is one whole epoch
        assert len(r["windows_s"]) == 2
        assert r["samples_per_s"] == pytest.approx(4 * epoch / np.median(r["windows_s"]), rel=1e-3)
    stock = rows[1]
    assert stock["baseline"] and stock["speedup_vs_best_baseline"] == pytest.approx(1.0)
    assert rows[0]["speedup_vs_best_baseline"] == pytest.approx(rows[0]["samples_per_s"] / stock["samples_per_s"])
    with pytest.raises(SystemExit):
        recipes.resolve_baselines("stock-ffcv")


def test_recipes_skip_data_smaller_than_a_batch(source):
    args = throughput.get_args_parser().parse_args(["--pipelines", "torchvision", "--recipes", "byol",
                                                    "--recipe-batch", str(len(source) + 1), "--baselines", "none"])
    rows = recipes.run_recipes(source, args)
    assert [(r["recipe"], r["status"]) for r in rows] == [("byol", "skipped")]
    assert "less than one batch" in rows[0]["reason"]

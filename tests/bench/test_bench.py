"""Smoke tests of bench/: throughput.py end to end on a tiny configuration
(noise JPEGs in a temporary cache, torchvision + synthetic pipelines, one
method, 2-step windows) and quality.py's pieces (subsets, anchors, kNN,
table, train.py command). Nothing here depends on how fast anything runs."""
import argparse
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from bench import machine, quality, specs, throughput
from bench.data import random_subset
from bench.recipes import RECIPES
from pipelines.views import CropSpec, ViewSpec

TINY = ["--synthetic-jpegs", "--photos", "12", "--photo-size", "40x30", "--image-size", "16", "--batch-size", "4",
        "--warmup", "0", "--steps", "2", "--repeats", "2", "--workers", "0", "--device", "cpu",
        "--view-scale", "0.0625", "--recipe-batch", "4", "--recipe-workers", "0", "--recipe-epochs", "2"]
PART_KEYS = {"samples_per_s", "views_per_s", "mpix_per_s", "step_ms", "windows_s"}


class TinyMethod(nn.Module):
    """A two-view method small enough for a smoke test."""
    name = "tiny"

    @staticmethod
    def spec(cfg):
        return ViewSpec(crops=(CropSpec("global", 2, cfg.image_size),))

    def __init__(self, cfg):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.steps_ended = 0

    def forward(self, views):
        a, b = (self.backbone(x) for x in views.crops["global"])
        return (a.float() - b.float()).pow(2).mean(), {}

    def step_end(self, progress):
        assert 0 < progress <= 1
        self.steps_ended += 1


def tiny_cfg(args):
    return argparse.Namespace(arch="tiny", image_size=args.image_size, batch_size=args.batch_size, lr=0.03,
                              optimizer="sgd", weight_decay=0.0, momentum=0.9, amp=args.amp, compile=False,
                              workers=args.workers, seed=0)


@pytest.fixture
def tiny_method(monkeypatch):
    real = throughput.load_method

    def load(name, args):
        return (TinyMethod, tiny_cfg(args)) if name == "tiny" else real(name, args)
    monkeypatch.setattr(throughput, "load_method", load)


def test_throughput_end_to_end_tiny(tmp_path, tiny_method, capsys):
    out = tmp_path / "out"
    assert throughput.main(TINY + ["--pipelines", "torchvision,synthetic,nosuch", "--methods", "tiny,nosuch",
                                   "--epochs-rss", "2", "--out", str(out)]) == 0
    result = json.loads((out / "throughput.json").read_text())
    assert (out / "throughput.png").stat().st_size > 0
    env = result["environment"]
    assert {"device", "device_name", "slug", "cpu_count", "versions", "date", "command"} <= set(env)
    assert {"torch", "torchvision", "dali", "numba", "python"} <= set(env["versions"])
    assert env["slug"].startswith("cpu-") and "--methods tiny,nosuch" in env["command"]
    assert result["data"]["kind"] == "synthetic-jpegs" and result["data"]["count"] == 12
    assert "WARNING" in capsys.readouterr().err

    rows = {(r["method"], r["pipeline"]): r for r in result["rows"]}
    assert rows[(None, "nosuch")]["status"] == "skipped" and rows[("nosuch", None)]["status"] == "skipped"
    for pipe in ("torchvision", "synthetic"):
        row = rows[("tiny", pipe)]
        assert row["status"] == "ok", row["errors"]
        for part in ("pipeline_only", "model_only", "end_to_end"):
            assert PART_KEYS <= set(row[part]) and row[part]["samples_per_s"] > 0
            assert len(row[part]["windows_s"]) == 2
        assert row["views_per_sample"] == 2 and row["e2e_over_model"] > 0
    assert rows[("tiny", "torchvision")]["speedup_vs_torchvision"] == pytest.approx(1.0)

    recipes = {(r["recipe"], r["pipeline"]): r for r in result["recipes"]}
    assert set(RECIPES) == {name for name, _ in recipes}
    for name in RECIPES:  # a failing row (e.g. a planner not finished) is reported, not fatal
        assert recipes[(name, "torchvision")]["status"] in ("ok", "error")
    assert recipes[("byol", "torchvision")]["status"] == "ok"
    assert recipes[("multicrop", "torchvision")]["views_per_sample"] == 8

    rss = {r["pipeline"]: r for r in result["rss"]}
    assert rss["torchvision"]["status"] == "ok" and len(rss["torchvision"]["rss_mb"]) == 2
    assert {"growth_mb", "flat", "children_mb", "total_mb", "images", "epochs"} <= set(rss["torchvision"])


def test_throughput_sweep_writes_its_own_files(tmp_path):
    out = tmp_path / "out"
    assert throughput.main(TINY + ["--pipelines", "torchvision", "--sweep", "views", "--sweep-values", "0,2",
                                   "--out", str(out)]) == 0
    result = json.loads((out / "throughput-sweep-views.json").read_text())
    assert (out / "throughput-sweep-views.png").exists() and "rows" not in result
    points = result["sweeps"]["views"]
    assert [p["value"] for p in points] == [0, 2] and [p["views_per_sample"] for p in points] == [2, 4]
    assert all(p["status"] == "ok" and p["samples_per_s"] > 0 for p in points)


def test_throughput_bad_sweep_is_a_usage_error(tmp_path):
    assert throughput.main(TINY + ["--sweep", "colour", "--out", str(tmp_path)]) == 2


def test_spec_accounting_and_slug():
    spec = RECIPES["mosrep"]
    assert specs.describe(spec) == "2x224+mosaic4x112"
    assert specs.views_per_sample(spec) == 6
    assert specs.pixels_per_sample(spec) == 3 * 224 ** 2
    assert specs.describe(specs.with_locals(6)) == "2x224+6x96"
    assert machine.device_slug(torch.device("cpu")) == f"cpu-{machine.cpu_count()}core"


@pytest.mark.parametrize("name", ["mocov2"])
def test_throughput_model_step_of_a_registered_method(tmp_path, name):
    """load_method goes through train.py's config resolution; one real model step."""
    methods = pytest.importorskip("model.methods")
    if name not in methods.METHODS:
        pytest.skip(f"{name} is not registered yet")
    out = tmp_path / "out"
    assert throughput.main(TINY + ["--pipelines", "synthetic", "--methods", name, "--parts", "model",
                                   "--arch", "resnet18", "--repeats", "1", "--steps", "1", "--out", str(out)]) == 0
    row = json.loads((out / "throughput.json").read_text())["rows"][0]
    assert row["method"] == name and row["status"] == "ok", row
    assert row["model_only"]["samples_per_s"] > 0 and row["pipeline_only"] is None


# ----------------------------------------------------------------------------- quality.py
@pytest.fixture
def splits(labelled_folder):
    from pipelines.data import open_source
    return open_source(str(labelled_folder), "train", progress=False), \
        open_source(str(labelled_folder), "test", progress=False)


def test_subset_is_fixed_and_ordered(splits):
    train, _ = splits
    a, b = random_subset(train, 10, quality.SUBSET_SEED), random_subset(train, 10, quality.SUBSET_SEED)
    assert a.paths == b.paths and len(a) == 10 and a.paths == sorted(a.paths, key=train.paths.index)
    assert random_subset(train, 0, 0) is train and random_subset(train, 10 ** 6, 0) is train
    assert list(a.labels) == [train.labels[train.paths.index(p)] for p in a.paths]


def test_train_command_and_flag_filtering(tmp_path):
    cfg = argparse.Namespace(epochs=200, batch_size=256, warmup_epochs=1, queue_size=4096, symmetric=True, lr=0.03)
    args = quality.get_args_parser().parse_args(["--steps", "30", "--train-args", "--queue-size 64 --ema 0.99 "
                                                 "--no-symmetric", "--workers", "2"])
    args.train_size = 60000
    cmd = quality.train_command("mocov2", args, tmp_path / "run", quality.BUDGETS["cpu"], cfg)
    line = " ".join(cmd)
    assert cmd[1].endswith("train.py") and "--method mocov2 --data fashion-mnist" in line
    assert "--max-steps 30" in line and "--epochs 1" in line and "--warmup-epochs 0" in line
    assert "--knn-every 0" in line and "--batch-size 256" in line and "--lr" not in line
    assert "--queue-size 64" in line and "--no-symmetric" in line and "--ema" not in line


def test_markdown_table_lists_every_method():
    env = machine.environment(torch.device("cpu"), ["--budget", "cpu"], "bench/quality.py")
    result = {"environment": env, "total_seconds": 3725.0,
              "settings": {"data": "fashion-mnist", "budget": "cpu", "knn_k": 200, "knn_t": 0.1,
                                               "bank_text": "5,000 of 60,000", "queries_text": "5,000 of 10,000",
                                               "seed": 0, "image_size": 32},
              "rows": [{"method": "mocov2", "budget": "cpu", "max_steps": 40, "batch_size": 256, "knn_top1": 0.712,
                        "random_init_knn": 0.65, "random_init_bn_as_initialised_knn": 0.6, "raw_pixel_knn": 0.8, "train_seconds": 250.2, "eval_seconds": 31, "device": "cpu",
                        "status": "ok", "arch": "resnet18", "small_stem": True, "image_size": 32,
                        "pipeline": "dali"},
                       {"method": "mosrep", "budget": "cpu", "status": "skipped", "reason": "not registered"}]}
    table = quality.markdown(result)
    assert "| mocov2 | 40 steps x 256 | 71.2% | 65.0% | +6.2 | 60.0% | 80.0% | 4m10s | 31s | cpu |" in table
    assert "- whole run: 62m05s" in table
    assert "| mosrep |" in table and "mosrep: skipped: not registered" in table
    assert "k=200, T=0.1" in table and "python bench/quality.py --budget cpu" in table
    assert "resnet18 small stem, 32 px, pipeline dali" in table


def test_checkpoint_with_numpy_scalars_loads(tmp_path):
    path = tmp_path / "checkpoint.pth"
    torch.save({"optimizer": {"param_groups": [{"lr": np.float64(0.1)}]}, "step": 3}, path)
    assert quality.load_checkpoint(path)["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.1)


def test_quality_end_to_end_with_train_py(labelled_folder, tmp_path):
    methods = pytest.importorskip("model.methods")
    if "mocov2" not in methods.METHODS:
        pytest.skip("mocov2 is not registered yet")
    out = tmp_path / "out"
    rc = quality.main(["--data", str(labelled_folder), "--methods", "mocov2,nosuch", "--steps", "3",
                       "--batch-size", "8", "--pipeline", "torchvision", "--workers", "0", "--knn-k", "10",
                       "--curve-every", "2", "--train-args", "--queue-size 16 --image-size 16",
                       "--runs", str(tmp_path / "runs"), "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "quality-cpu.json").read_text())
    row, skipped = result["rows"]
    assert row["status"] == "ok", row
    assert row["trained_steps"] == 3 and 0 <= row["knn_top1"] <= 1
    assert row["random_init_knn"] is not None and row["raw_pixel_knn"] > 0.5
    assert skipped["status"] == "skipped"
    # the learning curve: the kept step-2 checkpoint, then the final step's figure
    assert [step for step, _ in row["curve"]] == [2, 3] and row["curve"][-1][1] == row["knn_top1"]
    assert 0 <= row["curve"][0][1] <= 1
    assert "--keep-every 2" in row["command"] and "--device cpu" in row["command"]
    table = (out / "quality-cpu.md").read_text()
    assert "| mocov2 | 3 steps x 8 |" in table and "- mocov2: 2: " in table

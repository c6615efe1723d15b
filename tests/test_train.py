"""train.py end to end on CPU: training, exact resume after a kill, DDP over
gloo, evaluation, export, and clear errors for bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import make_image_folder

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--image-size", "16", "--batch-size", "8", "--arch", "resnet18", "--small-stem", "--workers", "0",
        "--log-every", "1"]


def train(*args, env=None, timeout=600, check=True):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def losses(run_dir: Path) -> dict:
    """step -> loss, the last record of each step winning (a resumed run re-logs)."""
    out = {}
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


@pytest.mark.parametrize("method", ["mocov2", "byol", "simclr"])
def test_one_epoch_prints_knn(labelled_folder, tmp_path, method):
    extra = ["--queue-size", "32"] if method == "mocov2" else []
    proc = train("--method", method, "--pipeline", "torchvision", "--data", str(labelled_folder),
                 "--run-dir", str(tmp_path / "run"), "--epochs", "1", "--knn-k", "10", *TINY, *extra)
    assert "kNN top-1" in proc.stdout
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["step"] == 6  # 48 images // batch 8
    assert ckpt["config"]["method"] == method
    # --amp auto: the choice and its reason in the start line, config.yaml and the checkpoint
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["amp"] in ("bf16", "fp32")
    assert config["amp_reason"].startswith("auto: ") and "CPU" in config["amp_reason"]
    assert f"amp {config['amp']} ({config['amp_reason']})" in proc.stdout
    assert ckpt["config"]["amp"] == config["amp"]
    # the epoch's data wait: seconds blocked in next(loader) against whole steps
    waits = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
             if "data_wait_s" in line]
    assert len(waits) == 1 and waits[0]["steps"] == 6 and waits[0]["epoch"] == 0
    assert 0 < waits[0]["data_wait_s"] < waits[0]["step_s"]
    assert waits[0]["wait_share"] == pytest.approx(waits[0]["data_wait_s"] / waits[0]["step_s"], abs=1e-3)


def test_anchor_is_logged_once_and_survives_a_resume(labelled_folder, tmp_path):
    """The random-init anchor is measured before the first step (its record
    precedes every loss), printed once, read back on resume, and every kNN
    line and record carries it with the gain."""
    run = tmp_path / "run"
    args = ("--method", "simclr", "--pipeline", "torchvision", "--data", str(labelled_folder), "--run-dir", str(run),
            "--epochs", "2", "--knn-k", "10", *TINY)
    first = train(*args, "--stop-after", "8")  # into epoch 1 (6 steps an epoch): epoch 0's kNN is logged
    second = train(*args)
    assert first.stdout.count("random init: kNN top-1") == 1 and "random init: kNN" not in second.stdout
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    anchors = [r for r in records if "knn_random" in r and "knn_top1" not in r]
    assert len(anchors) == 1 and records.index(anchors[0]) < min(i for i, r in enumerate(records) if "loss" in r)
    anchor = anchors[0]["knn_random"]
    knn = [r for r in records if "knn_top1" in r]
    assert [r["epoch"] for r in knn] == [0, 1]
    assert all(r["knn_random"] == anchor and r["knn_gain"] == pytest.approx(r["knn_top1"] - anchor) for r in knn)
    line = next(l for l in second.stdout.splitlines() if l.startswith("epoch 1: kNN top-1"))
    assert f"(random init {anchor * 100:.2f}%, {(knn[1]['knn_top1'] - anchor) * 100:+.2f}; k=10" in line


def test_keep_every_keeps_each_nth_checkpoint(labelled_folder, tmp_path):
    run = tmp_path / "run"
    train("--method", "simclr", "--pipeline", "torchvision", "--data", str(labelled_folder), "--run-dir", str(run),
          "--max-steps", "5", "--keep-every", "2", "--knn-every", "0", *TINY)
    kept = sorted(p.name for p in run.glob("checkpoint-step*.pth"))
    assert kept == ["checkpoint-step2.pth", "checkpoint-step4.pth"]
    steps = [torch.load(run / name, weights_only=True)["step"] for name in kept]
    assert steps == [2, 4] and torch.load(run / "checkpoint.pth", weights_only=True)["step"] == 5
    final, early = (torch.load(run / name, weights_only=True)["model"] for name in ("checkpoint.pth", kept[0]))
    assert any(not torch.equal(final[k], early[k]) for k in final)  # a kept file is its own step's weights


@pytest.mark.parametrize("pipeline", ["torchvision", "ffcv"])
def test_resume_after_kill_matches_uninterrupted_run(labelled_folder, tmp_path, pipeline):
    import pipelines
    if pipeline not in pipelines.PIPELINES:
        pytest.skip(f"{pipeline} is not installed")
    common = ["--method", "mocov2", "--pipeline", pipeline, "--data", str(labelled_folder), "--epochs", "2",
              "--queue-size", "32", "--knn-every", "0", "--ckpt-every", "2", *TINY]
    train(*common, "--run-dir", str(tmp_path / "whole"))
    reference = losses(tmp_path / "whole")
    assert sorted(reference) == list(range(1, 13))

    # Kill -9 a second run once it has logged step 7 (mid second epoch).
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *common, "--run-dir", str(killed)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        log = killed / "log.jsonl"
        if log.exists() and max(losses(killed), default=0) >= 7:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = losses(killed)
    assert 7 <= max(before) < 12, "the kill should land mid-run"

    resumed = train(*common, "--run-dir", str(killed))
    assert "resumed from" in resumed.stdout
    after = losses(killed)
    assert sorted(after) == list(range(1, 13))
    for step in range(1, 13):
        assert abs(after[step] - reference[step]) <= 1e-5, (step, after[step], reference[step])


@pytest.mark.parametrize("pipeline", ["torchvision", "ffcv"])
def test_clim_resume_is_exact_with_the_neighbours_the_plan_fetched(tmp_path, pipeline):
    """CLIM's second epoch mixes neighbours that its plans fetched through the
    table made at the epoch's start; a run stopped mid-epoch and restarted
    logs the same losses (bank, table, draw counts in the checkpoint)."""
    import pipelines
    if pipeline not in pipelines.PIPELINES:
        pytest.skip(f"{pipeline} is not installed")
    data = tmp_path / "data"
    make_image_folder(data / "train", per_class=8, seed=2)   # 24 images: 3 steps of 8 an epoch
    make_image_folder(data / "val", per_class=2, seed=3)
    common = ["--method", "clim", "--pipeline", pipeline, "--data", str(data), "--epochs", "2",
              "--queue-size", "16", "--multires-sizes", "96", "--knn-every", "0", "--ckpt-every", "1", *TINY]
    train(*common, "--run-dir", str(tmp_path / "whole"), timeout=1200)
    reference = losses(tmp_path / "whole")
    assert sorted(reference) == list(range(1, 7))
    records = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    mixed = {r["step"]: r.get("mixed", 0.0) for r in records if "loss" in r}
    assert all(mixed[s] == 0 for s in range(1, 4)) and any(mixed[s] > 0 for s in range(4, 7)), mixed
    cut = tmp_path / "cut"
    train(*common, "--run-dir", str(cut), "--stop-after", "5", timeout=1200)
    assert max(losses(cut)) == 5
    resumed = train(*common, "--run-dir", str(cut), timeout=1200)
    assert "resumed from" in resumed.stdout
    after = losses(cut)
    assert sorted(after) == list(range(1, 7))
    for step in range(1, 7):
        assert abs(after[step] - reference[step]) <= 1e-5, (step, after[step], reference[step])


def test_two_gloo_processes_keep_identical_parameters(labelled_folder, tmp_path):
    run_dir = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "train.py"), "--method", "mocov2", "--pipeline", "torchvision", "--data", str(labelled_folder),
         "--run-dir", str(run_dir), "--epochs", "1", "--queue-size", "32", "--knn-every", "0", "--ckpt-every", "1",
         *TINY], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads(l) for l in (run_dir / "log.jsonl").read_text().splitlines()]
    digests = [r["replica_digests"] for r in records if "replica_digests" in r]
    assert len(digests) >= 3  # 48 images, 2 ranks x 4 per rank: 6 steps, checked at each
    for d in digests:
        assert len(d) == 2 and d[0] == d[1]
    assert digests[0] != digests[-1], "the parameters should change while training"


def test_sync_bn_on_the_cpu_is_refused_in_one_line(labelled_folder, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "train.py"), "--method", "simclr", "--pipeline", "torchvision", "--data", str(labelled_folder),
         "--run-dir", str(tmp_path / "run"), "--epochs", "1", "--knn-every", "0", "--sync-bn", *TINY],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "error: --sync-bn needs CUDA devices" in proc.stderr
    assert "SyncBatchNorm expected" not in proc.stdout + proc.stderr  # torch's own error, from a forward


def test_linear_eval_and_export(labelled_folder, tmp_path):
    run = ["--method", "simclr", "--pipeline", "torchvision", "--data", str(labelled_folder),
           "--run-dir", str(tmp_path / "run"), "--epochs", "1", "--knn-every", "0", *TINY]
    train(*run)
    proc = train(*run, "--eval", "linear", "--linear-epochs", "20")
    assert "linear probe top-1" in proc.stdout
    assert 0.0 <= json.loads((tmp_path / "run" / "eval.json").read_text())["linear_top1"] <= 1.0
    train(*run, "--export", str(tmp_path / "backbone.pth"))
    import torchvision
    net = torchvision.models.resnet18()
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = torch.nn.Identity()
    missing, unexpected = net.load_state_dict(torch.load(tmp_path / "backbone.pth", weights_only=True), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected


def test_export_of_an_rf_resnet_names_its_constructor(labelled_folder, tmp_path):
    """An RF-ResNet is not a torchvision architecture: --export says so in
    its one line and names the constructor the weights load into."""
    import model.backbones
    run = ["--method", "cossl", "--pipeline", "torchvision", "--data", str(labelled_folder),
           "--run-dir", str(tmp_path / "run"), "--epochs", "1", "--knn-every", "0", "--proj-hidden", "64",
           "--pred-hidden", "64", "--local-hidden", "64", *TINY, "--arch", "rf_resnet18"]
    train(*run)
    proc = train(*run, "--export", str(tmp_path / "backbone.pth"))
    line = next(s for s in proc.stdout.splitlines() if "backbone.pth" in s)
    assert "not a torchvision architecture" in line and "receptive field 7 px" in line  # floor(99/224 * 16)
    call = line.split("load with ", 1)[1].removesuffix(".load_state_dict(sd)")
    net = eval(call, {"model": model})
    net.load_state_dict(torch.load(tmp_path / "backbone.pth", weights_only=True))


@pytest.mark.parametrize("args, message", [
    (["--method", "nope"], "invalid choice: 'nope'"),
    (["--pipeline", "nope"], "invalid choice: 'nope'"),
    (["--data", "/nonexistent/place"], "/nonexistent/place"),
])
def test_bad_input_gets_one_clear_line_and_exit_2(tmp_path, args, message):
    proc = train(*args, "--run-dir", str(tmp_path / "r"), check=False, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_empty_source_and_unwritable_run_dir(tmp_path, labelled_folder):
    (tmp_path / "empty").mkdir()
    proc = train("--data", str(tmp_path / "empty"), "--run-dir", str(tmp_path / "r"), check=False, timeout=120)
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = train("--data", str(labelled_folder), "--run-dir", str(blocker / "run"), "--pipeline", "torchvision",
                 check=False, timeout=120)
    assert proc.returncode == 2 and "not writable" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_capability_is_named(labelled_folder, tmp_path, monkeypatch, capsys):
    """A pipeline that cannot make a method's views says which family is missing."""
    import pipelines
    import train as train_module
    from pipelines.torchvision import TorchvisionLoader

    class CropsOnly(TorchvisionLoader):
        name = "crops-only"
        capabilities = frozenset({"crops"})

    monkeypatch.setitem(pipelines.PIPELINES, "crops-only", ("tests", "CropsOnly", "torch"))
    monkeypatch.setattr(pipelines, "loader_class", lambda name: CropsOnly)
    rc = train_module.main(["--method", "byol", "--pipeline", "crops-only", "--data", str(labelled_folder),
                            "--run-dir", str(tmp_path / "r"), *TINY])
    assert rc == 2
    assert "cannot make asymmetric views" in capsys.readouterr().err


@pytest.mark.parametrize("argv, arch", [(["--method", "mocov2"], "resnet18"),
                                        (["--method", "cossl"], "rf_resnet18"),
                                        (["--method", "cossl", "--arch", "resnet50"], "resnet50")])
def test_small_profile_keeps_the_backbone_family(argv, arch):
    """configs/small.yaml shrinks ResNet-50 to ResNet-18 within its family
    (CO-SSL's RF-ResNet stays receptive-field limited) and never overrides
    the command line."""
    from configs import apply_small_profile, resolve_config
    cfg, explicit = resolve_config(argv)
    apply_small_profile(cfg, explicit, median_side=28)
    assert cfg.arch == arch and cfg.small_stem and cfg.image_size == 32
    big, explicit = resolve_config(argv)
    assert apply_small_profile(big, explicit, median_side=375) == []


@pytest.mark.parametrize("method, family", [("mocov2", "moco"), ("mosrep", "moco"), ("multicrop_mosrep", "moco"),
                                            ("byol", "byol"), ("scrl", "byol"), ("cossl", "byol"),
                                            ("simclr", "simclr")])
def test_cpu_profile_gives_every_family_its_recipe(method, family):
    """On the CPU, small images also get configs/small_cpu.yaml: the narrow
    ResNet-18 and the family's recipe (the same values for every method of
    the family); a GPU does not, and the command line still wins."""
    import yaml
    from configs import apply_small_profile, resolve_config, rules
    recipe = yaml.safe_load((ROOT / "configs" / "small_cpu.yaml").read_text())
    assert method in recipe["families"][family]
    cfg, explicit = resolve_config(["--method", method])
    changed = apply_small_profile(cfg, explicit, median_side=28, device_type="cpu")
    narrow = "rf_resnet18_quarter" if method == "cossl" else "resnet18_quarter"  # CO-SSL keeps its RF-ResNet
    assert cfg.arch == narrow and cfg.epochs == recipe["all"]["epochs"] and f"arch={narrow}" in changed
    assert all(getattr(cfg, key) == value for key, value in recipe[family].items() if hasattr(cfg, key))
    rules.check(cfg)  # every value the profile sets is within its rule
    gpu, explicit = resolve_config(["--method", method])
    apply_small_profile(gpu, explicit, median_side=28, device_type="cuda")
    assert gpu.arch == narrow.removesuffix("_quarter") and gpu.weight_decay != recipe[family]["weight_decay"]
    mine, explicit = resolve_config(["--method", method, "--lr", "0.123", "--arch", "resnet18"])
    apply_small_profile(mine, explicit, median_side=28, device_type="cpu")
    assert mine.lr == 0.123 and mine.arch == "resnet18"


def test_a_step_budget_compresses_the_warm_up():
    from model.optim import cosine_schedule, schedule_steps
    assert schedule_steps(10, 20, 1, None) == (200, 20)
    assert schedule_steps(10, 20, 1, 50) == (50, 5)      # warm-up keeps its 10% of the run
    assert schedule_steps(10, 20, 1, 500) == (200, 20)   # a budget past the epochs changes nothing
    lr = cosine_schedule(0.1, *schedule_steps(100, 20, 10, 30))
    assert len(lr) == 30 and lr.max() == pytest.approx(0.1) and lr[0] == 0 and lr[-1] < lr.max()

"""train.py when things go wrong, end to end on the CPU: SIGTERM mid-epoch
then the same command (torchvision and dali), a truncated checkpoint, a NaN
loss, a dataset changed under a run, files that go bad after indexing."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pipelines
from tests.test_train import ROOT, TINY, losses, train

PIPES = [p for p in ("torchvision", "dali") if p in pipelines.PIPELINES]


def common(data, pipeline="torchvision", *extra):
    return ["--method", "mocov2", "--pipeline", pipeline, "--data", str(data), "--queue-size", "32",
            "--knn-every", "0", *TINY, *extra]


def wait_for_step(run_dir: Path, proc, step: int, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "log.jsonl").exists() and max(losses(run_dir), default=0) >= step:
            return
        time.sleep(0.02)


@pytest.mark.parametrize("pipeline", PIPES)
def test_sigterm_mid_epoch_then_the_same_command_matches_an_uninterrupted_run(labelled_folder, tmp_path, pipeline):
    args = common(labelled_folder, pipeline, "--epochs", "3")  # 48 images, batch 8: 6 steps an epoch
    train(*args, "--run-dir", str(tmp_path / "whole"))
    reference = losses(tmp_path / "whole")
    assert sorted(reference) == list(range(1, 19))

    run = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, "--run-dir", str(run)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(run, proc, 8)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, out + err
    stopped = max(losses(run))
    assert 8 <= stopped < 18, "the signal should land mid-run"
    assert f"stopped by SIGTERM after step {stopped}; checkpoint written" in out
    ckpt = torch.load(run / "checkpoint.pth", weights_only=True)
    assert ckpt["step"] == stopped and ckpt["loader"]["step"] == stopped - 6 * ckpt["loader"]["epoch"]

    resumed = train(*args, "--run-dir", str(run))
    assert f"global step {stopped})" in resumed.stdout
    after = losses(run)
    assert sorted(after) == list(range(1, 19))
    for step in range(1, 19):
        assert abs(after[step] - reference[step]) <= 1e-5, (step, after[step], reference[step])


def test_a_truncated_checkpoint_falls_back_to_the_previous_one_and_resumes(labelled_folder, tmp_path):
    args = common(labelled_folder, "torchvision", "--epochs", "2", "--ckpt-every", "2")
    train(*args, "--run-dir", str(tmp_path / "whole"))
    reference = losses(tmp_path / "whole")
    run = tmp_path / "run"
    train(*args, "--run-dir", str(run), "--stop-after", "5")  # checkpoints at steps 2 and 4, then "killed"
    current = run / "checkpoint.pth"
    current.write_bytes(current.read_bytes()[:1000])
    proc = train(*args, "--run-dir", str(run))
    assert f"warning: {current}: unreadable, truncated or damaged" in proc.stderr
    assert (f"warning: falling back to {run / 'checkpoint.prev.pth'} (step 2); 3 steps (3 to 5) will be trained "
            "again") in proc.stderr
    after = losses(run)
    assert sorted(after) == list(range(1, 13))
    for step in range(1, 13):
        assert abs(after[step] - reference[step]) <= 1e-5, (step, after[step], reference[step])


def test_no_usable_checkpoint_stops_with_exit_2(labelled_folder, tmp_path):
    args = common(labelled_folder, "torchvision", "--max-steps", "2", "--run-dir", str(tmp_path / "run"))
    train(*args)
    (tmp_path / "run" / "checkpoint.pth").write_bytes(b"\0" * 100)
    proc = train(*args, check=False)
    assert proc.returncode == 2
    assert f"error: no usable checkpoint in {tmp_path / 'run'} (checkpoint.pth: " in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_nan_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(labelled_folder, tmp_path):
    run = tmp_path / "run"
    # A learning rate of 1e30 blows the weights up within a few steps.
    proc = train(*common(labelled_folder, "torchvision", "--epochs", "2", "--ckpt-every", "1", "--lr", "1e30",
                         "--run-dir", str(run)), check=False)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    error = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Traceback" not in proc.stderr
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    bad = min(r["step"] for r in records if "loss" in r and not torch.isfinite(torch.tensor(r["loss"])))
    good = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert bad >= 2
    assert error[0].startswith(f"error: loss is not finite (nan or inf) at step {bad}; last finite loss "
                               f"{good[bad - 1]:.6g} at step {bad - 1}; stopping without a checkpoint")
    assert torch.load(run / "checkpoint.pth", weights_only=True)["step"] == bad - 1


def test_a_changed_dataset_is_refused_on_resume(labelled_folder, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(labelled_folder, data)
    run = ["--run-dir", str(tmp_path / "run")]
    train(*common(data, "torchvision", "--max-steps", "2"), *run)
    shutil.copy(data / "train" / "class0" / "000.jpg", data / "train" / "class0" / "extra.jpg")
    proc = train(*common(data, "torchvision", "--max-steps", "4"), *run, check=False)
    assert proc.returncode == 2
    assert "1 files added, 0 removed, 0 modified since it was built" in proc.stderr
    assert f"error: {data} changed since checkpoint.pth was written (48 images then, 49 now" in proc.stderr
    assert "--data-changed ok" in proc.stderr and "Traceback" not in proc.stderr
    proc = train(*common(data, "torchvision", "--max-steps", "4"), *run, "--data-changed", "ok")
    assert "resuming anyway (--data-changed ok)" in proc.stdout
    assert max(losses(tmp_path / "run")) == 4


def spoil_after_indexing(path: Path, how: str):
    """Make `path` unreadable while its size and mtime (all the index looks at) stay."""
    st = path.stat()
    data = path.read_bytes()
    if how == "truncated":
        spoiled = data[: len(data) // 2] + b"\0" * (len(data) - len(data) // 2)
    else:
        spoiled = bytes(len(data))
    path.write_bytes(spoiled)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("pipeline", PIPES)
def test_files_spoiled_after_indexing_do_not_stop_an_epoch(labelled_folder, tmp_path, pipeline):
    data = tmp_path / "data"
    shutil.copytree(labelled_folder, data)
    run = ["--run-dir", str(tmp_path / "run")]
    train(*common(data, pipeline, "--max-steps", "1"), *run)  # the index is built and cached
    spoil_after_indexing(data / "train" / "class1" / "003.jpg", "truncated")
    spoil_after_indexing(data / "train" / "class2" / "010.jpg", "garbage")
    proc = train(*common(data, pipeline, "--epochs", "1"), *run)
    assert "warning: epoch 0: 2 unreadable images rendered as flat replacements" in proc.stdout
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["replaced"] for r in records if "replaced" in r] == [2]
    assert max(losses(tmp_path / "run")) == 6

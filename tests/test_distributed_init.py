"""train.init_distributed on a (pretend) GPU node: the device a process
takes and what init_process_group is given."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402


@pytest.mark.parametrize("local, gpus, want", [(3, 2, 1), (1, 4, 1), (0, 1, 0)])
def test_slurm_local_id_wraps_over_the_visible_gpus(monkeypatch, local, gpus, want):
    """Plain Slurm gives SLURM_LOCALID per task; with one GPU visible per
    task (or fewer GPUs than tasks) the index wraps, and NCCL is bound to it."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", str(local))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    chosen, calls = [], []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(train.dist, "init_process_group", lambda *a, **kw: calls.append((a, kw)))
    rank, world, device = train.init_distributed(None)
    assert (rank, world) == (5, 8)
    assert device == torch.device("cuda", want) and chosen == [device]
    (args, kw), = calls
    assert args[0] == "nccl" and kw["device_id"] == device and kw["rank"] == 5 and kw["world_size"] == 8

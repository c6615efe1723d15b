"""model.distributed.init_distributed on a (pretend) GPU node: the device a process
takes, what init_process_group is given, and one line for a GPU that is
asked for and missing or present and unusable; StopVote across two real
gloo processes."""
import multiprocessing
import socket
import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import distributed  # noqa: E402


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
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *a, **kw: calls.append((a, kw)))
    rank, world, device = distributed.init_distributed(None)
    assert (rank, world) == (5, 8)
    assert device == torch.device("cuda", want) and chosen == [device]
    (args, kw), = calls
    assert args[0] == "nccl" and kw["device_id"] == device and kw["rank"] == 5 and kw["world_size"] == 8


def single_process(monkeypatch, gpus: int, present: str | None = None):
    """No launcher variables; torch sees `gpus` GPUs; /proc says whether one is there."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(distributed.glob, "glob", lambda pattern: [present] if present and "gpus" in pattern else [])
    return chosen


def test_cuda_n_is_that_gpu_in_one_process(monkeypatch):
    chosen = single_process(monkeypatch, gpus=4)
    assert distributed.init_distributed("cuda:2")[2] == torch.device("cuda", 2) and chosen == [torch.device("cuda", 2)]
    assert distributed.init_distributed("cuda")[2] == torch.device("cuda", 0)
    assert distributed.init_distributed(None)[2] == torch.device("cuda", 0)


@pytest.mark.parametrize("arg, gpus, message", [
    ("cuda:4", 4, "torch sees 4 GPUs (cuda:0 to cuda:3)"),
    ("cuda", 0, "--device cuda but torch sees no GPU"),
    ("cuda:0", 0, "--device cuda:0 but torch sees no GPU"),
    ("gpu", 1, "--device gpu"),
])
def test_a_gpu_that_is_not_there_is_one_line(monkeypatch, arg, gpus, message):
    single_process(monkeypatch, gpus)
    with pytest.raises(distributed.LaunchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        distributed.init_distributed(arg)


def test_cuda_n_under_several_processes_is_refused(monkeypatch):
    single_process(monkeypatch, gpus=8)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(distributed.LaunchError, match="names one GPU, but this is one of 2 processes"):
        distributed.init_distributed("cuda:3")


def test_a_gpu_torch_cannot_see_is_not_a_silent_cpu_run(monkeypatch):
    """With no flag, a machine whose torch cannot use its GPU stops with one
    line; --device cpu, or GPUs hidden on purpose, train on the CPU."""
    single_process(monkeypatch, gpus=0, present="/proc/driver/nvidia/gpus/0000:17:00.0")
    with pytest.raises(distributed.LaunchError, match="has an NVIDIA GPU .* but torch cannot use it"):
        distributed.init_distributed(None)
    assert distributed.init_distributed("cpu")[2] == torch.device("cpu")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert distributed.init_distributed(None)[2] == torch.device("cpu")
    single_process(monkeypatch, gpus=0, present=None)
    assert distributed.init_distributed(None)[2] == torch.device("cpu")


def _vote(rank: int, port: int, signal_at: int, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    stop = types.SimpleNamespace(received=None)
    vote = distributed.StopVote(stop)
    for step in range(1, 20):
        if rank == 1 and step == signal_at:
            stop.received = "SIGTERM"
        if vote():
            out.put((rank, step))
            break
    else:
        out.put((rank, None))
    dist.destroy_process_group()


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step():
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_vote, args=(r, port, 5, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        results = dict(out.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert results == {0: 6, 1: 6}  # voted after step 5, read at step 6 on both ranks

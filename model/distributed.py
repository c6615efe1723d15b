"""One process or many: torchrun's and Slurm's variables, the device of a
rank, and the few collectives train.py's loop needs outside the model.

    rank, world, device = init_distributed(None)   # torchrun, srun, or a single process
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


class LaunchError(Exception):
    """A launch that cannot work (e.g. a Slurm job step without MASTER_ADDR)."""


def init_distributed(device_arg: str | None):
    """torchrun variables, then SLURM's, else a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
        env.setdefault("MASTER_PORT", "29500")
        if "MASTER_ADDR" not in env:
            raise LaunchError("SLURM run without MASTER_ADDR: launch through cluster/slurm.sh or set it")
    else:
        rank, world, local = 0, 1, 0
    device = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        # plain Slurm may give a task every GPU of its node, or only its own
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if world > 1:
        # device_id binds NCCL's communicator to this GPU at once (no guess on the first collective)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
    return rank, world, device


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def log(*a):
    if is_main():
        print(*a, flush=True)


def parameter_digest(model: torch.nn.Module) -> float:
    """A float64 fingerprint of all parameters (position-weighted, so swaps show)."""
    total = 0.0
    for i, p in enumerate(model.parameters()):
        flat = p.detach().double().flatten()
        total += float((flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64).remainder(7).add(1)).sum()) * (i + 1)
    return total


def stop_requested(stop) -> bool:
    """Whether a signal (a checkpoints.StopSignals) arrived here or, under DDP, on any rank (all ranks stop at the same step)."""
    if not dist.is_initialized():
        return stop.received is not None
    flag = torch.tensor([stop.received is not None], dtype=torch.int32,
                        device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def summed_over_ranks(count: int, device) -> int:
    if not dist.is_initialized():
        return count
    total = torch.tensor([count], dtype=torch.int64, device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(total)
    return int(total.item())

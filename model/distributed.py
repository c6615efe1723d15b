"""One process or many: torchrun's and Slurm's variables, the device of a
rank, and the few collectives train.py's loop needs outside the model.

    rank, world, device = init_distributed(None)   # torchrun, srun, or a single process
"""
from __future__ import annotations

import datetime
import glob
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
    device = choose_device(device_arg, local, world)
    if world > 1:
        # device_id binds NCCL's communicator to this GPU at once (no guess on the first collective)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
    return rank, world, device


def choose_device(device_arg: str | None, local: int, world: int) -> torch.device:
    """The device of this process: --device as given (cuda:N in a single
    process), else the local rank's GPU, else the CPU. A GPU that is asked
    for and missing, or present and unusable without --device cpu, is a
    LaunchError: one line, never a silent run on the CPU."""
    if device_arg is None and not torch.cuda.is_available():
        unseen = gpu_present_but_unseen()
        if unseen:
            raise LaunchError(f"{unseen}; fix the install, or pass --device cpu to train on the CPU")
        return torch.device("cpu")
    try:
        device = torch.device(device_arg or "cuda")
    except RuntimeError as e:
        raise LaunchError(f"--device {device_arg}: {e}") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise LaunchError(f"--device {device_arg} but torch sees no GPU ({cuda_build()}, "
                          f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                          f"pass --device cpu to train on the CPU")
    count = torch.cuda.device_count()
    if device.index is not None:
        if world > 1:
            raise LaunchError(f"--device {device_arg} names one GPU, but this is one of {world} processes, each "
                              f"taking its local rank's GPU; pass --device cuda (or set CUDA_VISIBLE_DEVICES)")
        if device.index >= count:
            raise LaunchError(f"--device {device_arg}: torch sees {count} GPU{'s' if count > 1 else ''} "
                              f"(cuda:0 to cuda:{count - 1})")
    else:  # plain Slurm may give a task every GPU of its node, or only its own
        device = torch.device("cuda", local % count)
    torch.cuda.set_device(device)
    return device


def cuda_build() -> str:
    return f"torch {torch.__version__} built for CUDA {torch.version.cuda}" if torch.version.cuda else \
        f"torch {torch.__version__} is a CPU-only build"


def gpu_present_but_unseen() -> str:
    """Why this machine's NVIDIA GPU is unusable to torch, or '' when there is
    none (or it was hidden on purpose with an empty CUDA_VISIBLE_DEVICES)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return ""
    present = sorted(glob.glob("/proc/driver/nvidia/gpus/*")) or sorted(glob.glob("/dev/nvidia[0-9]*"))
    if not present:
        return ""
    return (f"this machine has an NVIDIA GPU ({present[0]}) but torch cannot use it ({cuda_build()}; "
            f"torch.cuda.is_available() is False: a driver older than that CUDA, or no access to the device)")


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


class StopVote:
    """Whether a stop signal (a checkpoints.StopSignals) has arrived, agreed
    by every rank at the same step. Under DDP each step's vote is an
    asynchronous all-reduce over a CPU (gloo) group, read one step later,
    when it has long finished: no rank waits for the GPU or for the others
    to decide, and all stop after the same step, one step after the signal.
    A single process reads its own signal at once."""

    def __init__(self, stop):
        self.stop, self.pending, self.group = stop, None, None
        if dist.is_initialized():  # every rank makes it, at the same point of the run
            self.group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

    def __call__(self) -> bool:
        mine = self.stop.received is not None
        if not dist.is_initialized():
            return mine
        if self.pending is not None:
            work, flag = self.pending
            work.wait()
            self.pending = None
            if flag.item():  # a CPU tensor: no device sync
                return True
        flag = torch.tensor([int(mine)], dtype=torch.int32)
        self.pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        return False


def summed_over_ranks(count: int, device) -> int:
    if not dist.is_initialized():
        return count
    total = torch.tensor([count], dtype=torch.int64, device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(total)
    return int(total.item())

"""Pieces every method shares: momentum encoders, the negative queue, the
losses, RoI features and the distributed gathers behind them. Written once.

Losses run in float32 with autocast off, whatever the AMP setting: logits at
T = 0.1 in bf16 lose the digits the softmax needs. In a process group every
gather assumes the same local batch size on every rank (the planner's shards).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from pipelines.base import upload


# ----------------------------------------------------------------------------- the method interface
class Method(nn.Module):
    """What the loop calls on every method (model/methods/__init__.py lists
    the whole interface). The defaults do nothing, so a method overrides
    only the hooks it has work for, and the loop never asks which method
    it runs (MoCo's builder: the method owns its extra work)."""

    def epoch_start(self, epoch: int, loader) -> None:
        """Before the first step of `epoch` (also of a resumed epoch), with the
        epoch's loader: e.g. the neighbour table its plans fetch (CLIM)."""

    def step_end(self, progress: float) -> None:
        """After each optimizer step; `progress` in (0, 1]: momentum schedules."""


# ----------------------------------------------------------------------------- distributed
def world_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """[n, ...] on each rank -> [world*n, ...] in rank order, without gradient;
    x itself (detached) outside a process group."""
    _, world = world_info()
    if world == 1:
        return x.detach()
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each rank the sum over ranks of the
    gradients of its rows (SimCLR's cross-replica concat)."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        rank, world = world_info()
        n = grad.shape[0] // world
        return grad[rank * n:(rank + 1) * n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """concat_all_gather that keeps the graph: with DDP averaging, the gradient
    equals that of one process holding the whole global batch."""
    return _GatherWithGrad.apply(x) if world_info()[1] > 1 else x


@torch.no_grad()
def batch_shuffle(x: torch.Tensor, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo's cross-rank shuffle (He et al. 2020, Sec. 3.3): rank r takes rows
    perm[r*n:(r+1)*n] of the global batch; perm [world*n] must be the same on
    every rank. Returns (this rank's shuffled rows, the inverse permutation)."""
    rank, _ = world_info()
    n = x.shape[0]
    out = concat_all_gather(x)[perm[rank * n:(rank + 1) * n]]
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out, torch.argsort(perm)


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    """Undo batch_shuffle on the encoder outputs."""
    rank, _ = world_info()
    n = x.shape[0]
    return concat_all_gather(x)[idx_unshuffle[rank * n:(rank + 1) * n]]


class ShuffleBN(nn.Module):
    """MoCo's shuffling BN for the key encoder (He et al. 2020, Sec. 3.3): the
    key encoder's BN statistics must not come from the same samples as the
    query's, or the positive key leaks through them.

    Under DDP the global batch is shuffled across ranks, as the official
    builder.py (each rank's BN sees a random slice). In one process (one GPU,
    the CPU) that would change nothing, so the 8-GPU setting is emulated, as
    the official one-GPU demo's SplitBatchNorm: the batch is shuffled, the
    key encoder runs on `splits` sub-batches (each BN sees only its
    sub-batch; fewer sub-batches where the batch would leave one under 2
    samples), and the keys are put back in batch order. splits=1 is the
    plain key encoder on the whole batch; enabled=False disables both forms.

    The permutations come from (seed, draw count), not the global RNG; the
    count is in the state_dict (extra state), so a resumed run draws the
    same permutations as an uninterrupted one, and every rank the same.
    """

    def __init__(self, enabled: bool = True, splits: int = 8, seed: int = 0):
        super().__init__()
        if splits < 1:
            raise ValueError(f"bn_splits must be at least 1, got {splits}")
        self.enabled, self.splits, self.seed, self.draws = bool(enabled), int(splits), int(seed), 0

    def get_extra_state(self):
        return {"draws": self.draws}

    def set_extra_state(self, state) -> None:
        self.draws = int(state["draws"])

    @torch.compiler.disable  # host-side bookkeeping: the draw count must not become a guard of a compiled graph
    def permutation(self, n: int, device) -> torch.Tensor:
        """The next permutation of n rows (on the CPU, then moved: small)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.draws)
        self.draws += 1
        return upload(torch.randperm(n, generator=g).numpy(), device)

    @torch.no_grad()
    def forward(self, encode, x: torch.Tensor) -> torch.Tensor:
        """encode(x [B, ...]) -> [B, D]; shuffled as above."""
        _, world = world_info()
        if not self.enabled or (world == 1 and self.splits == 1):
            return encode(x)
        perm = self.permutation(x.shape[0] * world, x.device)
        if world > 1:
            x_shuffled, undo = batch_shuffle(x, perm)
            return batch_unshuffle(encode(x_shuffled), undo)
        x_shuffled = x[perm]
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            x_shuffled = x_shuffled.contiguous(memory_format=torch.channels_last)
        # as 8 GPUs of 32 at batch 256; at least 2 samples a sub-batch (BN needs 2 values per channel)
        subs = x_shuffled.tensor_split(max(1, min(self.splits, x.shape[0] // 2)))
        return torch.cat([encode(s) for s in subs])[torch.argsort(perm)]


@torch.no_grad()
def momentum_key(backbone: nn.Module, projector: nn.Module, x: torch.Tensor, shuffle: ShuffleBN,
                 output: int = 1) -> torch.Tensor:
    """MoCo's key: the momentum encoder on x under shuffling BN (ShuffleBN),
    L2-normalised in float32. `output` picks the backbone's feature map (0)
    or pooled vector (1)."""
    k = shuffle(lambda v: projector(backbone(v)[output]), x)
    return F.normalize(k.float(), dim=1)  # B x dim


# ----------------------------------------------------------------------------- momentum encoder
def copy_as_target(module: nn.Module) -> nn.Module:
    """A deep copy updated only by ema_update (requires_grad False)."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, m: float) -> None:
    """target <- m * target + (1 - m) * online for parameters; buffers (BN
    running statistics) are copied. One fused foreach kernel per dtype."""
    tp, op = list(target.parameters()), list(online.parameters())
    if len(tp) != len(op):
        raise ValueError(f"target has {len(tp)} parameters, online {len(op)}: not a copy")
    if tp:
        torch._foreach_lerp_(tp, op, 1.0 - float(m))
    tb, ob = list(target.buffers()), list(online.buffers())
    if tb:
        torch._foreach_copy_(tb, ob)


def cosine_momentum(base_m: float, progress: float) -> float:
    """BYOL's target decay (Grill et al. 2020, Sec. 3.2):
    tau = 1 - (1 - tau_base) * (cos(pi * k / K) + 1) / 2, from tau_base to 1."""
    p = min(max(float(progress), 0.0), 1.0)
    return 1.0 - (1.0 - base_m) * (math.cos(math.pi * p) + 1.0) / 2.0


# ----------------------------------------------------------------------------- queue
class Queue(nn.Module):
    """First-in first-out memory of `size` keys (MoCo, He et al. 2020, Sec. 3.2).

    keys: [size, dim] buffer, random unit vectors at first; ptr: next slot.
    enqueue() gathers the keys of all ranks first, so every rank holds the
    same queue; callers give L2-normalised keys.
    """

    def __init__(self, dim: int, size: int):
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be positive, got {size}")
        self.size = size
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        keys = concat_all_gather(keys).to(self.keys.dtype)  # world*n x dim
        if keys.shape[0] > self.size:
            keys = keys[-self.size:]
        n = keys.shape[0]
        idx = (self.ptr + torch.arange(n, device=keys.device)) % self.size  # wraps around; no host sync
        self.keys.index_copy_(0, idx, keys)
        self.ptr.copy_((self.ptr + n) % self.size)


# ----------------------------------------------------------------------------- losses
def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None = None,
             temperature: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo's contrastive loss; q, k: [N, D], the positive of q[i] is k[i].

    With a queue [K, D] (MoCo v1/v2): logits [q.k | q.queue] of shape
    N x (1+K), the positive in column 0, the queue the only negatives.
    Without (MoCo v3): logits q.k_all^T against the keys of the global batch
    (gathered from all ranks), positives on the diagonal.
    q and k are L2-normalised here; k is a key and gets no gradient. The
    queue is read as a snapshot, so the caller may enqueue before backward.
    Returns (loss, top-1 accuracy of the positive).
    """
    with torch.autocast(q.device.type, enabled=False):
        q = F.normalize(q.float(), dim=1)
        k = F.normalize(k.detach().float(), dim=1)
        n = q.shape[0]
        if queue is not None:
            l_pos = (q * k).sum(dim=1, keepdim=True)                  # N x 1
            l_neg = q @ queue.detach().float().clone().T              # N x K
            logits = torch.cat([l_pos, l_neg], dim=1) / temperature   # N x (1+K)
            labels = torch.zeros(n, dtype=torch.long, device=q.device)
        else:
            rank, _ = world_info()
            logits = q @ concat_all_gather(k).T / temperature         # N x world*N
            labels = torch.arange(n, device=q.device) + rank * n
        loss = F.cross_entropy(logits, labels)
        acc = (logits.detach().argmax(dim=1) == labels).float().mean()
    return loss, acc


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, return_acc: bool = False):
    """SimCLR's NT-Xent (Chen et al. 2020, Eq. 1); z1[i], z2[i] are two views
    of image i. Each of the 2N rows of the global batch has one positive and
    2N-2 negatives (every other embedding but itself). Across ranks the
    embeddings are gathered with gradient, so the DDP gradient is that of the
    whole global batch in one process. Returns the loss (and the top-1
    accuracy of the positive if return_acc)."""
    with torch.autocast(z1.device.type, enabled=False):
        z = F.normalize(torch.cat([z1, z2]).float(), dim=1)    # 2n x D, this rank
        n2 = z.shape[0]
        n = n2 // 2
        rank, _ = world_info()
        offset = rank * n2                                     # where this rank's rows sit in z_all
        z_all = gather_with_grad(z)                            # 2n*world x D
        logits = z @ z_all.T / temperature                     # 2n x 2n*world
        rows = torch.arange(n2, device=z.device)
        self_mask = torch.zeros_like(logits, dtype=torch.bool)
        self_mask[rows, rows + offset] = True
        logits = logits.masked_fill(self_mask, float("-inf"))
        labels = (rows + n) % n2 + offset                      # view 1 <-> view 2
        loss = F.cross_entropy(logits, labels)
        if not return_acc:
            return loss
        acc = (logits.detach().argmax(dim=1) == labels).float().mean()
    return loss, acc


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's regression loss (Grill et al. 2020, Eq. 2): 2 - 2 cos(p, z),
    averaged over the batch; z is the target and gets no gradient."""
    with torch.autocast(p.device.type, enabled=False):
        cos = F.cosine_similarity(p.float(), z.detach().float(), dim=1)
        return (2 - 2 * cos).mean()


# ----------------------------------------------------------------------------- RoI features
def roi_features(fmap: torch.Tensor, rois: torch.Tensor, output_size, stride: int,
                 sampling_ratio: int = -1, aligned: bool = True) -> torch.Tensor:
    """RoIAlign on a backbone feature map: fmap [B, C, h, w] at `stride`
    pixels per cell, rois [K, 5] (batch index, x0, y0, x1, y1) in input
    pixels -> [K, C, out, out]."""
    from torchvision.ops import roi_align  # torchvision's import is slow; only RoI methods need it
    # float32 outside autocast: torchvision 0.29's CPU roi_align backward on a
    # bf16 map under autocast corrupts the heap ("double free or corruption",
    # seen with SCRL's 1 x 1 boxes on 2 threads); the map is small, the cast cheap.
    with torch.autocast(fmap.device.type, enabled=False):
        return roi_align(fmap.float(), rois.float(), output_size, spatial_scale=1.0 / stride,
                         sampling_ratio=sampling_ratio, aligned=aligned)


def info_nce_indexed(q: torch.Tensor, k: torch.Tensor, target: torch.Tensor, queue: torch.Tensor | None = None,
                     temperature: float = 0.2, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE where the positive of q[i] is k[target[i]] (MosRep's mosaic
    loss, official moco/builder.py MosRep.forward); q: [N, D] queries, k:
    [B, D] this rank's keys, target: [N] indices into k.

    Logits are q against every key of the global batch (gathered from all
    ranks, rank order) and then the queue: N x (world*B + K); the other
    keys of the batch are negatives too. weight [N] scales each row's
    cross-entropy before the mean (the official mosaic loss multiplies by
    sqrt(visible fraction)). q and k are L2-normalised here; k gets no
    gradient. Returns (loss, top-1 accuracy of the positive).
    """
    with torch.autocast(q.device.type, enabled=False):
        q = F.normalize(q.float(), dim=1)
        k = F.normalize(k.detach().float(), dim=1)
        rank, _ = world_info()
        logits = q @ concat_all_gather(k).T                            # N x world*B
        if queue is not None:
            logits = torch.cat([logits, q @ queue.detach().float().clone().T], dim=1)  # N x (world*B + K)
        logits = logits / temperature
        labels = target.long() + rank * k.shape[0]
        loss = F.cross_entropy(logits, labels, reduction="none")
        loss = (loss * weight.float() if weight is not None else loss).mean()
        acc = (logits.detach().argmax(dim=1) == labels).float().mean()
    return loss, acc

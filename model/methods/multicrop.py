"""MoCo v2 with multi-crop (Caron et al. 2020, SwAV, Sec. 3.2 "Multi-crop"),
and, as `multicrop_mosrep`, the MoCo v2 + multi-crop baseline of MosRep
(Wang et al. 2023; MosRep README: 69.8% top-1 at 200 epochs, against 72.3%
for MosRep).

Views: 2 global crops and N local crops, all with MoCo v2's augmentation.
Only the global views go through the key encoder; every view is a query,
scored against the key of a global view of its own image:

    symmetric (multicrop's default, SwAV's "both directions"):
        global view 1 -> key 0, global view 0 -> key 1, every local view -> key 0 and key 1
    one direction (symmetric=false; MoCo v2's and MosRep's):
        global view 0 -> key 1, every local view -> key 1 (view 1 is the key view)

Each (query, key) pair is an InfoNCE against the queue at T = 0.2; the
keys that scored queries enter the queue (both global keys when symmetric).
queue_size=0 makes the keys of the global batch the negatives instead (MoCo
v3's form). Directions are averaged (as mocov2 --symmetric). Within a
direction, local_reduction says how the terms add up:

    pairs: the mean over all (1 + N) B (query, key) pairs, each pair counting
           once, as SwAV and DINO average their loss over pairs;
    added: the two-view loss plus the mean over the N B local pairs, as
           MosRep adds its single-view and small-crop losses (official
           pretrain_ddp.py: loss = loss_single + loss_mosaic).

multicrop (configs/multicrop.yaml): SwAV's 2 x 224 (scale 0.14-1) + 6 x 96
(0.05-0.14), symmetric, pairs. multicrop_mosrep (configs/multicrop_mosrep.yaml,
every number from MosRep's code): 2 x 224 (0.2-1) + 4 x 112 (0.1-0.6), one
direction, added. MosRep's repository has no code for this baseline (its
MoCo class takes two views); the yaml says which of MosRep's own settings
stand in. The negatives stay MoCo v2's, the queue alone (builder.py MoCo);
MosRep's own loss also counts the other keys of the batch (builder.py
MosRep.forward). local_size is in pixels at a global size of 224 and scales
with image_size (96 -> 14 px, 112 -> 16 px at 32). Everything else is MoCo
v2 (mocov2.py).

cfg keys: arch, small_stem, image_size, crop_min_scale, local_crops,
local_size, local_scale, symmetric, local_reduction, temperature,
queue_size, proj_dim, proj_hidden, ema, shuffle_bn, bn_splits,
zero_init_residual.

    python train.py --method multicrop --data /data/imagenet          # SwAV's 2 x 224 + 6 x 96, both directions
    python train.py --method multicrop_mosrep --data /data/imagenet   # MosRep's baseline: 2 x 224 + 4 x 112, one direction
"""
from __future__ import annotations

import torch

from pipelines.views import MOCOV2_AUG, CropSpec, ViewSpec, Views

from ..common import info_nce, info_nce_indexed
from .mocov2 import MoCoV2

LOCAL_REDUCTIONS = ("pairs", "added")


def local_size(image_size: int, local_at_224: int = 96) -> int:
    """Side of a local crop for global crops of `image_size` px (SwAV: 96 at 224)."""
    return max(1, round(image_size * local_at_224 / 224))


def pair_with_keys(q_other: torch.Tensor, q_local: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The queries scored against one global view's keys [B, D]: the other
    global view's q_other [B, D] and the N local views' q_local [N*B, D]
    (view-major: row j*B + b is local view j of image b). Returns (queries
    [(1+N)B, D], target [(1+N)B]); the positive of row r is key target[r] =
    r % B, the key of its own image."""
    q = torch.cat([q_other, q_local])
    return q, torch.arange(batch, device=q.device).repeat(q.shape[0] // batch)


class MultiCrop(MoCoV2):
    """MoCo v2's encoders, queue and momentum step; multi-crop views and loss."""
    name = "multicrop"

    @staticmethod
    def spec(cfg) -> ViewSpec:
        glob = CropSpec("global", 2, cfg.image_size, scale=(cfg.crop_min_scale, 1.0), augs=(MOCOV2_AUG,))
        if cfg.local_crops < 1:
            return ViewSpec(crops=(glob,))
        local = CropSpec("local", cfg.local_crops, local_size(cfg.image_size, cfg.local_size),
                         scale=tuple(cfg.local_scale), augs=(MOCOV2_AUG,))
        return ViewSpec(crops=(glob, local))

    def __init__(self, cfg):
        super().__init__(cfg)
        self.symmetric = bool(getattr(cfg, "symmetric", True))
        self.local_reduction = getattr(cfg, "local_reduction", "pairs")
        if self.local_reduction not in LOCAL_REDUCTIONS:
            raise ValueError(f"{self.name}: unknown local_reduction {self.local_reduction!r}; "
                             f"choose from {', '.join(LOCAL_REDUCTIONS)}")

    def _info_nce(self, q: torch.Tensor, keys: torch.Tensor, target: torch.Tensor, negatives):
        """InfoNCE of queries q [N, D] whose positive is keys[target] [N]."""
        if negatives is not None:  # MoCo v2: the positive, then the queue
            return info_nce(q, keys[target], negatives, self.temperature)
        return info_nce_indexed(q, keys, target, None, self.temperature)  # the keys of the global batch

    def forward(self, views: Views) -> tuple[torch.Tensor, dict]:
        x = views.crops["global"]  # 2 x B x C x H x W, each view channels_last
        batch = x.shape[1]
        directions = ((1, 0), (0, 1)) if self.symmetric else ((0, 1),)  # (query view, key view)
        q_global = {i: self._query(x[i]) for i in sorted({i for i, _ in directions})}  # B x D each
        keys = {j: self._key(x[j]) for j in sorted({j for _, j in directions})}
        local = views.crops.get("local")  # N x B x C x h x w
        if local is not None:
            # all local views in one pass (one resolution, as SwAV groups crops by size)
            q_local = self._query(local.flatten(0, 1).contiguous(memory_format=torch.channels_last))  # N*B x D
        else:
            first = q_global[directions[0][0]]
            q_local = first.new_zeros(0, first.shape[1])
        negatives = self.queue.keys if self.queue is not None else None
        own = torch.arange(batch, device=x.device)
        loss = acc = 0.0
        metrics = {}
        for i, j in directions:
            if self.local_reduction == "pairs":  # rows weigh equally: every (query, key) pair counts once
                q, target = pair_with_keys(q_global[i], q_local, batch)
                loss_d, acc_d = self._info_nce(q, keys[j], target, negatives)
            else:  # MosRep: two-view loss + mean local loss
                loss_d, acc_d = self._info_nce(q_global[i], keys[j], own, negatives)
                if q_local.shape[0]:
                    loss_local, acc_local = self._info_nce(q_local, keys[j], own.repeat(q_local.shape[0] // batch),
                                                           negatives)
                    loss_d = loss_d + loss_local
                    metrics["acc_local"] = metrics.get("acc_local", 0.0) + acc_local.detach() / len(directions)
            loss, acc = loss + loss_d / len(directions), acc + acc_d / len(directions)
        if self.queue is not None and self.training:
            self.queue.enqueue(torch.cat([keys[j] for j in (1, 0) if j in keys]))  # the losses read a snapshot
        return loss, {"acc": acc.detach(), **metrics}


class MultiCropMosRep(MultiCrop):
    """MosRep's MoCo v2 + multi-crop baseline: MultiCrop with the views, the
    direction and the loss sum of configs/multicrop_mosrep.yaml."""
    name = "multicrop_mosrep"

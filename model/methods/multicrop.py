"""MoCo v2 with multi-crop (Caron et al. 2020, SwAV, Sec. 3.2 "Multi-crop"):
the baseline MosRep is measured against (MosRep README: MoCo v2 with
2 x 224 + 4 x 112 views).

Views: 2 global crops (224 px, scale 0.14-1) and N local crops (96 px,
scale 0.05-0.14), SwAV's multi-crop, all with MoCo v2's augmentation. Only
the global views go through the key encoder; every view is a query. Each
query is scored against the key of every *other* view of its own image:

    global view 0 -> key 1,  global view 1 -> key 0   (MoCo v2, symmetric)
    local view j  -> key 0 and key 1                 (both global keys)

and the loss is the mean over these 2 + 2N (query, key) pairs, each an
InfoNCE against the queue at T = 0.2 (SwAV and DINO average their loss over
all pairs the same way). Both global keys enter the queue, as in our
symmetric MoCo v2; queue_size=0 makes the keys of the global batch the
negatives instead (MoCo v3's form). local_size is in pixels at a global
size of 224 and scales with image_size (96 -> 14 px at 32). Everything
else is MoCo v2 (mocov2.py).

cfg keys: arch, small_stem, image_size, crop_min_scale, local_crops,
local_size, local_scale, temperature, queue_size, proj_dim, proj_hidden, ema,
shuffle_bn, bn_splits, zero_init_residual.

    python train.py --method multicrop --data /data/imagenet    # SwAV's 2 x 224 + 6 x 96
    python train.py --method multicrop --local-crops 4 --local-size 112 --local-scale 0.1 0.6  # MosRep README's
"""
from __future__ import annotations

import torch

from pipelines.views import MOCOV2_AUG, CropSpec, ViewSpec, Views

from ..common import info_nce, info_nce_indexed
from .mocov2 import MoCoV2


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

    def forward(self, views: Views) -> tuple[torch.Tensor, dict]:
        x1, x2 = views.crops["global"]  # each B x C x H x W, channels_last
        q_global = (self._query(x1), self._query(x2))
        keys = (self._key(x1), self._key(x2))
        local = views.crops.get("local")  # N x B x C x h x w
        if local is not None:
            # all local views in one pass (one resolution, as SwAV groups crops by size)
            q_local = self._query(local.flatten(0, 1).contiguous(memory_format=torch.channels_last))  # N*B x D
        else:
            q_local = q_global[0].new_zeros(0, q_global[0].shape[1])
        negatives = self.queue.keys if self.queue is not None else None
        loss = acc = 0.0
        for i, k in enumerate(keys):
            q, target = pair_with_keys(q_global[1 - i], q_local, k.shape[0])
            # rows weigh equally: every (query, key) pair counts once in the mean
            if negatives is not None:  # MoCo v2: the positive, then the queue
                loss_i, acc_i = info_nce(q, k[target], negatives, self.temperature)
            else:  # no queue: the keys of the global batch are the negatives
                loss_i, acc_i = info_nce_indexed(q, k, target, None, self.temperature)
            loss, acc = loss + loss_i / 2, acc + acc_i / 2
        if self.queue is not None and self.training:
            self.queue.enqueue(torch.cat([keys[1], keys[0]]))  # info_nce read a snapshot of the queue
        return loss, {"acc": acc.detach()}

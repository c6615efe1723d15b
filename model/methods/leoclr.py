"""LeOCLR (Alkhalefi, Leontidis, Zhong 2024, "LeOCLR: Leveraging Original
Images for Contrastive Learning of Visual Representations", TMLR; no public
code).

Three views of each image (Algorithm 1): X, the whole, uncropped image
resized to the view size, and two random-resized crops X1, X2; all three
get MoCo v2's augmentation. X goes through the query encoder only, X1 and
X2 through the momentum (key) encoder only, and

    loss = l(X, X1) + l(X, X2)        (l: MoCo v2's InfoNCE)

with stop-gradient on the keys: the crops are both pulled towards
the whole image and never towards each other, so two crops holding
different parts of an object are not forced together. Everything else is
MoCo v2 (mocov2.py): MLP head without BN, m = 0.999, T = 0.2, a queue of
65536 keys into which both crops' keys go.

end_to_end=true is the paper's end-to-end ablation: no momentum encoder;
X, X1 and X2 all go through the one online encoder with gradient, and each
pair is SimCLR's NT-Xent over the batch (nt_xent(X, X1) + nt_xent(X, X2)).

cfg keys: arch, small_stem, image_size, crop_min_scale, temperature,
queue_size, proj_dim, proj_hidden, ema, shuffle_bn, bn_splits, end_to_end.

    python train.py --method leoclr --data /data/imagenet                # the paper's method
    python train.py --method leoclr --end-to-end --data /data/imagenet   # the end-to-end ablation
"""
from __future__ import annotations

import torch

from pipelines.views import MOCOV2_AUG, CropSpec, OriginalSpec, ViewSpec, Views

from ..common import info_nce, nt_xent
from .mocov2 import MoCoV2


class LeOCLR(MoCoV2):
    """MoCo v2's encoders, queue and momentum step (mocov2.py); its own views and loss."""
    name = "leoclr"

    @staticmethod
    def spec(cfg) -> ViewSpec:
        # Algorithm 1: X1, X2 = RandomResizedCrop(224) of X; X, X1, X2 all augmented (MoCo v2 recipe)
        crops = CropSpec("global", 2, cfg.image_size, scale=(cfg.crop_min_scale, 1.0), augs=(MOCOV2_AUG,))
        return ViewSpec(crops=(crops,), original=OriginalSpec(cfg.image_size, aug=MOCOV2_AUG))

    def __init__(self, cfg):
        end_to_end = bool(cfg.end_to_end)  # the ablation has one encoder: no momentum copy, no queue
        super().__init__(cfg, key_encoder=not end_to_end)
        self.end_to_end = end_to_end

    def forward(self, views: Views) -> tuple[torch.Tensor, dict]:
        x = views.original                # B x C x H x W, the whole image
        x1, x2 = views.crops["global"]  # each B x C x H x W, channels_last
        q = self._query(x)
        if self.end_to_end:  # one encoder, gradients through all three views, in-batch negatives
            loss1, acc1 = nt_xent(q, self._query(x1), self.temperature, return_acc=True)
            loss2, acc2 = nt_xent(q, self._query(x2), self.temperature, return_acc=True)
        else:
            negatives = self.queue.keys if self.queue is not None else None
            k1, k2 = self._key(x1), self._key(x2)
            loss1, acc1 = info_nce(q, k1, negatives, self.temperature)
            loss2, acc2 = info_nce(q, k2, negatives, self.temperature)
            if self.queue is not None and self.training:
                self.queue.enqueue(torch.cat([k1, k2]))  # info_nce read a snapshot of the queue
        return loss1 + loss2, {"acc": ((acc1 + acc2) / 2).detach()}

    @torch.no_grad()
    def step_end(self, progress: float) -> None:
        if not self.end_to_end:
            super().step_end(progress)

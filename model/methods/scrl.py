"""SCRL (Roh, Shin, Kim, Kim 2021, "Spatially Consistent Representation
Learning", CVPR; official code kakaobrain/scrl).

    python train.py --method scrl --data /data/imagenet

BYOL's networks (online backbone, projector, predictor; EMA target of
backbone and projector) applied to matched boxes instead of whole views.
The planner samples up to K = 10 boxes per image in the intersection of the
two views (grid-based, side >= min_size, IoU <= 0.5 with the boxes kept
before) and maps each into both views' pixels, flips included
(pipelines/plan.py `_pairs`). Each box is RoIAligned 1 x 1 on the last
feature map (stride = backbone.stride), projected, and the online
prediction of a box in one view regresses the target projection of the same
box in the other: 2 - 2 cos, averaged over boxes, summed over both
directions (official trainer/base.py `_criterion`).

As the official trainer (trainer/trainer.py `_forward`: `scrl_loss` when
scrl.enabled, else `byol_loss`), there is NO global BYOL term: the box loss
is the whole objective. `global_weight` > 0 adds BYOL's image loss on
pooled features (ours, off by default).

Box rules as the official box_generator.py by default: the frame's side is
round() of the scaled intersection and must exceed min_size, and a box that
fails the IoU bound 50 times keeps its last draw. box_round_frame=false
(floor, side >= min_size: every box inside both windows exactly) and
box_keep_last=false (drop it: the IoU bound always holds) are ours.

Official details kept: both views in one backbone pass (BN over 2B images),
RoIAlign with aligned=False and sampling_ratio=-1 (scrl.detectron_aligned
False), cosine EMA from the base momentum to 1 (trainer/base.py
`_decay_ema_momentum`). A step with fewer than 2 boxes (BatchNorm needs 2)
gives loss 0 through every online parameter, so DDP sees each one used.

cfg keys: arch, small_stem, image_size, crop_min_scale, boxes_per_image,
box_min_size, box_max_iou, box_tries, box_keep_last, box_round_frame,
proj_hidden, proj_dim, pred_hidden, ema, global_weight.
"""
from __future__ import annotations

import torch

from pipelines.views import BYOL_AUG_1, BYOL_AUG_2, CropSpec, PairSpec, ViewSpec, Views

from ..common import byol_loss, roi_features
from .byol import BYOL


class SCRL(BYOL):
    name = "scrl"

    @staticmethod
    def spec(cfg) -> ViewSpec:
        # official config augment.crop_scale [0.2, 1.0]; BYOL's asymmetric colour pair (augment/getters.py)
        scale = (getattr(cfg, "crop_min_scale", 0.2), 1.0)
        # box_min_size is in pixels of a 224 view (official min_size 32): it scales with image_size
        min_size = max(1, round(getattr(cfg, "box_min_size", 32) * cfg.image_size / 224))
        pairs = PairSpec(family="global", boxes_per_image=getattr(cfg, "boxes_per_image", 10), min_size=min_size,
                         max_iou=getattr(cfg, "box_max_iou", 0.5), tries=getattr(cfg, "box_tries", 50),
                         round_frame=getattr(cfg, "box_round_frame", True),
                         keep_last=getattr(cfg, "box_keep_last", True))
        return ViewSpec(crops=(CropSpec("global", 2, cfg.image_size, scale=scale, augs=(BYOL_AUG_1, BYOL_AUG_2)),),
                        pairs=pairs)

    def __init__(self, cfg):
        super().__init__(cfg)  # BYOL's online and target networks, its decay schedule
        self.global_weight = float(getattr(cfg, "global_weight", 0.0))

    @staticmethod
    def rois(pair_boxes: torch.Tensor, batch: int) -> torch.Tensor:
        """[2, P, 5] per-view boxes -> [2P, 5] RoIs on the stacked batch
        [view 0; view 1]: view 1's batch indices move up by B."""
        r = pair_boxes.clone()
        r[1, :, 0] += batch
        return r.reshape(-1, 5)  # 2P x 5: the P boxes in view 0, then the same P boxes in view 1

    def _project_boxes(self, fmap: torch.Tensor, rois: torch.Tensor, target: bool) -> torch.Tensor:
        stride = self.backbone.stride
        feats = roi_features(fmap, rois, 1, stride, sampling_ratio=-1, aligned=False)  # 2P x C x 1 x 1
        return (self.target_projector if target else self.projector)(feats.flatten(1))  # 2P x proj_dim

    def box_embeddings(self, x: torch.Tensor, rois: torch.Tensor, target: bool = False) -> torch.Tensor:
        """Projections [2P, proj_dim] of the RoIs on x [2B, C, H, W], by the
        online or the target network (before the predictor)."""
        return self._project_boxes((self.target_backbone if target else self.backbone)(x)[0], rois, target)

    def forward(self, views: Views) -> tuple[torch.Tensor, dict]:
        x1, x2 = views.crops["global"]                       # each B x C x H x W, channels_last
        b, p = x1.shape[0], views.pair_boxes.shape[1]        # pair_boxes: 2 x P x 5
        x = torch.cat([x1, x2])                              # 2B x C x H x W (official: one pass)
        rois = self.rois(views.pair_boxes, b)                # 2P x 5
        fmap, pooled = self.backbone(x)                      # 2B x C x h x w, 2B x C
        with torch.no_grad():
            t_fmap, t_pooled = self.target_backbone(x)
        if p < 2:  # too few pairs: a zero that reaches every online parameter (BN needs 2 rows)
            loss = 0.0 * self.predictor(self.projector(pooled)).sum()
        else:
            pred = self.predictor(self._project_boxes(fmap, rois, target=False))  # 2P x proj_dim
            with torch.no_grad():
                z = self._project_boxes(t_fmap, rois, target=True)
            loss = byol_loss(pred[:p], z[p:]) + byol_loss(pred[p:], z[:p])  # box b in view 0 <-> view 1
        if self.global_weight > 0:  # not in the official SCRL objective
            g = self.predictor(self.projector(pooled))
            with torch.no_grad():
                t = self.target_projector(t_pooled)
            loss = loss + self.global_weight * (byol_loss(g[:b], t[b:]) + byol_loss(g[b:], t[:b]))
        return loss, {"tau": self.tau.detach().clone(), "boxes": torch.tensor(float(p))}

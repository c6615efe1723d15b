"""MosRep (Wang et al. 2023, "Mosaic Representation Learning for
Self-supervised Visual Pre-training", ICLR; code: DerrickWang005/MosRep.pytorch).

Views: two global crops (224 px, scale 0.2-1) and, per image, M = 4 small
crops (112 px, scale 0.1-0.6) that the pipeline pastes into B mosaics of
2 x 2 tiles, each canvas holding crops of 4 distinct images, shifted by a
random jitter. The backbone runs on the canvas; RoIAlign on its
last feature map (7 x 7, aligned, sampling ratio -1) cuts out each tile's
feature, which the shared conv projector embeds. A tile's
positive is the key of its source image's global view (mosaic_src); the
other keys of the batch, among them its canvas neighbours', and the queue
are its negatives. Each tile's loss is weighted by sqrt(visible fraction),
and loss = two-view loss + mosaic loss (official pretrain_ddp.py).

base=mocov2 (official): conv projector (1x1 conv-BN-ReLU, pool,
Linear-ReLU-Linear) on the feature maps of both paths, EMA key encoder
m = 0.999, InfoNCE at T = 0.2 against [keys of the global batch | queue].
base=byol (ours; the official code has only the MoCo v2 model): the same
conv projector with BN in its MLP, a predictor, the cosine target decay
from byol_ema, 2 - 2 cos regression for both parts; a tile's target is its
source image's target projection.

symmetric=true: both global views are query and key (each direction's
two-view loss, each key's mosaic loss; reduced as the base reduces its two
directions: MoCo averages, BYOL sums). symmetric=false is the official
one direction: view 0 the query, view 1 the key and the tiles' positive.

cfg keys: base, arch, small_stem, image_size, crop_min_scale, mosaic_crops,
mosaic_scale, mosaic_jitter, roi_size, temperature, queue_size, proj_dim,
proj_hidden, pred_hidden, ema, byol_ema, symmetric, shuffle_bn, bn_splits,
zero_init_residual.

    python train.py --method mosrep --data /data/imagenet      # MoCo v2 base
    python train.py --method mosrep --base byol --proj-dim 256 --proj-hidden 4096 --optimizer lars
                    --lr 0.2 --weight-decay 1.5e-6 --batch-size 4096 --crop-min-scale 0.08
                                                   # BYOL base with configs/byol.yaml's values
base=byol also gives the global views BYOL's asymmetric colour pair
(Table 6); the mosaic tiles keep MoCo v2's augmentation, as officially.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipelines.views import BYOL_AUG_1, BYOL_AUG_2, MOCOV2_AUG, CropSpec, MosaicSpec, ViewSpec, Views

from ..backbones import build_backbone
from ..common import (Method, Queue, ShuffleBN, momentum_key, copy_as_target, cosine_momentum, ema_update,
                      info_nce_indexed, roi_features)
from ..heads import MLP, ConvProjector, byol_mlp

BASES = ("mocov2", "byol")


def conv_projector(in_ch: int, hidden: int, out_dim: int, bn: bool) -> ConvProjector:
    """heads.ConvProjector; bn=False drops the BN of its MLP (the official
    MoCo-based head: 1x1 conv-BN-ReLU, pool, Linear-ReLU-Linear); bn=True
    gives it BYOL's MLP (heads.byol_mlp) for the BYOL base."""
    head = ConvProjector(in_ch, hidden, out_dim)
    head.mlp = byol_mlp(hidden, hidden, out_dim) if bn else MLP(hidden, hidden, out_dim, bn=False)
    return head


def weighted_regression(p: torch.Tensor, z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """BYOL's 2 - 2 cos(p, z) per row, times weight, averaged; z gets no gradient."""
    with torch.autocast(p.device.type, enabled=False):
        cos = F.cosine_similarity(p.float(), z.detach().float(), dim=1)
        return ((2 - 2 * cos) * weight.float()).mean()


class MosRep(Method):
    name = "mosrep"

    @staticmethod
    def spec(cfg) -> ViewSpec:
        augs = (BYOL_AUG_1, BYOL_AUG_2) if cfg.base == "byol" else (MOCOV2_AUG,)
        glob = CropSpec("global", 2, cfg.image_size, scale=(cfg.crop_min_scale, 1.0), augs=augs)
        grid = math.isqrt(cfg.mosaic_crops)
        # the canvas is a global view's size: 2 x 2 tiles of 112 px at 224 (official --local-size 112)
        factor = cfg.image_size / 224
        mosaic = MosaicSpec(crops_per_image=cfg.mosaic_crops, crop_size=max(1, round(cfg.image_size / grid)),
                            scale=tuple(cfg.mosaic_scale), aug=MOCOV2_AUG,
                            jitter=int(round(cfg.mosaic_jitter * factor)))
        return ViewSpec(crops=(glob,), mosaic=mosaic)

    def __init__(self, cfg):
        super().__init__()
        if cfg.base not in BASES:
            raise ValueError(f"mosrep: unknown base {cfg.base!r}; choose from {', '.join(BASES)}")
        self.byol = cfg.base == "byol"
        self.temperature, self.symmetric, self.roi_size = cfg.temperature, cfg.symmetric, cfg.roi_size
        self.ema = cfg.byol_ema if self.byol else cfg.ema
        # shuffling BN is MoCo's (official builder.py); BYOL's target sees the plain batch
        self.shuffle_bn = ShuffleBN(getattr(cfg, "shuffle_bn", True) and not self.byol, getattr(cfg, "bn_splits", 8),
                                    getattr(cfg, "seed", 0))
        self.register_buffer("tau", torch.tensor(float(self.ema)))  # current EMA decay, moved by step_end
        self.backbone = build_backbone(cfg.arch, cfg.small_stem,
                                       zero_init_residual=getattr(cfg, "zero_init_residual", False))
        self.projector = conv_projector(self.backbone.out_dim, cfg.proj_hidden or self.backbone.out_dim, cfg.proj_dim,
                                        bn=self.byol)
        self.predictor = byol_mlp(cfg.proj_dim, cfg.pred_hidden, cfg.proj_dim) if self.byol else nn.Identity()
        self.key_backbone = copy_as_target(self.backbone)
        self.key_projector = copy_as_target(self.projector)
        self.queue = Queue(cfg.proj_dim, cfg.queue_size) if cfg.queue_size > 0 and not self.byol else None

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.projector(self.backbone(x)[0]))  # B x proj_dim

    def _mosaic_query(self, views: Views) -> torch.Tensor:
        fmap = self.backbone(views.mosaic)[0]  # B x C x S/stride x S/stride
        # float32 RoIAlign: box corners stay exact whatever the AMP dtype
        rois = roi_features(fmap.float(), views.mosaic_rois, self.roi_size, self.backbone.stride)  # BM x C x r x r
        return self.predictor(self.projector(rois))  # B*M x proj_dim

    def _key(self, x: torch.Tensor) -> torch.Tensor:
        return momentum_key(self.key_backbone, self.key_projector, x, self.shuffle_bn, output=0)  # B x proj_dim

    def forward(self, views: Views) -> tuple[torch.Tensor, dict]:
        x1, x2 = views.crops["global"]  # each B x C x H x W, channels_last
        q_mos = self._mosaic_query(views)
        src, weight = views.mosaic_src, views.mosaic_weight.float().sqrt()  # official: sqrt(visible / tile area)
        pairs = [(self._query(x1), self._key(x2))]  # (query, key of the other view)
        if self.symmetric:
            pairs.append((self._query(x2), self._key(x1)))
        if self.byol:  # BYOL sums its directions (Eq. 2)
            loss_two = sum(weighted_regression(q, k, torch.ones_like(k[:, 0])) for q, k in pairs)
            loss_mos = sum(weighted_regression(q_mos, k[src], weight) for _, k in pairs)
            metrics = {"tau": self.tau.detach().clone()}
        else:  # MoCo averages them; negatives: the batch's keys, then the queue (official)
            negatives = self.queue.keys if self.queue is not None else None
            target = torch.arange(x1.shape[0], device=x1.device)
            two = [info_nce_indexed(q, k, target, negatives, self.temperature) for q, k in pairs]
            mos = [info_nce_indexed(q_mos, k, src, negatives, self.temperature, weight) for _, k in pairs]
            loss_two, loss_mos = (sum(t[0] for t in two) / len(two), sum(t[0] for t in mos) / len(mos))
            metrics = {"acc": (sum(t[1] for t in two) / len(two)).detach(),
                       "acc_mos": (sum(t[1] for t in mos) / len(mos)).detach()}
            if self.queue is not None and self.training:
                self.queue.enqueue(torch.cat([k for _, k in pairs]))  # the losses read a snapshot
        metrics.update(loss_two=loss_two.detach(), loss_mos=loss_mos.detach())
        return loss_two + loss_mos, metrics

    @torch.no_grad()
    def step_end(self, progress: float) -> None:
        tau = cosine_momentum(self.ema, progress) if self.byol else self.ema  # BYOL: cosine; MoCo: constant
        self.tau.fill_(tau)
        ema_update(self.key_backbone, self.backbone, tau)
        ema_update(self.key_projector, self.projector, tau)

"""MoCo v2 (Chen, Fan, Girshick, He 2020, "Improved Baselines with Momentum
Contrastive Learning"; code: facebookresearch/moco).

Query encoder: backbone + MLP head (C-C-128, no BN, C the backbone's
width: 2048 for ResNet-50, 512 for ResNet-18, as the official builder.py's
dim_mlp = fc.weight.shape[1]). Key encoder: its EMA, m = 0.999 constant,
under shuffling BN (common.ShuffleBN: across ranks under DDP, emulated
with bn_splits sub-batches in one process). Negatives: a queue of past
keys (65536). InfoNCE at T = 0.2.

symmetric=false (default) is the paper's single direction: view 0 the
query, view 1 the key. symmetric=true uses both views as query against the
other's key and averages the two losses (MoCo v3 Sec. 3); then both views'
keys enter the one queue. queue_size=0 drops the queue: the other keys of
the global batch are the negatives (MoCo v3's form).

cfg keys: arch, small_stem, image_size, crop_min_scale, temperature,
queue_size, proj_dim, proj_hidden (0: the backbone's width), ema,
symmetric, shuffle_bn, bn_splits, seed.
"""
from __future__ import annotations

import torch

from pipelines.views import MOCOV2_AUG, CropSpec, ViewSpec, Views

from ..backbones import build_backbone
from ..common import Method, Queue, ShuffleBN, copy_as_target, ema_update, info_nce, momentum_key
from ..heads import MLP


def shuffle_bn_from(cfg) -> ShuffleBN:
    """The key encoder's shuffling BN from cfg's shuffle_bn, bn_splits, seed."""
    return ShuffleBN(getattr(cfg, "shuffle_bn", True), getattr(cfg, "bn_splits", 8), getattr(cfg, "seed", 0))


class MoCoV2(Method):
    name = "mocov2"

    @staticmethod
    def spec(cfg) -> ViewSpec:
        # main_moco.py --aug-plus: RandomResizedCrop(scale=(0.2, 1)), jitter 0.4/0.4/0.4/0.1 p 0.8, grey 0.2, blur 0.5, flip
        scale = (getattr(cfg, "crop_min_scale", 0.2), 1.0)
        return ViewSpec(crops=(CropSpec("global", 2, cfg.image_size, scale=scale, augs=(MOCOV2_AUG,)),))

    def __init__(self, cfg, key_encoder: bool = True):
        # key_encoder=False: the query encoder alone (LeOCLR's end-to-end ablation)
        super().__init__()
        self.temperature = cfg.temperature
        self.ema = cfg.ema
        self.symmetric = getattr(cfg, "symmetric", False)
        self.backbone = build_backbone(cfg.arch, cfg.small_stem,
                                       zero_init_residual=getattr(cfg, "zero_init_residual", False))
        self.projector = MLP(self.backbone.out_dim, cfg.proj_hidden or self.backbone.out_dim, cfg.proj_dim, bn=False)
        self.key_backbone = self.key_projector = self.queue = self.shuffle_bn = None
        if key_encoder:
            self.shuffle_bn = shuffle_bn_from(cfg)
            self.key_backbone = copy_as_target(self.backbone)
            self.key_projector = copy_as_target(self.projector)
            self.queue = Queue(cfg.proj_dim, cfg.queue_size) if cfg.queue_size > 0 else None

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x)[1])  # B x proj_dim

    def _key(self, x: torch.Tensor) -> torch.Tensor:
        return momentum_key(self.key_backbone, self.key_projector, x, self.shuffle_bn)  # B x proj_dim

    def forward(self, views: Views) -> tuple[torch.Tensor, dict]:
        x1, x2 = views.crops["global"]  # each B x C x H x W, channels_last
        negatives = self.queue.keys if self.queue is not None else None
        k2 = self._key(x2)
        loss, acc = info_nce(self._query(x1), k2, negatives, self.temperature)
        keys = k2
        if self.symmetric:
            k1 = self._key(x1)
            loss_b, acc_b = info_nce(self._query(x2), k1, negatives, self.temperature)
            loss, acc = (loss + loss_b) / 2, (acc + acc_b) / 2
            keys = torch.cat([k2, k1])
        if self.queue is not None and self.training:
            self.queue.enqueue(keys)  # info_nce read a snapshot of the queue
        return loss, {"acc": acc.detach()}

    @torch.no_grad()
    def step_end(self, progress: float) -> None:
        ema_update(self.key_backbone, self.backbone, self.ema)
        ema_update(self.key_projector, self.projector, self.ema)

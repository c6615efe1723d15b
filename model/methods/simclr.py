"""SimCLR (Chen, Kornblith, Norouzi, Hinton 2020, "A Simple Framework for
Contrastive Learning of Visual Representations"; code: google-research/simclr).

One encoder for both views, run on the 2B images at once (BN over both
views, as the official code). Projector: 2-layer MLP (C, 2048, 128) with BN
on both layers (official model_util.py; SimCLR v1). NT-Xent at T = 0.1
(official run.py default; Table 5's best for batch 4096), negatives
gathered from all ranks. Views: crop area 8%-100%, colour jitter
0.8/0.8/0.8/0.2 with p 0.8, grey p 0.2, blur p 0.5 (Appendix A).

cfg keys: arch, small_stem, image_size, crop_min_scale, proj_hidden,
proj_dim, temperature.
"""
from __future__ import annotations

import torch

from pipelines.views import AugSpec, CropSpec, ViewSpec, Views

from ..backbones import build_backbone
from ..common import Method, nt_xent
from ..heads import MLP

# Appendix A / official data_util.py: ColorJitter(0.8 s, 0.8 s, 0.8 s, 0.2 s) with strength s = 1 (the
# color_jitter_strength default) applied with p 0.8, greyscale p 0.2; blur p 0.5, sigma 0.1-2, kernel 10% of the side.
SIMCLR_AUG = AugSpec(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, jitter_p=0.8, grayscale_p=0.2,
                     blur_p=0.5, solarize_p=0.0)


class SimCLR(Method):
    name = "simclr"

    @staticmethod
    def spec(cfg) -> ViewSpec:
        scale = (getattr(cfg, "crop_min_scale", 0.08), 1.0)
        return ViewSpec(crops=(CropSpec("global", 2, cfg.image_size, scale=scale, augs=(SIMCLR_AUG,)),))

    def __init__(self, cfg):
        super().__init__()
        self.temperature = cfg.temperature
        self.backbone = build_backbone(cfg.arch, cfg.small_stem)
        self.projector = MLP(self.backbone.out_dim, cfg.proj_hidden, cfg.proj_dim, bn_last=True)

    def forward(self, views: Views) -> tuple[torch.Tensor, dict]:
        x = views.crops["global"].flatten(0, 1)  # 2B x C x H x W (view 0 rows, then view 1); channels_last kept
        z1, z2 = self.projector(self.backbone(x)[1]).chunk(2)  # B x proj_dim each
        loss, acc = nt_xent(z1, z2, self.temperature, return_acc=True)
        return loss, {"acc": acc.detach()}

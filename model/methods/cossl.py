"""CO-SSL in its BYOL form, CO-BYOL (Aubret, Teulière, Triesch 2025, "Seeing
the Whole in the Parts in Self-Supervised Representation Learning",
arXiv:2501.02860, Sec. 3.1).

    python train.py --method cossl --data /data/imagenet               # RF-ResNet-50 (configs/cossl.yaml)
    python train.py --method cossl --arch resnet50 --local-weight 0.5  # plain ResNet-50, another w_s

BYOL unchanged (online backbone, projector MLP(C, 4096, 256), predictor;
EMA target of backbone and projector; asymmetric augmentation pair), plus a
local term: every vector of the last feature map, before pooling, goes
through a local projector and a local predictor (1x1 convolutions, i.e. an
MLP per position; heads.ConvMLP) and is regressed onto the target's
*global* projection of the other view:

    L_local(v) = mean over b, i, j of 2 - 2 cos(q_local(f_v[b, :, i, j]), z_target(v')[b])
    loss = L_global + w_s * L_local,   both summed over the two directions

so each part of one view must predict the whole of the other (B*h*w terms
per direction). The local heads have no target copy: their target is the
global one. Pair it with `--arch rf_resnet18` / `rf_resnet50`
(backbones.RFResNetBackbone) to bound the parts' receptive field as the
paper does; any backbone works.

local_weight (w_s): the paper's loss weight; its ablation (Table 5) reports
values between 0.2 and 0.5 working well (as we read it; the official code was
not available to us), and we take 0.3. Everything else is BYOL's
(configs/cossl.yaml says where each number comes from).

cfg keys: arch, small_stem, image_size, crop_min_scale, proj_hidden,
proj_dim, pred_hidden, local_hidden, ema, local_weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipelines.views import BYOL_AUG_1, BYOL_AUG_2, CropSpec, ViewSpec, Views

from ..common import byol_loss
from ..heads import ConvMLP
from .byol import BYOL


def local_loss_terms(pred: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos between every local prediction pred [B, D, h, w] and its
    image's global target z [B, D] -> [B, h, w] (one term per position);
    z gets no gradient. Float32 with autocast off, as common.byol_loss."""
    with torch.autocast(pred.device.type, enabled=False):
        cos = F.cosine_similarity(pred.float(), z.detach().float()[:, :, None, None], dim=1)  # B x h x w
        return 2 - 2 * cos


class COSSL(BYOL):
    name = "cossl"

    @staticmethod
    def spec(cfg) -> ViewSpec:
        scale = (getattr(cfg, "crop_min_scale", 0.08), 1.0)  # BYOL Table 6: area 8%-100%
        return ViewSpec(crops=(CropSpec("global", 2, cfg.image_size, scale=scale, augs=(BYOL_AUG_1, BYOL_AUG_2)),))

    def __init__(self, cfg):
        super().__init__(cfg)  # BYOL's online and target networks, its decay schedule
        self.local_weight = float(cfg.local_weight)
        c, d = self.backbone.out_dim, cfg.proj_dim
        local_hidden = getattr(cfg, "local_hidden", cfg.proj_hidden)
        self.local_projector = ConvMLP(c, local_hidden, d)
        self.local_predictor = ConvMLP(d, local_hidden, d)

    def _online(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap, pooled = self.backbone(x)                                    # B x C x h x w, B x C
        return self.predictor(self.projector(pooled)), self.local_predictor(self.local_projector(fmap))

    def forward(self, views: Views) -> tuple[torch.Tensor, dict]:
        x1, x2 = views.crops["global"]                                     # each B x C x H x W, channels_last
        (g1, l1), (g2, l2) = self._online(x1), self._online(x2)            # B x D; B x D x h x w
        z1, z2 = self._target(x1), self._target(x2)
        global_loss = byol_loss(g1, z2) + byol_loss(g2, z1)
        local_loss = local_loss_terms(l1, z2).mean() + local_loss_terms(l2, z1).mean()
        loss = global_loss + self.local_weight * local_loss
        return loss, {"tau": self.tau.detach().clone(), "global_loss": global_loss.detach(),
                      "local_loss": local_loss.detach()}

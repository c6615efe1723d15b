"""CO-SSL in its BYOL form, CO-BYOL (Aubret, Teulière, Triesch 2025, "Seeing
the Whole in the Parts in Self-Supervised Representation Learning",
arXiv:2501.02860, Sec. 3.1 and Fig. 1).

    python train.py --method cossl --data /data/imagenet               # RF-ResNet-50 (configs/cossl.yaml)
    python train.py --method cossl --arch resnet50 --local-weight 0.5  # plain ResNet-50, another w_s

BYOL unchanged (online backbone, projector MLP(C, 4096, 256), predictor;
EMA target of backbone and projector; asymmetric augmentation pair; global
loss L_g). Fig. 1 adds "two new local projectors and a new local predictor"
and "symmetrically compute[s] the averaged BYOL loss L_l between each local
embedding and the global embedding of the other image". We read it as BYOL's
own structure applied to the local vectors (every position of the last
feature map, before pooling):

    online local projector g_l, local predictor q_l   (1x1 convolutions: an MLP per position, heads.ConvMLP)
    target local projector g_l~, the EMA copy of g_l  (updated with the target backbone, no gradient)

and the local loss, for the views (v, v'), both ways round:

    local -> global:  2 - 2 cos(q_l(g_l(f_v[:, :, i, j])), z~(v'))         each part predicts the other view's whole
    global -> local:  2 - 2 cos(q(g(pooled_v)), g_l~(f~_v'[:, :, i, j]))   the whole predicts each part of the other view
    L_l = (mean over b, i, j of local->global + mean over b, i, j of global->local) / 2, summed over (v, v') and (v', v)
    loss = L_g + w_s * L_l

where z~ is the target's global projection and q(g(.)) BYOL's online global
prediction. The target local projector is what makes the second direction
possible; the paper's notation z'^i_xi (a target embedding of position i of
the second view, as a review of the paper quotes it) is what we take it for.
Neither the full text nor the authors' code was available to us, so the
pairing of the second direction with BYOL's global predictor is our reading.

Pair it with `--arch rf_resnet50` / `rf_resnet18` (backbones.rf_resnet,
Fig. 2) to bound the parts' receptive field as the paper does: 99 px on
224 px views, 14 x 14 local vectors (output stride 16); on small images the
field follows the view size (99/224 of it); any backbone works.

local_weight (w_s): the paper's loss weight; its ablation (Table 5) reports
values between 0.2 and 0.5 working well, and we take 0.3. Everything else is
BYOL's (configs/cossl.yaml says where each number comes from).

cfg keys: arch, small_stem, image_size, crop_min_scale, proj_hidden,
proj_dim, pred_hidden, local_hidden, ema, local_weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipelines.views import BYOL_AUG_1, BYOL_AUG_2, CropSpec, ViewSpec, Views

from ..backbones import RFResNetBackbone, build_backbone
from ..common import byol_loss, copy_as_target, cosine_momentum, ema_update
from ..heads import ConvMLP
from .byol import BYOL


def local_loss_terms(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos between a prediction and a target, one of them a map
    [B, D, h, w] and the other a vector [B, D] (or both maps) -> [B, h, w],
    one term per position; the target gets no gradient. Float32 with autocast
    off, as common.byol_loss."""
    def as_map(t: torch.Tensor) -> torch.Tensor:
        return t[:, :, None, None] if t.dim() == 2 else t
    with torch.autocast(pred.device.type, enabled=False):
        cos = F.cosine_similarity(as_map(pred).float(), as_map(target.detach()).float(), dim=1)  # B x h x w
        return 2 - 2 * cos


class COSSL(BYOL):
    name = "cossl"

    @staticmethod
    def spec(cfg) -> ViewSpec:
        scale = (getattr(cfg, "crop_min_scale", 0.08), 1.0)  # BYOL Table 6: area 8%-100%
        return ViewSpec(crops=(CropSpec("global", 2, cfg.image_size, scale=scale, augs=(BYOL_AUG_1, BYOL_AUG_2)),))

    def __init__(self, cfg):
        super().__init__(cfg)  # BYOL's online and target networks, its decay schedule
        if isinstance(self.backbone, RFResNetBackbone) and cfg.small_stem:
            # small images: the RF-ResNet's field follows the view size (backbones.rf_resnet)
            self.backbone = build_backbone(cfg.arch, cfg.small_stem, view_size=cfg.image_size)
            self.target_backbone = copy_as_target(self.backbone)
        self.local_weight = float(cfg.local_weight)
        c, d = self.backbone.out_dim, cfg.proj_dim
        local_hidden = getattr(cfg, "local_hidden", cfg.proj_hidden)
        self.local_projector = ConvMLP(c, local_hidden, d)          # Fig. 1: the two local projectors,
        self.target_local_projector = copy_as_target(self.local_projector)  # online and EMA target
        self.local_predictor = ConvMLP(d, local_hidden, d)          # and the local predictor (online only)

    def _online(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap, pooled = self.backbone(x)                                    # B x C x h x w, B x C
        return self.predictor(self.projector(pooled)), self.local_predictor(self.local_projector(fmap))

    @torch.no_grad()
    def _target(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap, pooled = self.target_backbone(x)
        return self.target_projector(pooled), self.target_local_projector(fmap)  # B x D, B x D x h x w

    def forward(self, views: Views) -> tuple[torch.Tensor, dict]:
        x1, x2 = views.crops["global"]                                     # each B x C x H x W, channels_last
        (g1, l1), (g2, l2) = self._online(x1), self._online(x2)            # B x D; B x D x h x w
        (z1, zl1), (z2, zl2) = self._target(x1), self._target(x2)          # B x D; B x D x h x w
        global_loss = byol_loss(g1, z2) + byol_loss(g2, z1)
        local_to_global = local_loss_terms(l1, z2).mean() + local_loss_terms(l2, z1).mean()
        global_to_local = local_loss_terms(g1, zl2).mean() + local_loss_terms(g2, zl1).mean()
        local_loss = (local_to_global + global_to_local) / 2
        loss = global_loss + self.local_weight * local_loss
        return loss, {"tau": self.tau.detach().clone(), "global_loss": global_loss.detach(),
                      "local_loss": local_loss.detach(), "local_to_global": local_to_global.detach(),
                      "global_to_local": global_to_local.detach()}

    @torch.no_grad()
    def step_end(self, progress: float) -> None:
        super().step_end(progress)  # tau, target backbone and projector
        ema_update(self.target_local_projector, self.local_projector, cosine_momentum(self.base_ema, progress))

"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent").

Online: backbone, projector MLP(C, 4096, 256), predictor MLP(256, 4096, 256)
(Sec. 3.3), each Linear(bias)-BN-ReLU-Linear(no bias) as the official
networks.py (heads.byol_mlp). Target: EMA of backbone and projector, tau
from 0.996 to 1 on a cosine schedule (Sec. 3.2). Loss: 2 - 2 cos(prediction, target projection)
of the other view, summed over both directions (Eq. 2: L + L~). Views: the
asymmetric pair of Table 6 (blur 1.0 / 0.1, solarize 0 / 0.2).

cfg keys: arch, small_stem, image_size, crop_min_scale, proj_hidden,
proj_dim, pred_hidden, ema.
"""
from __future__ import annotations

import torch

from pipelines.views import BYOL_AUG_1, BYOL_AUG_2, CropSpec, ViewSpec, Views

from ..backbones import build_backbone
from ..common import Method, byol_loss, copy_as_target, cosine_momentum, ema_update
from ..heads import byol_mlp


class BYOL(Method):
    name = "byol"

    @staticmethod
    def spec(cfg) -> ViewSpec:
        scale = (getattr(cfg, "crop_min_scale", 0.08), 1.0)  # Table 6: random crop, area 8%-100%
        return ViewSpec(crops=(CropSpec("global", 2, cfg.image_size, scale=scale, augs=(BYOL_AUG_1, BYOL_AUG_2)),))

    def __init__(self, cfg):
        super().__init__()
        self.base_ema = cfg.ema
        # current target decay, moved by step_end; a buffer, so torch.compile does not recompile as it moves
        self.register_buffer("tau", torch.tensor(float(cfg.ema)))
        self.backbone = build_backbone(cfg.arch, cfg.small_stem)
        self.projector = byol_mlp(self.backbone.out_dim, cfg.proj_hidden, cfg.proj_dim)
        self.predictor = byol_mlp(cfg.proj_dim, cfg.pred_hidden, cfg.proj_dim)
        self.target_backbone = copy_as_target(self.backbone)
        self.target_projector = copy_as_target(self.projector)

    def _online(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.projector(self.backbone(x)[1]))  # B x proj_dim

    @torch.no_grad()
    def _target(self, x: torch.Tensor) -> torch.Tensor:
        return self.target_projector(self.target_backbone(x)[1])  # B x proj_dim

    def forward(self, views: Views) -> tuple[torch.Tensor, dict]:
        x1, x2 = views.crops["global"]  # each B x C x H x W, channels_last
        loss = byol_loss(self._online(x1), self._target(x2)) + byol_loss(self._online(x2), self._target(x1))
        return loss, {"tau": self.tau.detach().clone()}

    @torch.no_grad()
    def step_end(self, progress: float) -> None:
        tau = cosine_momentum(self.base_ema, progress)
        self.tau.fill_(tau)
        ema_update(self.target_backbone, self.backbone, tau)
        ema_update(self.target_projector, self.projector, tau)

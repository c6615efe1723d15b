"""Projector and predictor heads.

    MLP(2048, 2048, 128, bn=False)           # MoCo v2 projector (official builder.py: no BN)
    byol_mlp(2048, 4096, 256)                # BYOL projector and predictor (Sec. 3.3, official networks.py)
    MLP(2048, 2048, 128, bn_last=True)       # SimCLR projector (official TF code: BN on every layer)
    ConvProjector(2048, 2048, 128)           # RoI features -> embedding (MosRep)
"""
from __future__ import annotations

import torch
import torch.nn as nn


class MLP(nn.Sequential):
    """`layers` linear layers: (Linear-BN-ReLU) x (layers-1), then Linear.

    bn=False drops the hidden BNs (MoCo v2); bn_last adds a BN without affine
    parameters after the last Linear (SimCLR, MoCo v3). By default a Linear
    followed by BN has no bias and the others have one; hidden_bias and
    last_bias set them (BYOL's official MLP: bias before the BN, none last).
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int = 2, bn: bool = True,
                 bn_last: bool = False, hidden_bias: bool | None = None, last_bias: bool | None = None):
        if layers < 1:
            raise ValueError(f"an MLP needs at least one layer, got {layers}")
        hidden_bias = not bn if hidden_bias is None else hidden_bias
        last_bias = not bn_last if last_bias is None else last_bias
        mods = []
        dim = in_dim
        for _ in range(layers - 1):
            mods.append(nn.Linear(dim, hidden, bias=hidden_bias))
            if bn:
                mods.append(nn.BatchNorm1d(hidden))
            mods.append(nn.ReLU(inplace=True))
            dim = hidden
        mods.append(nn.Linear(dim, out_dim, bias=last_bias))
        if bn_last:
            mods.append(nn.BatchNorm1d(out_dim, affine=False))
        super().__init__(*mods)


def byol_mlp(in_dim: int, hidden: int, out_dim: int) -> MLP:
    """BYOL's projector and predictor (Grill et al. 2020, Sec. 3.3 and App. J:
    Linear(hidden)-BN-ReLU-Linear(out)), with the biases of the official
    byol/utils/networks.py MLP: the first Linear has one, the last none
    (kakaobrain/scrl models/heads.py TwoLayerLinearHead likewise)."""
    return MLP(in_dim, hidden, out_dim, hidden_bias=True, last_bias=False)


class ConvProjector(nn.Module):
    """RoI feature maps [N, in_ch, s, s] -> embeddings [N, out_dim]: 1x1 conv,
    BN, ReLU, global average pool, then MLP(hidden, hidden, out_dim)
    (MosRep's RoI head)."""

    def __init__(self, in_ch: int, hidden: int, out_dim: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_ch, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True))
        self.mlp = MLP(hidden, hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.conv(x).mean(dim=(2, 3)))


class ConvMLP(nn.Sequential):
    """MLP(in_dim, hidden, out_dim) applied at every position of a feature map
    [B, in_dim, h, w] -> [B, out_dim, h, w]: 1x1 conv, BN, ReLU, 1x1 conv
    (CO-SSL's local projector and predictor)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__(nn.Conv2d(in_dim, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
                         nn.Conv2d(hidden, out_dim, 1))

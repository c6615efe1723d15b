"""Projector and predictor heads.

    MLP(2048, 2048, 128, bn=False)           # MoCo v2 projector (official builder.py: no BN)
    MLP(2048, 4096, 256)                     # BYOL projector and predictor (Sec. 3.3)
    MLP(2048, 2048, 128, bn_last=True)       # SimCLR projector (official TF code: BN on every layer)
    ConvProjector(2048, 2048, 128)           # RoI features -> embedding (MosRep)
"""
from __future__ import annotations

import torch
import torch.nn as nn


class MLP(nn.Sequential):
    """`layers` linear layers: (Linear-BN-ReLU) x (layers-1), then Linear.

    bn=False drops the hidden BNs (MoCo v2); bn_last adds a BN without affine
    parameters after the last Linear (SimCLR, MoCo v3). A Linear followed by
    BN has no bias.
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int = 2, bn: bool = True,
                 bn_last: bool = False):
        if layers < 1:
            raise ValueError(f"an MLP needs at least one layer, got {layers}")
        mods = []
        dim = in_dim
        for _ in range(layers - 1):
            mods.append(nn.Linear(dim, hidden, bias=not bn))
            if bn:
                mods.append(nn.BatchNorm1d(hidden))
            mods.append(nn.ReLU(inplace=True))
            dim = hidden
        mods.append(nn.Linear(dim, out_dim, bias=not bn_last))
        if bn_last:
            mods.append(nn.BatchNorm1d(out_dim, affine=False))
        super().__init__(*mods)


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

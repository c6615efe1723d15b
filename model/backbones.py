"""Backbones: torchvision ResNets that return (feature map, pooled features).

    net = build_backbone("resnet50")                   # 224 px ImageNet stem, stride 32
    net = build_backbone("resnet18", small_stem=True)  # 32-64 px images, stride 8
    fmap, pooled = net(x)                              # [B,C,h,w], [B,C]; C = net.out_dim

A backbone keeps torchvision's module names (conv1, bn1, layer1..layer4) and
drops avgpool and fc, so its state_dict is a torchvision ResNet's minus fc:
`export_torchvision` writes what `torchvision.models.resnet50()` loads.

`BACKBONES` maps a name to a constructor `f(small_stem=..., **kw) -> module`
with `forward(x) -> (fmap, pooled)`, `out_dim` and `stride`; other families
(CO-SSL's receptive-field-limited ResNet) register there.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torchvision


class ExportError(ValueError):
    """The backbone is not an architecture torchvision builds."""


class Backbone(nn.Module):
    """The interface: forward(x) -> (fmap [B, C, h, w], pooled [B, C]);
    out_dim = C; stride = input pixels per feature-map cell."""
    out_dim: int
    stride: int


class ResNetBackbone(Backbone):
    """A torchvision ResNet without avgpool and fc.

    small_stem: CIFAR-style stem for 32-64 px inputs (conv1 3x3 stride 1,
    no max-pool), as in the SimCLR/MoCo CIFAR recipes; the output stride
    falls from 32 to 8.
    width: channels of conv1 and layer1 (torchvision: 64); every layer
    scales with it. Another width is not a torchvision architecture.
    """

    def __init__(self, arch: str, small_stem: bool = False, zero_init_residual: bool = False, width: int = 64):
        super().__init__()
        net = (getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual) if width == 64
               else scaled_resnet(arch, width, zero_init_residual))
        self.arch, self.small_stem, self.width = arch, small_stem, width
        self.out_dim = net.fc.in_features  # 512 (resnet18/34), 2048 (resnet50+)
        self.stride = 8 if small_stem else 32
        if small_stem:
            self.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
            self.maxpool = nn.Identity()
        else:
            self.conv1, self.maxpool = net.conv1, net.maxpool
        self.bn1, self.relu = net.bn1, net.relu
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        fmap = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # B x C x H/stride x W/stride
        return fmap, fmap.mean(dim=(2, 3))                               # B x C


def scaled_resnet(arch: str, width: int, zero_init_residual: bool) -> torchvision.models.ResNet:
    """torchvision's ResNet `arch` with every layer's channels scaled by
    width / 64 (layer k: width * 2^k planes), initialised as torchvision does."""
    net = getattr(torchvision.models, arch)(weights=None)
    block = type(net.layer1[0])
    net.inplanes = width
    net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    for k, name in enumerate(("layer1", "layer2", "layer3", "layer4")):
        setattr(net, name, net._make_layer(block, width * 2 ** k, len(getattr(net, name)), stride=1 if k == 0 else 2))
    net.fc = nn.Linear(width * 8 * block.expansion, 1000)
    for m in net.modules():  # torchvision.models.resnet.ResNet.__init__'s initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:  # the last BN of every residual branch starts at 0 (Goyal et al. 2017)
        for m in net.modules():
            last_bn = getattr(m, "bn3", None) if hasattr(m, "bn3") else getattr(m, "bn2", None)
            if isinstance(m, block) and last_bn is not None:
                nn.init.zeros_(last_bn.weight)
    return net


BACKBONES = {
    "resnet18": functools.partial(ResNetBackbone, "resnet18"),
    "resnet50": functools.partial(ResNetBackbone, "resnet50"),
    # ResNet-18 at half and a quarter of its width (32 and 16 base channels; about 1/4 and 1/16 of
    # the FLOPs): small budgets on CPUs (bench/quality.py --budget cpu)
    "resnet18_half": functools.partial(ResNetBackbone, "resnet18", width=32),
    "resnet18_quarter": functools.partial(ResNetBackbone, "resnet18", width=16),
}


def build_backbone(arch: str, small_stem: bool = False, **kw) -> Backbone:
    if arch not in BACKBONES:
        raise ValueError(f"unknown backbone {arch!r}; choose from {', '.join(sorted(BACKBONES))}")
    return BACKBONES[arch](small_stem=small_stem, **kw)


def export_torchvision(backbone: nn.Module) -> dict:
    """The backbone's weights as a torchvision ResNet state_dict (CPU, contiguous).

    `torchvision.models.<arch>().load_state_dict(sd, strict=False)` reports
    exactly `fc.weight` and `fc.bias` missing (MoCo's convention for
    pre-trained backbones: the classifier is trained downstream). With the
    small stem, conv1.weight is 3x3: the dict loads only into a ResNet whose
    conv1 is replaced likewise,
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False); net.maxpool = nn.Identity()
    """
    prefixes = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers
    net = backbone
    while hasattr(net, "module") or hasattr(net, "_orig_mod"):
        net = getattr(net, "module", None) or net._orig_mod
    loadable = torchvision_loadable(net)
    if loadable is not True:
        raise ExportError(f"--export writes a torchvision ResNet's state_dict, and this backbone is not one: {loadable}")
    out = {}
    for k, v in backbone.state_dict().items():
        while k.startswith(prefixes):
            k = k.split(".", 1)[1]
        out[k] = v.detach().cpu().contiguous()
    return out



def torchvision_loadable(backbone: nn.Module):
    """True when `export_torchvision(backbone)` loads into torchvision's model
    of the same name, else the reason it does not (one phrase)."""
    if type(backbone) is ResNetBackbone and backbone.width == 64:
        return True
    if type(backbone) is ResNetBackbone:
        return f"its width is {backbone.width} channels (torchvision's {backbone.arch} has 64)"
    return f"{type(backbone).__name__} is not a torchvision architecture"


# ----------------------------------------------------------------------------- CO-SSL's RF-ResNet
class RFResNetBackbone(ResNetBackbone):
    """Receptive-field-limited ResNet (RF-ResNet; Aubret, Teulière, Triesch
    2025, "Seeing the Whole in the Parts in Self-Supervised Representation
    Learning", arXiv:2501.02860): every feature-map position sees at most
    `max_rf` x `max_rf` input pixels, so the local vectors CO-SSL aligns
    with the global embedding are truly local; an MLP after the average
    pooling (which the paper ablates) still lets the global representation
    combine them.

    Built from the torchvision ResNet: walking the 3x3 convolutions in order,
    each that would lift the receptive field above `max_rf` becomes a 1x1
    convolution with the same channels and stride (so every shape and the
    output stride stay those of the ResNet). Paper: RF 99 for ResNet-50 and
    29 for ResNet-18 (the defaults). Our construction keeps whole 3x3 layers
    only, so the field it reaches is the largest such one <= max_rf (the
    achieved value is `receptive_field`: rf_resnet18 small stem 29, ImageNet
    stem 27; rf_resnet50 91 with either stem). The paper's exact layer
    layout and MLP depth were not available to us (neither its full text nor
    code); `pool_mlp` is one Linear-BN-ReLU of width C, our choice.
    """

    def __init__(self, arch: str, max_rf: int, small_stem: bool = False, pool_mlp: bool = True,
                 zero_init_residual: bool = False):
        super().__init__(arch, small_stem=small_stem, zero_init_residual=zero_init_residual)
        rf, jump = (3, 1) if small_stem else (11, 4)  # 3x3/1 conv; or 7x7/2 conv + 3x3/2 max-pool
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                basic = isinstance(block, torchvision.models.resnet.BasicBlock)
                for name in ("conv1", "conv2") if basic else ("conv2",):  # the 3x3 convolutions, in order
                    conv = getattr(block, name)
                    if rf + (conv.kernel_size[0] - 1) * jump <= max_rf:
                        rf += (conv.kernel_size[0] - 1) * jump
                    else:
                        point = nn.Conv2d(conv.in_channels, conv.out_channels, 1, stride=conv.stride, bias=False)
                        nn.init.kaiming_normal_(point.weight, mode="fan_out", nonlinearity="relu")
                        setattr(block, name, point)
                    jump *= conv.stride[0]
        self.receptive_field, self.max_rf = rf, max_rf
        c = self.out_dim
        self.pool_mlp = (nn.Sequential(nn.Linear(c, c, bias=False), nn.BatchNorm1d(c), nn.ReLU(inplace=True))
                         if pool_mlp else nn.Identity())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap, pooled = super().forward(x)   # B x C x h x w (local vectors), B x C
        return fmap, self.pool_mlp(pooled)  # B x C after the MLP


BACKBONES.update({
    "rf_resnet18": functools.partial(RFResNetBackbone, "resnet18", 29),
    "rf_resnet50": functools.partial(RFResNetBackbone, "resnet50", 99),
})

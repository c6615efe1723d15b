"""Backbones: torchvision ResNets that return (feature map, pooled features).

    net = build_backbone("resnet50")                   # 224 px ImageNet stem, stride 32
    net = build_backbone("resnet18", small_stem=True)  # 32-64 px images, stride 8
    fmap, pooled = net(x)                              # [B,C,h,w], [B,C]; C = net.out_dim

A backbone keeps torchvision's module names (conv1, bn1, layer1..layer4) and
drops avgpool and fc, so its state_dict is a torchvision ResNet's minus fc:
`export_torchvision` writes what `torchvision.models.resnet50()` loads.

`BACKBONES` maps a name to a constructor `f(small_stem=..., **kw) -> module`
with `forward(x) -> (fmap, pooled)`, `out_dim`, `stride` and `load_hint`;
other families (CO-SSL's RF-ResNet, `rf_resnet`) register there.
`receptive_field(net)` walks a backbone's convolutions and poolings.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torchvision


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

    @property
    def load_hint(self) -> str:
        """How to load what export_torchvision writes (train.py --export prints it)."""
        if self.width != 64:  # a narrow ResNet: torchvision builds only width 64
            return (f"not a torchvision architecture ({self.arch} at width {self.width}); load with "
                    f"model.backbones.ResNetBackbone({self.arch!r}, small_stem={self.small_stem}, "
                    f"width={self.width}).load_state_dict(sd)")
        return (f"load with torchvision.models.{self.arch}().load_state_dict(sd, strict=False) (only fc missing"
                f"{'; conv1 is the small stem' if self.small_stem else ''})")

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
    An RF-ResNet's dict loads only into the RFResNetBackbone its `load_hint` names.
    """
    prefixes = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers
    out = {}
    for k, v in backbone.state_dict().items():
        while k.startswith(prefixes):
            k = k.split(".", 1)[1]
        out[k] = v.detach().cpu().contiguous()
    return out


# ----------------------------------------------------------------------------- receptive fields
def main_path(net: nn.Module):
    """(owner, name, module) of every convolution and pooling on the main path
    of a ResNet-shaped backbone, input to output: conv1, maxpool, then conv1,
    conv2, conv3 of every block of layer1..layer4. A block's shortcut (1x1
    convolution or identity) sees a subset of its main path's field."""
    yield net, "conv1", net.conv1
    yield net, "maxpool", net.maxpool
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        for block in layer:
            for name in ("conv1", "conv2", "conv3"):
                if hasattr(block, name):
                    yield block, name, getattr(block, name)


def _kernel_stride(m: nn.Module) -> tuple[int, int]:
    """(effective kernel side, stride) of a convolution or pooling; (1, 1) for anything else."""
    if not isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        return 1, 1
    k, s, d = (v if isinstance(v, int) else v[0] for v in (m.kernel_size, m.stride, getattr(m, "dilation", 1)))
    return (k - 1) * d + 1, s


def receptive_field(net: nn.Module) -> tuple[int, int]:
    """(side in input pixels of the square that one feature-map position sees,
    input pixels per feature-map cell) of a ResNet-shaped backbone: walking
    `main_path`, each layer adds (kernel - 1) * jump, then multiplies the jump
    by its stride (Araujo et al. 2019, "Computing Receptive Fields of
    Convolutional Neural Networks", Distill, single-path networks)."""
    rf, jump = 1, 1
    for _, _, m in main_path(net):
        k, s = _kernel_stride(m)
        rf, jump = rf + (k - 1) * jump, jump * s
    return rf, jump


# ----------------------------------------------------------------------------- CO-SSL's RF-ResNet
class RFResNetBackbone(ResNetBackbone):
    """Receptive-field ResNet (RF-ResNet; Aubret, Teulière, Triesch 2025,
    "Seeing the Whole in the Parts in Self-Supervised Representation
    Learning", arXiv:2501.02860, Fig. 2): a torchvision ResNet whose field is
    set by the max-pool's presence and the strides s', s'', s''' of the first
    blocks of layer2, layer3 and layer4, so that every feature-map position
    sees a bounded square of the input and the local vectors CO-SSL aligns
    with the global embedding are truly local. An MLP after the average
    pooling (Sec. 3.2; ablated in Table 6) lets the global representation
    combine them; `pool_mlp` is one Linear-BN-ReLU of width C, our choice
    (its depth is not known to us).

    The stride sits where torchvision puts it: on the 3x3 convolution of a
    Bottleneck (ResNet v1.5; v1 put it on the first 1x1) and on conv1 of a
    BasicBlock; the shortcut's 1x1 convolution takes the same stride. A
    stride changes no weight, so the state_dict keeps torchvision's names and
    shapes (plus pool_mlp).

    max_rf is not part of Fig. 2; we use it only for small images: every 3x3
    convolution that would lift the field above max_rf becomes a 1x1
    convolution with the same channels and stride. A full-depth ResNet of 3x3
    convolutions sees at least 35 px even with a 3x3 stride-1 stem and no
    down-sampling, so strides alone cannot give 32 px views a field in
    proportion to the paper's 99 px on 224 px (see `rf_resnet`).

    receptive_field and stride (input pixels per feature-map cell) come from
    `receptive_field(self)`.
    """

    def __init__(self, arch: str, maxpool: bool = False, strides: tuple[int, int, int] = (1, 2, 1),
                 small_stem: bool = False, max_rf: int | None = None, pool_mlp: bool = True,
                 zero_init_residual: bool = False, width: int = 64):
        super().__init__(arch, small_stem=small_stem, zero_init_residual=zero_init_residual, width=width)
        strides = tuple(int(s) for s in strides)
        if len(strides) != 3 or min(strides) < 1:
            raise ValueError(f"strides are s', s'', s''' of layer2..layer4, each >= 1; got {strides}")
        self.layout = dict(maxpool=bool(maxpool), strides=strides, small_stem=small_stem, max_rf=max_rf,
                           pool_mlp=pool_mlp, width=width)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if maxpool else nn.Identity()
        for layer, s in zip((self.layer2, self.layer3, self.layer4), strides):
            block = layer[0]
            strided = block.conv2 if isinstance(block, torchvision.models.resnet.Bottleneck) else block.conv1
            strided.stride = (s, s)
            if block.downsample is not None:
                block.downsample[0].stride = (s, s)
            block.stride = s
        if max_rf is not None:
            self._cap(max_rf)
        self.receptive_field, self.stride = receptive_field(self)
        c = self.out_dim
        self.pool_mlp = (nn.Sequential(nn.Linear(c, c, bias=False), nn.BatchNorm1d(c), nn.ReLU(inplace=True))
                         if pool_mlp else nn.Identity())

    def _cap(self, max_rf: int) -> None:
        """Walk the main path; a 3x3 convolution that would pass max_rf becomes 1x1."""
        rf, jump = 1, 1
        for owner, name, m in list(main_path(self)):
            k, s = _kernel_stride(m)
            if owner is not self and k > 1 and rf + (k - 1) * jump > max_rf:
                point = nn.Conv2d(m.in_channels, m.out_channels, 1, stride=m.stride, bias=False)
                nn.init.kaiming_normal_(point.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
                setattr(owner, name, point)
                k = 1
            rf, jump = rf + (k - 1) * jump, jump * s
        if rf > max_rf:
            raise ValueError(f"the stem alone sees {rf} px, more than max_rf={max_rf}")

    @property
    def load_hint(self) -> str:
        """How to load what export_torchvision writes. A torchvision ResNet
        would accept these weights and compute something else."""
        lay = self.layout
        capped = f", 3x3 convolutions past {lay['max_rf']} px made 1x1" if lay["max_rf"] else ""
        return (f"not a torchvision architecture (RF-ResNet, receptive field {self.receptive_field} px: max-pool "
                f"{'kept' if lay['maxpool'] else 'removed'}, first-block strides {lay['strides']}{capped}); load with "
                f"model.backbones.RFResNetBackbone({self.arch!r}, maxpool={lay['maxpool']}, strides={lay['strides']}, "
                f"small_stem={lay['small_stem']}, max_rf={lay['max_rf']}, pool_mlp={lay['pool_mlp']}, "
                f"width={lay['width']})"
                f".load_state_dict(sd)")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap, pooled = super().forward(x)   # B x C x h x w (local vectors), B x C
        return fmap, self.pool_mlp(pooled)  # B x C after the MLP


# Fig. 2's parameters for 224 px views. The paper states 99 px for RF-ResNet-50;
# no (max-pool, s', s'', s''') reaches exactly 99 on a full-depth ResNet-50
# (enumerated in tests/model/test_backbones.py: with torchvision's stride
# placement the nearest are 103 and 79, with v1's 107 and 83). This layout, no
# max-pool and strides 1, 2, 1, gives ResNet-50 103 px (v1.5) and ResNet-18
# exactly 99 px; output stride 4 (56 x 56 local vectors on 224 px views), which
# costs 88 GMACs per view (ResNet-50: 4.1) and which every layout near 99 px
# shares. A review of the paper quotes 23.7M parameters for its RF-ResNet-50
# (ResNet-50 23.5M); ours has 27.7M (the pool MLP's 4.2M), so the paper's
# layout or MLP differs in a way its text available to us does not show.
PAPER_LAYOUT = dict(maxpool=False, strides=(1, 2, 1))
PAPER_RF, PAPER_VIEW = 99, 224


def rf_resnet(arch: str, small_stem: bool = False, view_size: int = 32, **kw) -> RFResNetBackbone:
    """The RF-ResNet for `arch`: Fig. 2's layout (PAPER_LAYOUT) with the
    ImageNet stem; with the small stem (images of at most 64 px), ResNet's
    strides 2, 2, 2 and a field capped at the paper's ratio times the view,
    floor(99 / 224 * view_size) (14 px on 32 px views; the walk reaches 13 px
    on ResNet-18, 11 px on ResNet-50), instead of 29 px on a 32 px view."""
    if small_stem:
        return RFResNetBackbone(arch, maxpool=False, strides=(2, 2, 2), small_stem=True,
                                max_rf=PAPER_RF * view_size // PAPER_VIEW, **kw)
    return RFResNetBackbone(arch, small_stem=False, **PAPER_LAYOUT, **kw)


BACKBONES.update({
    "rf_resnet18": functools.partial(rf_resnet, "resnet18"),
    "rf_resnet50": functools.partial(rf_resnet, "resnet50"),
    "rf_resnet18_quarter": functools.partial(rf_resnet, "resnet18", width=16),  # the CPU profile's, as resnet18_quarter
})

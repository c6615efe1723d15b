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
def pointwise_like(conv: nn.Conv2d) -> nn.Conv2d:
    """A 1x1 convolution with conv's channels and stride, initialised as torchvision initialises convolutions."""
    point = nn.Conv2d(conv.in_channels, conv.out_channels, 1, stride=conv.stride, bias=False)
    nn.init.kaiming_normal_(point.weight, mode="fan_out", nonlinearity="relu")
    return point


class RFResNetBackbone(ResNetBackbone):
    """Receptive-field ResNet (RF-ResNet; Aubret, Teulière, Triesch 2025,
    "Seeing the Whole in the Parts in Self-Supervised Representation
    Learning", arXiv:2501.02860, Fig. 2): a torchvision ResNet in which every
    feature-map position sees a bounded square of the input, so that the
    local vectors CO-SSL aligns with the global embedding are truly local.
    An MLP after the average pooling (Sec. 3.2; ablated in Table 6) lets the
    global representation combine them; `pool_mlp` is one Linear-BN-ReLU of
    width C, our choice (its depth is not known to us).

    What Fig. 2's caption states (the drawing itself, the full text and the
    authors' code were not available to us): blocks, n per layer as in a
    standard ResNet; m, the max-pool's absence or presence; s', s", s"', the
    strides of the first blocks of layer2..layer4; "two different types of
    blocks"; field sizes "independent from the number of blocks n > 2 in
    each layer".

    Our reading (inferred): a 3x3 convolution at jump j (input pixels per
    cell) widens the field by 2j, so a field independent of n needs the later
    blocks without a spatial kernel. Each layer keeps its first
    `spatial_convs` = 2 convolutions of 3x3 and every later one becomes a 1x1
    with the same channels, as in BagNets (Brendel & Bethge 2019), which
    Fig. 3 calls RF-ResNet's close relative. For ResNet-50's Bottlenecks
    that is blocks 1 and 2 of every layer (blocks 3 onwards: 1x1 only); for
    ResNet-18's BasicBlocks, both convolutions of block 1. We count 3x3
    convolutions rather than blocks because of ResNet-18's 29 px (below);
    both networks then have the same field for every layout.

    The field, walking `receptive_field` (rf += (k - 1) * jump, then
    jump *= stride), for the two layouts that give ResNet-50 (v1.5) exactly
    the paper's 99 px:

        convolutions                   no max-pool; 2, 2, 2   max-pool; 1, 2, 1
        stem 7x7, stride 2             7, jump 2              7, jump 2
        max-pool 3x3, stride 2         -                      11, jump 4
        layer1: 3x3, 3x3               11, 15                 19, 27
        layer2: 3x3 (stride s'), 3x3   19, 27; jump 4         35, 43
        layer3: 3x3 (stride s"), 3x3   35, 51; jump 8         51, 67; jump 8
        layer4: 3x3 (stride s"'), 3x3  67, 99; jump 16        83, 99
        field; output stride           99 px; 16              99 px; 8

    Both have the same parameters: 23.2M for ResNet-50 with the pool MLP
    (19.0M without), the reading nearest the 23.7M a review of the paper
    quotes (ResNet-50: 23.5M; keeping every 3x3 would give 27.7M, one 3x3 per
    layer 20.4M); the 0.5M left over we cannot place. The paper's statements
    (fields, parameter count) do not separate the two layouts, so
    PAPER_LAYOUT takes no max-pool and strides 2, 2, 2: its one departure
    from torchvision's strides is the missing max-pool, and it is the cheaper
    (output stride 16: 14 x 14 local vectors on 224 px views; the README's
    method table states the cost).

    ResNet-18: the same review quotes "99 and 29" for the fields of the
    paper's ResNet-50 and ResNet-18. With the ImageNet stem every field is
    3 mod 4 (7 px at jump 2, and each later 3x3 or pool adds 2 x jump, a
    multiple of 4), so 29 px is out of reach of any layout and any choice of
    1x1 blocks; it needs the small images' stride-1 3x3 stem. There a
    ResNet-18 that keeps all 16 of its 3x3s sees at least 35 px, while
    keeping two per layer gives exactly 29 px with no max-pool and strides
    1, 2, 2 (or 2, 1, 1). We conclude that the paper's ResNet-18 ran on small
    images (29 / 64 is about 99 / 224: a Tiny-ImageNet-sized view) with the
    same two 3x3s per layer; we could not confirm its image size. On 224 px
    views our RF-ResNet-18 sees 99 px, as RF-ResNet-50 does.

    The stride sits where torchvision puts it: on the 3x3 convolution of a
    Bottleneck (ResNet v1.5; v1 put it on the first 1x1) and on conv1 of a
    BasicBlock; the shortcut's 1x1 convolution takes the same stride. The
    strided convolution is always one that keeps its 3x3. The state_dict
    keeps torchvision's names (plus pool_mlp); the 1x1 convolutions' weights
    are [C_out, C_in, 1, 1].

    max_rf is not part of Fig. 2; we use it only for small images: every 3x3
    convolution that would lift the field above max_rf also becomes a 1x1.
    On a 32 px view no layout of whole 3x3s comes near the paper's ratio
    (ResNet-18 with the small stem: 19 px at least), so the bound does it
    (see `rf_resnet`).

    spatial_convs=None keeps every 3x3 (a torchvision ResNet with Fig. 2's
    strides, for comparison). receptive_field and stride (input pixels per
    feature-map cell) come from `receptive_field(self)`.
    """

    def __init__(self, arch: str, maxpool: bool = False, strides: tuple[int, int, int] = (2, 2, 2),
                 small_stem: bool = False, max_rf: int | None = None, pool_mlp: bool = True,
                 zero_init_residual: bool = False, width: int = 64, spatial_convs: int | None = 2):
        super().__init__(arch, small_stem=small_stem, zero_init_residual=zero_init_residual, width=width)
        strides = tuple(int(s) for s in strides)
        if len(strides) != 3 or min(strides) < 1:
            raise ValueError(f"strides are s', s'', s''' of layer2..layer4, each >= 1; got {strides}")
        if spatial_convs is not None and spatial_convs < 1:
            raise ValueError(f"spatial_convs: the 3x3 convolutions each layer keeps, >= 1 (the strided one "
                             f"among them); got {spatial_convs}")
        self.layout = dict(maxpool=bool(maxpool), strides=strides, small_stem=small_stem, max_rf=max_rf,
                           pool_mlp=pool_mlp, width=width, spatial_convs=spatial_convs)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if maxpool else nn.Identity()
        for layer, s in zip((self.layer2, self.layer3, self.layer4), strides):
            block = layer[0]
            strided = block.conv2 if isinstance(block, torchvision.models.resnet.Bottleneck) else block.conv1
            strided.stride = (s, s)
            if block.downsample is not None:
                block.downsample[0].stride = (s, s)
            block.stride = s
        if spatial_convs is not None:
            self._keep_first_spatial(spatial_convs)
        if max_rf is not None:
            self._cap(max_rf)
        self.receptive_field, self.stride = receptive_field(self)
        c = self.out_dim
        self.pool_mlp = (nn.Sequential(nn.Linear(c, c, bias=False), nn.BatchNorm1d(c), nn.ReLU(inplace=True))
                         if pool_mlp else nn.Identity())

    def _keep_first_spatial(self, count: int) -> None:
        """In every layer, each 3x3 convolution after the first `count` becomes 1x1 (Fig. 2's second block type)."""
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            spatial = [(block, name) for block in layer for name in ("conv1", "conv2", "conv3")
                       if hasattr(block, name) and _kernel_stride(getattr(block, name))[0] > 1]
            for block, name in spatial[count:]:
                setattr(block, name, pointwise_like(getattr(block, name)))

    def _cap(self, max_rf: int) -> None:
        """Walk the main path; a 3x3 convolution that would pass max_rf becomes 1x1."""
        rf, jump = 1, 1
        for owner, name, m in list(main_path(self)):
            k, s = _kernel_stride(m)
            if owner is not self and k > 1 and rf + (k - 1) * jump > max_rf:
                setattr(owner, name, pointwise_like(m))
                k = 1
            rf, jump = rf + (k - 1) * jump, jump * s
        if rf > max_rf:
            raise ValueError(f"the stem alone sees {rf} px, more than max_rf={max_rf}")

    @property
    def load_hint(self) -> str:
        """How to load what export_torchvision writes: a torchvision ResNet
        refuses the 1x1 weights (or, with every 3x3 kept, accepts them and
        computes something else)."""
        lay = self.layout
        kept = ("every 3x3 kept" if lay["spatial_convs"] is None
                else f"{lay['spatial_convs']} 3x3 convolutions per layer")
        capped = f", 3x3 convolutions past {lay['max_rf']} px made 1x1" if lay["max_rf"] else ""
        return (f"not a torchvision architecture (RF-ResNet, receptive field {self.receptive_field} px: max-pool "
                f"{'kept' if lay['maxpool'] else 'removed'}, first-block strides {lay['strides']}, {kept}{capped}); "
                f"load with model.backbones.RFResNetBackbone({self.arch!r}, maxpool={lay['maxpool']}, "
                f"strides={lay['strides']}, small_stem={lay['small_stem']}, max_rf={lay['max_rf']}, "
                f"pool_mlp={lay['pool_mlp']}, width={lay['width']}, spatial_convs={lay['spatial_convs']})"
                f".load_state_dict(sd)")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap, pooled = super().forward(x)   # B x C x h x w (local vectors), B x C
        return fmap, self.pool_mlp(pooled)  # B x C after the MLP


# Fig. 2's parameters for 224 px views, as RFResNetBackbone's docstring derives them: no max-pool,
# first-block strides 2, 2, 2, two 3x3 convolutions per layer. ResNet-50 and ResNet-18 alike: a 99 px
# field and output stride 16 (14 x 14 local vectors on 224 px views).
PAPER_LAYOUT = dict(maxpool=False, strides=(2, 2, 2), spatial_convs=2)
PAPER_RF, PAPER_VIEW = 99, 224


def rf_resnet(arch: str, small_stem: bool = False, view_size: int = 32, **kw) -> RFResNetBackbone:
    """The RF-ResNet for `arch`: PAPER_LAYOUT with the ImageNet stem (99 px);
    with the small stem (images of at most 64 px), PAPER_LAYOUT and a field
    capped at the paper's ratio times the view, floor(99 / 224 * view_size):
    the walk reaches 13 px on 32 px views and 25 px on 64 px views, on
    ResNet-18 and ResNet-50 alike."""
    if small_stem:
        return RFResNetBackbone(arch, small_stem=True, max_rf=PAPER_RF * view_size // PAPER_VIEW,
                                **PAPER_LAYOUT, **kw)
    return RFResNetBackbone(arch, small_stem=False, **PAPER_LAYOUT, **kw)


BACKBONES.update({
    "rf_resnet18": functools.partial(rf_resnet, "resnet18"),
    "rf_resnet50": functools.partial(rf_resnet, "resnet50"),
    "rf_resnet18_quarter": functools.partial(rf_resnet, "resnet18", width=16),  # the CPU profile's, as resnet18_quarter
})

"""Backbones: shapes, strides, memory format, export into torchvision;
receptive fields and CO-SSL's RF-ResNet."""
import itertools

import pytest
import torch
import torch.nn as nn
import torchvision

import model.backbones  # binds `model`, the name load_hint's constructor starts with
from model.backbones import (BACKBONES, PAPER_LAYOUT, PAPER_RF, PAPER_VIEW, RFResNetBackbone,
                             ResNetBackbone, build_backbone, export_torchvision, receptive_field)
from model.heads import MLP, ConvProjector, byol_mlp


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a 2-core machine shared with other jobs, OpenMP
    threads spinning for a busy core made these tiny convolutions 10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("arch,small_stem,size", [
    ("resnet18", True, 32), ("resnet18", False, 64), ("resnet50", True, 32), ("resnet18_half", True, 32),
    ("resnet18_quarter", False, 64)])
def test_shapes_and_stride(arch, small_stem, size):
    torch.manual_seed(0)
    net = build_backbone(arch, small_stem=small_stem)
    assert net.out_dim == {"resnet18": 512, "resnet50": 2048, "resnet18_half": 256, "resnet18_quarter": 128}[arch]
    assert net.stride == (8 if small_stem else 32)
    x = torch.randn(2, 3, size, size).contiguous(memory_format=torch.channels_last)
    fmap, pooled = net(x)
    side = size // net.stride
    assert fmap.shape == (2, net.out_dim, side, side)
    assert pooled.shape == (2, net.out_dim)
    torch.testing.assert_close(pooled, fmap.mean(dim=(2, 3)))


def test_registry_and_unknown_arch():
    assert {"resnet18", "resnet50"} <= set(BACKBONES)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("resnet7")


def test_export_loads_into_torchvision_with_only_fc_missing():
    torch.manual_seed(0)
    net = build_backbone("resnet18")
    sd = export_torchvision(net)
    tv = torchvision.models.resnet18()
    result = tv.load_state_dict(sd, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    # the loaded torchvision net computes the same features
    tv.fc = nn.Identity()
    net.eval(), tv.eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(tv(x), net(x)[1])


def test_export_small_stem_loads_into_a_resnet_with_the_same_stem():
    torch.manual_seed(0)
    net = build_backbone("resnet18", small_stem=True)
    sd = export_torchvision(net)
    assert sd["conv1.weight"].shape == (64, 3, 3, 3)
    tv = torchvision.models.resnet18()
    with pytest.raises(RuntimeError, match="size mismatch"):
        tv.load_state_dict(sd, strict=False)
    tv.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    tv.maxpool = nn.Identity()
    result = tv.load_state_dict(sd, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []


def test_heads():
    mlp = MLP(16, 32, 8, layers=3)
    kinds = [type(m).__name__ for m in mlp]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert mlp[0].bias is None and mlp[-1].bias is not None
    assert [type(m).__name__ for m in MLP(16, 32, 8, bn=False)] == ["Linear", "ReLU", "Linear"]
    # BYOL (Sec. 3.3, App. J; official networks.py): Linear with bias, BN, ReLU, Linear without bias
    byol = byol_mlp(16, 32, 8)
    assert [type(m).__name__ for m in byol] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert byol[0].bias is not None and byol[-1].bias is None and byol[1].affine
    assert (byol[0].in_features, byol[0].out_features, byol[-1].out_features) == (16, 32, 8)
    last = MLP(16, 32, 8, bn_last=True)
    assert isinstance(last[-1], nn.BatchNorm1d) and not last[-1].affine and last[-2].bias is None
    assert mlp(torch.randn(4, 16)).shape == (4, 8)
    head = ConvProjector(16, 32, 8)
    assert head(torch.randn(4, 16, 3, 3)).shape == (4, 8)


@pytest.mark.parametrize("arch, width", [("resnet18_half", 32), ("resnet18_quarter", 16)])
def test_narrow_resnet_scales_every_layer_and_exports_with_its_constructor(arch, width):
    """A narrow ResNet-18: every layer's channels scaled (layer k: width * 2^k),
    torchvision's initialisation (zero-init residual BNs when asked), and an
    export whose load hint says plainly it is not a torchvision architecture
    and names the constructor its weights load into."""
    torch.manual_seed(0)
    net = build_backbone(arch, small_stem=True, zero_init_residual=True)
    assert net.conv1.out_channels == width
    assert [layer[0].conv1.out_channels for layer in (net.layer1, net.layer2, net.layer3, net.layer4)] == \
        [width, 2 * width, 4 * width, 8 * width]
    assert all(float(block.bn2.weight.detach().abs().sum()) == 0 for layer in (net.layer1, net.layer4) for block in layer)
    assert float(net.layer1[0].bn1.weight.detach().min()) == 1.0
    wide = sum(p.numel() for p in build_backbone("resnet18").parameters())
    assert sum(p.numel() for p in net.parameters()) < wide * (width / 64) ** 2 * 1.1  # parameters ~ width^2
    hint = net.load_hint
    assert hint.startswith(f"not a torchvision architecture (resnet18 at width {width})")
    twin = eval(hint.split("load with ", 1)[1].removesuffix(".load_state_dict(sd)"), {"model": model})
    assert isinstance(twin, ResNetBackbone) and twin.width == width
    twin.load_state_dict(export_torchvision(net))  # strict: every key, every shape


# ----------------------------------------------------------------------------- receptive fields
def gradient_window(net: nn.Module, size: int) -> tuple[int, int]:
    """Side (rows, columns) of the input square whose pixels move feature-map
    position (h/2, w/2), measured: positive weights, BN in eval mode (identity
    at initialisation), max-pools as average pools (a max routes its gradient
    to one pixel), so every pixel of the theoretical field gets a non-zero
    gradient and no other pixel can."""
    net.eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.rand_like(m.weight) / m.weight[0].numel())
    for owner in [net, *net.modules()]:
        for name, m in list(owner.named_children()):
            if isinstance(m, nn.MaxPool2d):
                setattr(owner, name, nn.AvgPool2d(m.kernel_size, m.stride, m.padding))
    x = torch.rand(1, 3, size, size, requires_grad=True)
    fmap, _ = net(x)
    fmap[0, :, fmap.shape[2] // 2, fmap.shape[3] // 2].sum().backward()
    hit = x.grad[0].abs().sum(0) > 0
    rows, cols = hit.any(1).nonzero(), hit.any(0).nonzero()
    assert rows.min() > 0 and cols.min() > 0 and rows.max() < size - 1 and cols.max() < size - 1, "window clipped"
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


@pytest.mark.parametrize("arch,small_stem,rf,jump", [("resnet50", False, 427, 32), ("resnet18", False, 435, 32),
                                                     ("resnet18", True, 109, 8)])
def test_receptive_field_of_torchvision_resnets(arch, small_stem, rf, jump):
    """The walk gives the known fields of torchvision's ResNets (stride on the
    3x3: 427 px for ResNet-50, 435 for ResNet-18) and the stride the backbone
    states."""
    net = build_backbone(arch, small_stem=small_stem)
    assert receptive_field(net) == (rf, jump) and net.stride == jump


@pytest.mark.parametrize("arch,small_stem,size", [("rf_resnet18", False, 160), ("rf_resnet50", False, 128),
                                                  ("rf_resnet18", True, 32), ("rf_resnet50", True, 32),
                                                  ("resnet18", True, 128)])
def test_receptive_field_is_the_measured_one(arch, small_stem, size):
    torch.manual_seed(0)
    net = build_backbone(arch, small_stem=small_stem)
    rf, _ = receptive_field(net)
    assert gradient_window(net, size) == (rf, rf)


def _v1(net: RFResNetBackbone) -> RFResNetBackbone:
    """The same layout with ResNet v1's stride placement (He et al. 2016):
    on each Bottleneck's first 1x1 convolution instead of its 3x3."""
    for layer in (net.layer2, net.layer3, net.layer4):
        block = layer[0]
        block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)
    return net


def test_fig2_layouts_of_resnet50():
    """Fig. 2's parameters (max-pool; strides s1, s2, s3 of the first blocks of
    layer2..4) on ResNet-50: no layout reaches the paper's 99 px with either
    stride placement; the nearest is 103 px (torchvision's v1.5: no max-pool,
    1, 2, 1, our PAPER_LAYOUT), then 107 px (v1, same layout); below 99 the
    nearest are 83 (v1) and 79 (v1.5) px (1, 1, 2). On ResNet-18 the same
    layout gives exactly 99 px."""
    fields = {}
    for maxpool, strides in itertools.product((True, False), itertools.product((1, 2), repeat=3)):
        net = RFResNetBackbone("resnet50", maxpool=maxpool, strides=strides, pool_mlp=False)
        fields[maxpool, strides, "v1.5"] = net.receptive_field
        fields[maxpool, strides, "v1"] = receptive_field(_v1(net))[0]
    assert PAPER_RF not in fields.values()
    nearest = min(fields, key=lambda k: (abs(fields[k] - PAPER_RF), k[2] != "v1.5"))
    assert nearest == (PAPER_LAYOUT["maxpool"], PAPER_LAYOUT["strides"], "v1.5") and fields[nearest] == 103
    assert fields[False, (1, 2, 1), "v1"] == 107
    assert max(v for v in fields.values() if v < PAPER_RF) == 83 == fields[False, (1, 1, 2), "v1"]
    assert fields[False, (1, 1, 2), "v1.5"] == 79
    assert fields[True, (2, 2, 2), "v1.5"] == 427                       # the stock layout: torchvision's ResNet-50
    assert build_backbone("rf_resnet18").receptive_field == PAPER_RF


@pytest.mark.parametrize("arch,rf", [("rf_resnet50", 103), ("rf_resnet18", 99)])
def test_rf_resnet_224_layout(arch, rf):
    """ImageNet stem, no max-pool, strides 1, 2, 1: output stride 4 (56 x 56
    local vectors on 224 px views), torchvision's weight shapes unchanged."""
    torch.manual_seed(0)
    net = build_backbone(arch)
    ref = build_backbone(arch[3:])
    assert (net.receptive_field, net.stride, net.out_dim) == (rf, 4, ref.out_dim)
    assert isinstance(net.maxpool, nn.Identity)
    shapes = {k: v.shape for k, v in net.state_dict().items() if not k.startswith("pool_mlp.")}
    assert shapes == {k: v.shape for k, v in ref.state_dict().items()}
    fmap, pooled = net(torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last))
    assert fmap.shape == (2, net.out_dim, 16, 16) and pooled.shape == (2, net.out_dim)


@pytest.mark.parametrize("arch", ["rf_resnet18", "rf_resnet50"])
@pytest.mark.parametrize("view", [16, 32, 64])
def test_small_images_get_a_field_in_proportion_to_the_view(arch, view):
    """Small stem: the field is at most 99/224 of the view and not far below
    (the walk keeps whole 3x3 convolutions), not 29 px on a 32 px view."""
    target = PAPER_RF * view / PAPER_VIEW
    net = build_backbone(arch, small_stem=True, view_size=view)
    assert 0.75 * target <= net.receptive_field <= target
    assert net.stride == 8
    fmap, _ = net(torch.randn(2, 3, view, view))
    assert fmap.shape[-2:] == (view // 8, view // 8)


def test_rf_resnet_export_loads_into_the_constructor_its_hint_names():
    torch.manual_seed(0)
    net = build_backbone("rf_resnet18", small_stem=True, view_size=32)
    sd = export_torchvision(net)
    hint = net.load_hint
    assert hint.startswith("not a torchvision architecture")
    call = hint.split("load with ", 1)[1].removesuffix(".load_state_dict(sd)")
    torch.manual_seed(1)
    twin = eval(call, {"model": model})                                # the constructor the message names
    twin.load_state_dict(sd)                                           # strict: every key, every shape
    x = torch.randn(2, 3, 32, 32)
    net.eval(), twin.eval()
    with torch.no_grad():
        for a, b in zip(net(x), twin(x)):
            torch.testing.assert_close(a, b)
    assert "torchvision.models.resnet18()" in build_backbone("resnet18").load_hint

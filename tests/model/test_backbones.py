"""Backbones: shapes, strides, memory format, export into torchvision."""
import pytest
import torch
import torch.nn as nn
import torchvision

from model.backbones import BACKBONES, ExportError, build_backbone, export_torchvision
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
def test_narrow_resnet_scales_every_layer_and_is_not_exported(arch, width):
    """A narrow ResNet-18: every layer's channels scaled (layer k: width * 2^k),
    torchvision's initialisation (zero-init residual BNs when asked), and an
    export that says plainly it is not a torchvision architecture."""
    torch.manual_seed(0)
    net = build_backbone(arch, small_stem=True, zero_init_residual=True)
    assert net.conv1.out_channels == width
    assert [layer[0].conv1.out_channels for layer in (net.layer1, net.layer2, net.layer3, net.layer4)] == \
        [width, 2 * width, 4 * width, 8 * width]
    assert all(float(block.bn2.weight.abs().sum()) == 0 for layer in (net.layer1, net.layer4) for block in layer)
    assert float(net.layer1[0].bn1.weight.min()) == 1.0
    wide = sum(p.numel() for p in build_backbone("resnet18").parameters())
    assert sum(p.numel() for p in net.parameters()) < wide * (width / 64) ** 2 * 1.1  # parameters ~ width^2
    with pytest.raises(ExportError, match=f"width is {width} channels"):
        export_torchvision(net)

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


@pytest.mark.parametrize("arch,small_stem,size", [("rf_resnet18", False, 160), ("rf_resnet50", False, 160),
                                                  ("rf_resnet18", True, 32), ("rf_resnet50", True, 32),
                                                  ("resnet18", True, 128)])
def test_receptive_field_is_the_measured_one(arch, small_stem, size):
    """The walk's field is the square whose pixels move one feature-map
    position: 99 px for RF-ResNet-50 and RF-ResNet-18 on the ImageNet stem."""
    torch.manual_seed(0)
    net = build_backbone(arch, small_stem=small_stem)
    rf, _ = receptive_field(net)
    assert gradient_window(net, size) == (rf, rf)
    if not small_stem:
        assert rf == PAPER_RF


def fields(arch: str, small_stem: bool, spatial_convs) -> dict:
    """{(max-pool, strides): field} over Fig. 2's 16 layouts, walked on
    networks built on the meta device (shapes only: the walk reads kernels
    and strides)."""
    with torch.device("meta"):
        return {(maxpool, strides): RFResNetBackbone(arch, maxpool=maxpool, strides=strides, small_stem=small_stem,
                                                     spatial_convs=spatial_convs, pool_mlp=False).receptive_field
                for maxpool, strides in itertools.product((True, False), itertools.product((1, 2), repeat=3))}


def test_fig2_layouts_that_give_resnet50_99_px():
    """Two 3x3 convolutions per layer (Fig. 2's reading): exactly two layouts
    give ResNet-50 the paper's 99 px, max-pool with strides 1, 2, 1 and no
    max-pool with 2, 2, 2 (ours); ResNet-18 has the same field in every
    layout. Keeping every 3x3 (the earlier reading) or one per layer reaches
    99 px in none."""
    two = fields("resnet50", False, 2)
    assert sorted(k for k, rf in two.items() if rf == PAPER_RF) == [(False, (2, 2, 2)), (True, (1, 2, 1))]
    assert (PAPER_LAYOUT["maxpool"], PAPER_LAYOUT["strides"], PAPER_LAYOUT["spatial_convs"]) == (False, (2, 2, 2), 2)
    assert fields("resnet18", False, 2) == two
    every, one = fields("resnet50", False, None), fields("resnet50", False, 1)
    assert PAPER_RF not in every.values() and PAPER_RF not in one.values()
    assert every[True, (2, 2, 2)] == 427 and max(one.values()) == 75  # torchvision's ResNet-50; the widest of one


def test_resnet18_29_px_needs_the_small_stem_and_two_3x3_per_layer():
    """The review's 29 px for ResNet-18: with the ImageNet stem every field is
    3 mod 4 (7 px at jump 2, each later 3x3 or pool adds a multiple of 4), so
    no layout reaches 29; with the stride-1 stem a ResNet-18 keeping all 16
    3x3s sees at least 35 px, and keeping two per layer gives exactly 29 px
    with no max-pool and strides 1, 2, 2 or 2, 1, 1 (measured by gradients)."""
    for spatial_convs in (None, 2, 1):
        assert {rf % 4 for rf in fields("resnet18", False, spatial_convs).values()} == {3}
    assert min(fields("resnet18", True, None).values()) == 35
    small = fields("resnet18", True, 2)
    assert sorted(k for k, rf in small.items() if rf == 29) == [(False, (1, 2, 2)), (False, (2, 1, 1))]
    torch.manual_seed(0)
    net = RFResNetBackbone("resnet18", maxpool=False, strides=(1, 2, 2), small_stem=True, pool_mlp=False, width=16)
    assert gradient_window(net, 64) == (29, 29) and net.stride == 4


@pytest.mark.parametrize("arch,spatial", [
    ("rf_resnet50", {f"layer{i}.{b}.conv2" for i in range(1, 5) for b in (0, 1)}),
    ("rf_resnet18", {f"layer{i}.0.conv{c}" for i in range(1, 5) for c in (1, 2)})])
def test_rf_resnet_224_layout(arch, spatial):
    """ImageNet stem, no max-pool, strides 2, 2, 2: output stride 16 (14 x 14
    local vectors on 224 px views). Every layer keeps two 3x3 convolutions
    (ResNet-50: conv2 of its first two blocks; ResNet-18: both of block 1);
    every other 3x3 of torchvision's ResNet is 1x1, and only those weights
    change shape."""
    torch.manual_seed(0)
    net = build_backbone(arch)
    ref = build_backbone(arch[3:])
    assert (net.receptive_field, net.stride, net.out_dim) == (PAPER_RF, 16, ref.out_dim)
    assert isinstance(net.maxpool, nn.Identity)
    kernels = {name: m.kernel_size[0] for name, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    ref_kernels = {name: m.kernel_size[0] for name, m in ref.named_modules() if isinstance(m, nn.Conv2d)}
    assert {name for name, k in kernels.items() if k == 3 and name.startswith("layer")} == spatial
    made_pointwise = {name for name, k in ref_kernels.items() if k == 3 and name.startswith("layer")} - spatial
    assert made_pointwise and all(kernels[name] == 1 for name in made_pointwise)
    sd = {k: v for k, v in net.state_dict().items() if not k.startswith("pool_mlp.")}
    ref_sd = ref.state_dict()
    assert sd.keys() == ref_sd.keys()
    assert {k for k in sd if sd[k].shape != ref_sd[k].shape} == {f"{name}.weight" for name in made_pointwise}
    fmap, pooled = net(torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last))
    assert fmap.shape == (2, net.out_dim, 4, 4) and pooled.shape == (2, net.out_dim)


def count(net: nn.Module, prefix: str = "") -> int:
    return sum(p.numel() for name, p in net.named_parameters() if name.startswith(prefix))


def test_rf_resnet50_parameter_count():
    """RF-ResNet-50 has 23,217,216 parameters (23.2M: 19,018,816 in the
    convolutions and BNs, 4,198,400 in the pool MLP), against ResNet-50's
    23,508,032 without fc: of the readings of Fig. 2 (one, two or every 3x3
    per layer) the nearest to the 23.7M a review of the paper quotes."""
    with torch.device("meta"):  # shapes only: no weights are drawn
        readings = {k: count(RFResNetBackbone("resnet50", spatial_convs=k)) for k in (1, 2, None)}
        net, ref = build_backbone("rf_resnet50"), build_backbone("resnet50")
    assert (count(net), count(net, "pool_mlp."), count(ref)) == (23_217_216, 4_198_400, 23_508_032)
    assert readings == {1: 20_431_936, 2: 23_217_216, None: 27_706_432}
    assert min(readings, key=lambda k: abs(readings[k] - 23.7e6)) == 2


@pytest.mark.parametrize("arch,gmacs,params", [("rf_resnet50", 12.71, 23.22), ("rf_resnet18", 3.61, 5.87),
                                               ("resnet50", 4.09, 23.51)])
def test_cost_per_224_px_view(arch, gmacs, params):
    """The README's cost of a 224 px view: multiply-accumulates of one forward
    pass (torch.utils.flop_counter; MACs = FLOPs / 2), on the meta device, so
    only shapes are computed, and the 14 x 14 map of an RF-ResNet."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        net = build_backbone(arch).eval()
        with FlopCounterMode(display=False) as flops:
            fmap, _ = net(torch.empty(1, 3, 224, 224))
    assert round(flops.get_total_flops() / 2e9, 2) == gmacs and round(count(net) / 1e6, 2) == params
    assert fmap.shape[-1] == 224 // net.stride == (14 if arch.startswith("rf_") else 7)


@pytest.mark.parametrize("arch", ["rf_resnet18", "rf_resnet50"])
@pytest.mark.parametrize("view", [16, 32, 64])
def test_small_images_get_a_field_in_proportion_to_the_view(arch, view):
    """Small stem: the field is at most 99/224 of the view and not far below
    (the walk keeps whole 3x3 convolutions): 7, 13 and 25 px, where Fig. 2's
    layout alone would give 49 px on a 32 px view."""
    target = PAPER_RF * view / PAPER_VIEW
    net = build_backbone(arch, small_stem=True, view_size=view)
    assert 0.75 * target <= net.receptive_field <= target
    assert net.receptive_field == {16: 7, 32: 13, 64: 25}[view]
    assert RFResNetBackbone(arch[3:], small_stem=True, **PAPER_LAYOUT).receptive_field == 49
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

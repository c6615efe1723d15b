"""Every registered method on tiny random Views (resnet18, small stem, 16 px):
the contract, gradients, overfitting one batch, the momentum update."""
import argparse
from pathlib import Path

import pytest
import torch
import yaml

from model.common import Method, copy_as_target
from model.methods import METHODS
from model.optim import build_optimizer
from pipelines.views import ViewSpec, Views

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# Small enough for 2 CPU cores; every other key comes from the method's yaml.
TINY = dict(arch="resnet18", small_stem=True, image_size=16, batch_size=8, queue_size=64,
            proj_hidden=64, pred_hidden=64)
LOOP_KEYS = {"arch", "small_stem", "image_size", "epochs", "batch_size", "optimizer", "lr", "weight_decay",
             "warmup_epochs", "momentum"}


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a 2-core machine shared with other jobs, OpenMP
    threads spinning for a busy core made these tiny convolutions 10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_cfg(name, **over):
    cfg = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    cfg.update({k: v for k, v in TINY.items() if k in cfg or k in LOOP_KEYS})
    cfg.update(over)
    return argparse.Namespace(**cfg)


def make_views(spec: ViewSpec, batch: int, seed: int = 0) -> Views:
    """Random tensors with the shapes of views.py, channels_last like a pipeline's."""
    g = torch.Generator().manual_seed(seed)
    rows = 2 * batch if spec.neighbours else batch  # neighbour rows: image b's neighbour is b + 1, every third none
    crops, boxes = {}, {}
    for c in spec.crops:
        crops[c.name] = torch.randn(c.count, rows, c.size, c.size, 3, generator=g).permute(0, 1, 4, 2, 3)
        boxes[c.name] = torch.rand(c.count, rows, 5, generator=g)
    index = torch.arange(batch)
    views = Views(crops=crops, boxes=boxes, index=index, labels=torch.zeros(rows, dtype=torch.long),
                  source_size=batch)
    if spec.neighbours:
        views.neighbour = torch.where(index % 3 == 0, -1, (index + 1) % batch)
        views.neighbours_found = int((views.neighbour >= 0).sum())
        views.index = torch.cat([index, torch.where(views.neighbour >= 0, views.neighbour, index)])
    if spec.original is not None:
        s = spec.original.size
        views.original = torch.randn(rows, s, s, 3, generator=g).permute(0, 3, 1, 2)
    if spec.mosaic is not None:  # unshifted tiles; tile t of canvas c holds image (c + t) % B (distinct if B >= M)
        m, side, grid = spec.mosaic.crops_per_image, spec.mosaic.crop_size, spec.mosaic.grid
        views.mosaic = torch.randn(batch, side * grid, side * grid, 3, generator=g).permute(0, 3, 1, 2)
        canvas, tile = torch.arange(batch).repeat_interleave(m), torch.arange(m).repeat(batch)  # r = c*M + t
        x0, y0 = tile % grid * side, tile // grid * side
        views.mosaic_rois = torch.stack([canvas, x0, y0, x0 + side, y0 + side], 1).float()
        views.mosaic_src = (canvas + tile) % batch
        views.mosaic_weight = 0.5 + 0.5 * torch.rand(batch * m, generator=g)
    if spec.pairs is not None:  # SCRL: 2 boxes per image, an independent random box in each view
        size, k = spec.family(spec.pairs.family).size, 2
        lo = torch.rand(2, batch * k, 2, generator=g) * size / 2                        # x0, y0 in [0, size/2)
        hi = lo + spec.pairs.min_size + torch.rand(2, batch * k, 2, generator=g) * (size / 2 - spec.pairs.min_size)
        index = torch.arange(batch).repeat_interleave(k).float().expand(2, -1)[..., None]
        views.pair_boxes = torch.cat([index, lo, hi], dim=2)                             # 2 x P x 5
    return views


def build(name, **over):
    torch.manual_seed(0)
    cfg = make_cfg(name, **over)
    method = METHODS[name]
    model = method(cfg).to(memory_format=torch.channels_last)
    return cfg, model, make_views(method.spec(cfg), cfg.batch_size)


def frozen_params(model):
    return [(n, p) for n, p in model.named_parameters() if not p.requires_grad]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_yaml_has_the_loop_keys(name):
    cfg = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    assert LOOP_KEYS <= set(cfg), LOOP_KEYS - set(cfg)
    assert cfg["optimizer"] in ("sgd", "lars")
    assert all(isinstance(cfg[k], float) for k in ("lr", "weight_decay"))  # 1e-4 without a dot is a string in YAML


@pytest.mark.parametrize("name", sorted(METHODS))
def test_contract(name):
    cls = METHODS[name]
    assert cls.name == name
    cfg = make_cfg(name)
    spec = cls.spec(cfg)
    assert isinstance(spec, ViewSpec)
    assert spec.family("global").count == 2 and spec.family("global").size == cfg.image_size
    full = cls.spec(make_cfg(name, image_size=224))
    assert full.family("global").size == 224
    _, model, _ = build(name)
    assert model.backbone.out_dim == 512 and model.backbone.stride == 8
    assert isinstance(model, Method) and callable(model.step_end) and callable(model.epoch_start)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_forward_backward(name):
    cfg, model, views = build(name)
    assert views.crops["global"][0].is_contiguous(memory_format=torch.channels_last)
    loss, metrics = model(views)
    assert loss.dim() == 0 and torch.isfinite(loss)
    for k, v in metrics.items():
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad, k
    loss.backward()
    grads = [p.grad for p in model.backbone.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    for n, p in frozen_params(model):
        assert p.grad is None, n
    opt = build_optimizer(cfg, model, lr=0.1)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for _, p in frozen_params(model)}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_overfits_one_batch(name):
    # queue methods: in-batch negatives, since a queue filled by the same batch holds copies of the positives;
    # shuffling BN in 2 sub-batches of 2 (of 1 sample, a key's BN would erase it on these 2 x 2 maps)
    in_batch = name in ("mocov2", "multicrop", "multicrop_mosrep", "mosrep", "leoclr", "clim")
    cfg, model, views = build(name, batch_size=4, **({"queue_size": 0, "bn_splits": 2} if in_batch else {}))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    losses = []
    for step in range(30):
        loss, _ = model(views)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.step_end((step + 1) / 30)
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses))
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0], losses


@pytest.mark.parametrize("name", sorted(METHODS))
def test_step_end_moves_target_toward_online(name):
    _, model, views = build(name)
    targets = frozen_params(model)
    if not targets:
        model.step_end(0.5)  # methods without a momentum encoder accept the call
        return
    online = dict(model.named_parameters())
    # each frozen parameter mirrors the online parameter of the same name without its prefix
    pairs = []
    for n, p in targets:
        head, rest = n.split(".", 1)
        match = head.split("_", 1)[1] + "." + rest  # key_backbone.x -> backbone.x
        pairs.append((p, online[match]))
    for p, o in pairs:
        assert torch.equal(p, o)  # a copy at the start
    with torch.no_grad():
        for _, o in pairs:
            o.add_(1.0)
    before = [(o - p).norm() for p, o in pairs]
    model.step_end(0.0)
    after = [(o - p).norm() for p, o in pairs]
    assert all(a < b for a, b in zip(after, before))


def test_mocov2_queue_and_symmetry():
    cfg, model, views = build("mocov2", symmetric=True)
    ptr = model.queue.ptr.item()
    model(views)
    assert model.queue.ptr.item() == (ptr + 2 * cfg.batch_size) % cfg.queue_size  # both views' keys
    _, single, views = build("mocov2", symmetric=False)
    single(views)
    assert single.queue.ptr.item() == cfg.batch_size
    single.eval()
    single(views)
    assert single.queue.ptr.item() == cfg.batch_size  # evaluation leaves the queue alone


def test_byol_momentum_schedule():
    _, model, _ = build("byol")
    model.step_end(0.0)
    assert model.tau.item() == pytest.approx(0.996)
    model.step_end(1.0)
    assert model.tau.item() == pytest.approx(1.0)


def test_copy_as_target_is_independent():
    lin = torch.nn.Linear(2, 2)
    t = copy_as_target(lin)
    with torch.no_grad():
        lin.weight.add_(1)
    assert not torch.equal(t.weight, lin.weight)

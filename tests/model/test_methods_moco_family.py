"""multicrop, mosrep, leoclr: their view specs and the invariant each adds to
MoCo v2 (who is paired with whom, who sees which view). The generic tests of
test_methods.py (forward/backward, overfitting, the momentum update) cover
them too. Tiny: resnet18 with the small stem, 16-32 px, batch 4-8."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pipelines
from model.common import info_nce, info_nce_indexed
from model.methods import METHODS
from model.methods import leoclr as leoclr_mod
from model.methods import mocov2 as mocov2_mod
from model.methods import mosrep as mosrep_mod
from model.methods import multicrop as multicrop_mod
from pipelines.views import BYOL_AUG_1, BYOL_AUG_2, MOCOV2_AUG
from tests.model.test_methods import build, make_cfg


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def record(monkeypatch, module, fn_name):
    """Replace module.fn_name by a wrapper that records its arguments."""
    calls, fn = [], getattr(module, fn_name)

    def wrapper(*args, **kw):
        calls.append(args)
        return fn(*args, **kw)
    monkeypatch.setattr(module, fn_name, wrapper)
    return calls


# ----------------------------------------------------------------------------- view specs
@pytest.mark.parametrize("size,local", [(32, 14), (224, 96)])
def test_multicrop_spec(size, local):
    spec = multicrop_mod.MultiCrop.spec(make_cfg("multicrop", image_size=size))
    g, lo = spec.family("global"), spec.family("local")
    assert (g.count, g.size, g.scale) == (2, size, (0.14, 1.0))
    assert (lo.count, lo.size, lo.scale) == (6, local, (0.05, 0.14))
    assert spec.original is None and spec.mosaic is None
    assert [c.name for c in multicrop_mod.MultiCrop.spec(make_cfg("multicrop", local_crops=0)).crops] == ["global"]


@pytest.mark.parametrize("size,tile,jitter", [(32, 16, 7), (224, 112, 48)])
def test_mosrep_spec(size, tile, jitter):
    spec = mosrep_mod.MosRep.spec(make_cfg("mosrep", image_size=size))
    g, m = spec.family("global"), spec.mosaic
    assert (g.count, g.size, g.scale, g.augs) == (2, size, (0.2, 1.0), (MOCOV2_AUG,))
    assert (m.crops_per_image, m.crop_size, m.canvas_size, m.jitter, m.scale) == (4, tile, size, jitter, (0.1, 0.6))
    byol = mosrep_mod.MosRep.spec(make_cfg("mosrep", image_size=size, base="byol"))
    assert byol.family("global").augs == (BYOL_AUG_1, BYOL_AUG_2) and byol.mosaic == m


@pytest.mark.parametrize("size", [32, 224])
def test_leoclr_spec(size):
    spec = leoclr_mod.LeOCLR.spec(make_cfg("leoclr", image_size=size))
    g = spec.family("global")
    assert (g.count, g.size, g.scale) == (2, size, (0.2, 1.0)) and len(spec.crops) == 1
    assert spec.original.size == size and spec.original.aug == MOCOV2_AUG and spec.mosaic is None


@pytest.mark.parametrize("name", ["multicrop", "mosrep", "leoclr"])
def test_planned_views_feed_the_model(name):
    """Views from the real planner (jittered mosaics, original views) through
    the synthetic pipeline run the model."""
    torch.manual_seed(0)
    cfg = make_cfg(name, batch_size=4)
    cls = {"multicrop": multicrop_mod.MultiCrop, "mosrep": mosrep_mod.MosRep, "leoclr": leoclr_mod.LeOCLR}[name]
    source = SimpleNamespace(widths=np.full(8, 40), heights=np.full(8, 30), labels=None)
    views = next(iter(pipelines.build("synthetic", cls.spec(cfg), source, batch_size=4)))
    if name == "mosrep":
        assert views.mosaic.shape == (4, 3, 16, 16) and views.mosaic_rois.shape == (16, 5)
        assert sorted(views.mosaic_src.tolist()) == sorted(list(range(4)) * 4)
    loss, _ = cls(cfg).to(memory_format=torch.channels_last)(views)
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------- multicrop
def test_multicrop_pairs_rows_with_their_images_keys():
    q_other, q_local = torch.randn(4, 8), torch.randn(3 * 4, 8)
    q, target = multicrop_mod.pair_with_keys(q_other, q_local, 4)
    assert torch.equal(q, torch.cat([q_other, q_local]))
    assert target.tolist() == [r % 4 for r in range(16)]  # row j*B + b: image b


def test_multicrop_local_queries_scored_against_own_global_keys(monkeypatch):
    _, model, views = build("multicrop")
    model.eval()  # BN on running statistics: one image's output does not depend on the others
    calls = record(monkeypatch, multicrop_mod, "info_nce")
    model(views)
    (x1, x2), local = views.crops["global"], views.crops["local"]
    n, b = local.shape[:2]
    with torch.no_grad():
        keys = model._key(x1), model._key(x2)
        q_global = model._query(x1), model._query(x2)
        q_local = torch.stack([model._query(local[j]) for j in range(n)])  # N x B x D, one view at a time
    assert len(calls) == 2
    for i, (q, pos, *_) in enumerate(calls):
        assert q.shape[0] == pos.shape[0] == (1 + n) * b
        torch.testing.assert_close(q[:b], q_global[1 - i], atol=1e-4, rtol=1e-4)  # the other global view
        torch.testing.assert_close(q[b:].view(n, b, -1), q_local, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(pos.view(1 + n, b, -1), keys[i].expand(1 + n, b, -1))  # image b -> key b


@pytest.mark.parametrize("size,local", [(32, 16), (224, 112)])
def test_multicrop_mosrep_views_are_mosreps_baseline(size, local):
    """MosRep's baseline views (configs/multicrop_mosrep.yaml): 2 global crops
    of 224 px at scale 0.2-1 (pretrain_moco.sh --global-scale 0.2 1.0) and 4
    local crops of 112 px at 0.1-0.6 (pretrain_mosrep.sh --local-size 112
    --local-scale 0.1 0.6; dataset.py's 4 crops), all MoCo v2's augmentation
    (dataset.py get_standard_transform, get_local_transform)."""
    spec = multicrop_mod.MultiCropMosRep.spec(make_cfg("multicrop_mosrep", image_size=size))
    g, lo = spec.family("global"), spec.family("local")
    assert (g.count, g.size, g.scale, g.augs) == (2, size, (0.2, 1.0), (MOCOV2_AUG,))
    assert (lo.count, lo.size, lo.scale, lo.augs) == (4, local, (0.1, 0.6), (MOCOV2_AUG,))
    assert spec.original is None and spec.mosaic is None


def moco_reference(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MosRep's builder.py MoCo.forward: logits [q.k | q.queue] / T, cross-entropy with the positive at 0."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))


def test_multicrop_mosrep_loss_terms_are_mosreps_baseline(monkeypatch):
    """One direction: view 0 and the 4 local crops are queries, view 1 the
    only key (dataset.py CropsTransform: crops_q, the local queries, crops_k);
    loss = two-view loss + the mean over the local crops (pretrain_ddp.py:
    loss_single + loss_mosaic), each an InfoNCE against the queue as MoCo's
    builder.py computes it; only view 1's keys enter the queue."""
    cfg, model, views = build("multicrop_mosrep")
    assert (cfg.symmetric, cfg.local_reduction, cfg.local_crops) == (False, "added", 4)
    model.eval()  # BN on running statistics: one image's output does not depend on the others
    keyed = record(monkeypatch, multicrop_mod.MultiCrop, "_key")
    calls = record(monkeypatch, multicrop_mod, "info_nce")
    loss, metrics = model(views)
    (x1, x2), local = views.crops["global"], views.crops["local"]
    n, b = local.shape[:2]
    assert len(keyed) == 1 and torch.equal(keyed[0][1], x2)
    with torch.no_grad():
        k2 = model._key(x2)
        q1 = model._query(x1)
        q_local = torch.cat([model._query(local[j]) for j in range(n)])  # row j*B + b: crop j of image b
    assert [c[0].shape[0] for c in calls] == [b, n * b]
    torch.testing.assert_close(calls[0][0], q1, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(calls[1][0], q_local, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(calls[1][1], k2.repeat(n, 1))  # each crop's positive: its image's key of view 1
    queue, t = model.queue.keys, cfg.temperature
    two_view, local_mean = moco_reference(q1, k2, queue, t), moco_reference(q_local, k2.repeat(n, 1), queue, t)
    torch.testing.assert_close(loss, two_view + local_mean, atol=1e-4, rtol=1e-4)
    assert set(metrics) == {"acc", "acc_local"}
    model.train()
    ptr = int(model.queue.ptr)
    keyed.clear()
    model(views)
    assert len(keyed) == 1 and int(model.queue.ptr) == (ptr + b) % cfg.queue_size


@pytest.mark.parametrize("reduction", ["pairs", "added"])
def test_multicrop_one_direction(monkeypatch, reduction):
    """--no-symmetric on multicrop: view 0 and the local views query view 1's
    key alone, whichever the reduction; pairs puts them in one mean."""
    _, model, views = build("multicrop", symmetric=False, local_reduction=reduction)
    keyed = record(monkeypatch, multicrop_mod.MultiCrop, "_key")
    calls = record(monkeypatch, multicrop_mod, "info_nce")
    loss, _ = model(views)
    n, b = views.crops["local"].shape[:2]
    assert len(keyed) == 1 and torch.equal(keyed[0][1], views.crops["global"][1]) and torch.isfinite(loss)
    assert [c[0].shape[0] for c in calls] == ([(1 + n) * b] if reduction == "pairs" else [b, n * b])


def test_multicrop_without_queue_uses_batch_keys():
    _, model, views = build("multicrop", queue_size=0)
    loss, metrics = model(views)
    assert model.queue is None and torch.isfinite(loss) and 0 <= metrics["acc"] <= 1


# ----------------------------------------------------------------------------- mosrep
def test_info_nce_indexed_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    q, k, queue = torch.randn(12, 8, generator=g), torch.randn(4, 8, generator=g), torch.randn(5, 8, generator=g)
    queue = F.normalize(queue, dim=1)
    target, weight = torch.randint(0, 4, (12,), generator=g), torch.rand(12, generator=g)
    loss, acc = info_nce_indexed(q, k, target, queue, 0.2, weight)
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = torch.cat([qn @ kn.T, qn @ queue.T], 1) / 0.2
    want = (-(logits.log_softmax(1)[torch.arange(12), target]) * weight).mean()
    torch.testing.assert_close(loss, want)
    assert acc == (logits.argmax(1) == target).float().mean()
    # queries equal to their source's key (orthogonal keys) find it
    keys = torch.eye(4, 8)
    _, acc = info_nce_indexed(keys[target], keys, target, queue, 0.2)
    assert acc == 1


def test_mosrep_tile_positive_is_its_source_images_key(monkeypatch):
    _, model, views = build("mosrep", symmetric=True)
    model.eval()
    calls = record(monkeypatch, mosrep_mod, "info_nce_indexed")
    model(views)
    x1, x2 = views.crops["global"]
    with torch.no_grad():
        k1, k2 = model._key(x1), model._key(x2)
    two, mos = calls[:2], calls[2:]
    assert len(mos) == 2
    # direction 0: query view 0 against key view 1 (the official pair), then the reverse
    for (_, k, target, *_), want in zip(two, (k2, k1)):
        torch.testing.assert_close(k, want)
        assert target.tolist() == list(range(x1.shape[0]))
    for (q, k, target, _, _, weight), want in zip(mos, (k2, k1)):
        assert q.shape[0] == views.mosaic_src.shape[0]
        torch.testing.assert_close(k, want)                      # the global views' keys, batch order
        assert torch.equal(target, views.mosaic_src)              # RoI r's positive: key of image src[r]
        torch.testing.assert_close(weight, views.mosaic_weight.sqrt())  # official: sqrt(visible fraction)


def test_mosrep_loss_follows_mosaic_src():
    """Reordering the batch's global views changes nothing if mosaic_src is
    remapped along; permuting mosaic_src alone changes the mosaic loss."""
    _, model, views = build("mosrep", zero_init_residual=False)  # zero-init blocks give all keys alike
    model.eval()
    with torch.no_grad():
        _, base = model(views)
        perm = torch.tensor([3, 0, 6, 1, 7, 2, 5, 4])  # new position p holds image perm[p]
        views.crops["global"] = views.crops["global"][:, perm]
        src = views.mosaic_src
        views.mosaic_src = torch.argsort(perm)[src]
        _, moved = model(views)
        torch.testing.assert_close(moved["loss_mos"], base["loss_mos"])
        torch.testing.assert_close(moved["loss_two"], base["loss_two"])
        views.mosaic_src = src
        _, wrong = model(views)
    assert abs(wrong["loss_mos"] - base["loss_mos"]) > 1e-3


def test_mosrep_weights_scale_tiles():
    _, model, views = build("mosrep", symmetric=False)
    model.eval()
    with torch.no_grad():
        views.mosaic_weight = torch.ones_like(views.mosaic_weight)
        _, full = model(views)
        views.mosaic_weight = torch.full_like(views.mosaic_weight, 0.25)
        _, quarter = model(views)
    torch.testing.assert_close(quarter["loss_mos"], full["loss_mos"] * 0.5)  # sqrt(0.25)


def test_mosrep_queue_and_direction():
    cfg, model, views = build("mosrep", symmetric=True)
    model(views)
    assert model.queue.ptr.item() == 2 * cfg.batch_size  # both views' keys
    _, single, views = build("mosrep", symmetric=False)
    single(views)
    assert single.queue.ptr.item() == cfg.batch_size      # official: the key view only


def test_mosrep_byol_base(monkeypatch):
    _, model, views = build("mosrep", base="byol", symmetric=True)
    assert model.queue is None and isinstance(model.predictor, torch.nn.Sequential)
    calls = record(monkeypatch, mosrep_mod, "weighted_regression")
    loss, metrics = model(views)
    loss.backward()
    assert torch.isfinite(loss) and set(metrics) >= {"tau", "loss_two", "loss_mos"}
    assert all(p.grad is not None for p in model.predictor.parameters())
    assert len(calls) == 4  # two directions, then the tiles against both views' targets
    x1, x2 = views.crops["global"]
    z1, z2 = model._key(x1), model._key(x2)  # train-mode BN on the same batch: the same targets
    for (_, z, w), want in zip(calls[2:], (z2, z1)):
        torch.testing.assert_close(z, want[views.mosaic_src], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(w, views.mosaic_weight.sqrt())
    model.step_end(0.0)
    assert model.tau.item() == pytest.approx(0.996)
    model.step_end(1.0)
    assert model.tau.item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="base"):
        build("mosrep", base="simclr")


# ----------------------------------------------------------------------------- leoclr
def test_leoclr_original_to_query_encoder_crops_to_key_encoder():
    _, model, views = build("leoclr", bn_splits=1)  # whole batches through the key encoder (routing only)
    seen = {"query": [], "key": []}
    model.backbone.register_forward_pre_hook(lambda m, a: seen["query"].append(a[0]))
    model.key_backbone.register_forward_pre_hook(lambda m, a: seen["key"].append(a[0]))
    loss, _ = model(views)
    x1, x2 = views.crops["global"]
    assert len(seen["query"]) == 1 and torch.equal(seen["query"][0], views.original)
    assert len(seen["key"]) == 2 and torch.equal(seen["key"][0], x1) and torch.equal(seen["key"][1], x2)
    loss.backward()
    assert all(p.grad is not None for p in model.backbone.parameters())
    assert all(p.grad is None and not p.requires_grad for p in model.key_backbone.parameters())
    assert model.queue.ptr.item() == 2 * views.batch_size  # both crops' keys


def test_leoclr_loss_is_sum_over_both_crops(monkeypatch):
    _, model, views = build("leoclr")
    model.eval()  # leaves the queue as the loss read it
    calls = record(monkeypatch, leoclr_mod, "info_nce")
    loss, _ = model(views)
    assert len(calls) == 2 and calls[0][0] is calls[1][0]  # one query: the original's
    want = sum(info_nce(*c)[0] for c in calls)
    torch.testing.assert_close(loss, want)


def test_leoclr_end_to_end_variant():
    _, model, views = build("leoclr", end_to_end=True)
    assert model.key_backbone is None and model.queue is None
    assert all(p.requires_grad for p in model.parameters())
    seen = []
    model.backbone.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    loss, metrics = model(views)
    loss.backward()
    assert torch.isfinite(loss) and len(seen) == 3 and torch.equal(seen[0], views.original)
    assert all(p.grad is not None for p in model.backbone.parameters())
    model.step_end(0.5)  # nothing to move
    assert math.isfinite(metrics["acc"].item())


# ----------------------------------------------------------------------------- shuffling BN, paper defaults
MOCO_FAMILY = ["mocov2", "multicrop", "multicrop_mosrep", "mosrep", "leoclr", "clim"]


@pytest.mark.parametrize("name", MOCO_FAMILY)
def test_keys_go_through_shuffling_bn(name):
    """Each MoCo-family key is the key encoder under ShuffleBN: per-sub-batch
    BN statistics by default (bn_splits 8 in every yaml), the plain key
    encoder on the whole batch with bn_splits 1."""
    output = 0 if name == "mosrep" else 1
    for splits in (8, 1):
        cfg, model, views = build(name, bn_splits=splits)
        assert model.shuffle_bn.enabled and model.shuffle_bn.splits == splits
        x = views.crops["global"][1]
        with torch.no_grad():
            keys = model._key(x)
            whole = F.normalize(model.key_projector(model.key_backbone(x)[output]).float(), dim=1)
        assert torch.allclose(keys, whole, atol=1e-5) == (splits == 1), splits


@pytest.mark.parametrize("name", ["mocov2", "mosrep"])
def test_single_direction_by_default_symmetric_by_flag(name, monkeypatch):
    """The papers' one direction (view 0 query, view 1 key) unless --symmetric."""
    keyed = record(monkeypatch, mocov2_mod.MoCoV2 if name == "mocov2" else mosrep_mod.MosRep, "_key")
    cfg, model, views = build(name)
    assert cfg.symmetric is False
    model(views)
    x1, x2 = views.crops["global"]
    assert len(keyed) == 1 and torch.equal(keyed[0][1], x2)
    keyed.clear()
    _, model, views = build(name, symmetric=True)
    model(views)
    assert len(keyed) == 2 and torch.equal(keyed[1][1], views.crops["global"][0])


@pytest.mark.parametrize("name", MOCO_FAMILY)
@pytest.mark.parametrize("arch,width", [("resnet18", 512), ("resnet50", 2048)])
def test_moco_head_hidden_width_is_the_backbones(name, arch, width):
    """official builder.py: dim_mlp = fc.weight.shape[1] (MosRep's ConvProjector(2048, dim) on ResNet-50)."""
    cfg = make_cfg(name, arch=arch, proj_hidden=0)
    model = METHODS[name](cfg)
    head = model.projector.mlp if name == "mosrep" else model.projector
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(width, width), (width, cfg.proj_dim)]
    if name == "mosrep":
        assert model.projector.conv[0].out_channels == width

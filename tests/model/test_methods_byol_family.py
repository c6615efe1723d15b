"""SCRL, CLIM and CO-SSL: each method's own invariant (the
generic contract, gradient, overfitting and EMA tests run on them from
test_methods.py, which parametrises over METHODS)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from model.common import info_nce
from model.methods import METHODS
from model.methods.clim import bank_neighbours, cutmix, kmeans, mixed_info_nce
from model.methods.cossl import local_loss_terms

from .test_methods import build, make_cfg


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread (2 shared cores; see test_methods.py)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- specs
@pytest.mark.parametrize("size", [32, 224])
def test_specs_scale_with_image_size(size):
    scrl = METHODS["scrl"].spec(make_cfg("scrl", image_size=size))
    assert scrl.family("global").count == 2 and scrl.family("global").size == size
    assert scrl.family("global").augs[0] != scrl.family("global").augs[1]       # BYOL's asymmetric pair
    assert scrl.pairs is not None and scrl.pairs.family == "global" and scrl.pairs.boxes_per_image == 10
    assert scrl.pairs.min_size == round(32 * size / 224) and scrl.pairs.max_iou == 0.5
    assert "pairs" in scrl.capabilities()
    clim = METHODS["clim"].spec(make_cfg("clim", image_size=size))
    sizes = [c.size for c in clim.crops]
    assert clim.family("global").size == size
    assert sizes[1:] == [max(8, round(s * size / 224)) for s in (192, 160, 128, 96)]
    cossl = METHODS["cossl"].spec(make_cfg("cossl", image_size=size))
    assert [(c.name, c.count, c.size) for c in cossl.crops] == [("global", 2, size)] and cossl.pairs is None


# ----------------------------------------------------------------------------- SCRL
def test_scrl_matched_boxes_coincide_for_identical_views():
    _, model, views = build("scrl")
    x = views.crops["global"][0]
    boxes = views.pair_boxes[0]
    same = torch.stack([boxes, boxes])                       # the same box in both views
    rois = model.rois(same, x.shape[0])
    assert torch.equal(rois[boxes.shape[0]:, 0], boxes[:, 0] + x.shape[0])
    xx = torch.cat([x, x])                                   # view 1 is the same tensor as view 0
    with torch.no_grad():
        online = model.box_embeddings(xx, rois)
        target = model.box_embeddings(xx, rois, target=True)
    p = boxes.shape[0]
    torch.testing.assert_close(online[:p], target[p:])      # box b: online view 0 == target view 1
    torch.testing.assert_close(online[p:], target[:p])
    assert not torch.allclose(online[0], online[1])          # different boxes differ


@pytest.mark.parametrize("pairs", [0, 1])
def test_scrl_too_few_boxes_gives_zero_loss_reaching_every_parameter(pairs):
    _, model, views = build("scrl")
    views.pair_boxes = views.pair_boxes[:, :pairs]
    loss, metrics = model(views)
    assert loss.item() == 0 and metrics["boxes"].item() == pairs
    loss.backward()
    for n, p in model.named_parameters():
        assert not p.requires_grad or p.grad is not None, n


# ----------------------------------------------------------------------------- CLIM
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 40), k=st.integers(1, 6), knn=st.integers(1, 8),
       same=st.booleans(), empty=st.integers(0, 10))
def test_clim_bank_neighbour_is_never_farther_from_the_centre(seed, n, k, knn, same, empty):
    """Over the whole bank: a neighbour is one of the anchor's knn nearest
    filled rows, other than itself, and never farther from the anchor's
    centre than the anchor; empty rows neither get nor give neighbours."""
    g = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(n, 8, generator=g), dim=1)
    filled = torch.ones(n, dtype=torch.bool)
    filled[torch.randperm(n, generator=g)[:min(empty, n - 1)]] = False
    centres = F.normalize(torch.randn(k, 8, generator=g), dim=1)
    table = bank_neighbours(feats, filled, centres, knn, same_cluster=same, generator=g, chunk=7)
    assign = (feats @ centres.T).argmax(1)
    rows = filled.nonzero().squeeze(1)
    sim = (feats @ feats.T).fill_diagonal_(float("-inf"))
    sim[:, ~filled] = float("-inf")
    near = sim.topk(min(knn, len(rows) - 1), dim=1).indices if len(rows) > 1 else None
    assert table.shape == (n,) and (table[~filled] == -1).all()
    for i, j in enumerate(table.tolist()):
        if j < 0:
            continue
        c = centres[assign[i]]
        assert j != i and filled[j] and j in near[i].tolist()
        assert (feats[j] - c).norm() < (feats[i] - c).norm()
        assert not same or assign[j] == assign[i]


def test_clim_bank_selection_finds_the_points_nearer_the_centre():
    centre = F.normalize(torch.tensor([[1.0, 0.0, 0.0]]), dim=1)
    # one cluster along x: points ever farther from its centre (row 4 never filled)
    feats = F.normalize(torch.tensor([[1.0, 0.1, 0.0], [1.0, 0.2, 0.0], [1.0, 0.3, 0.0], [1.0, 0.4, 0.0],
                                      [1.0, 0.0, 0.0]]), dim=1)
    filled = torch.tensor([True, True, True, True, False])
    table = bank_neighbours(feats, filled, centre, knn=3)
    assert table[0] == -1 and table[4] == -1                  # nothing is closer to the centre than point 0
    assert all(0 <= table[i] < i for i in range(1, 4))


def test_clim_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(0)
    axes = torch.eye(4)[:3]
    x = F.normalize(axes.repeat_interleave(20, 0) + 0.05 * torch.randn(60, 4, generator=g), dim=1)
    centres = kmeans(x, 3, 10, torch.Generator().manual_seed(1))
    torch.testing.assert_close(centres.norm(dim=1), torch.ones(3))
    assert sorted((centres @ axes.T).argmax(1).tolist()) == [0, 1, 2]


def test_clim_cutmix_lambda_is_the_anchor_fraction():
    x = torch.arange(4.0)[:, None, None, None].expand(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    other = 10 + x
    has = torch.tensor([True, False, True, True])
    mixed, lam = cutmix(x, other, has, 1.0, np.random.default_rng(0))
    again, lam2 = cutmix(x, other, has, 1.0, np.random.default_rng(0))
    assert torch.equal(mixed, again) and torch.equal(lam, lam2)  # the draws come from the generator alone
    assert mixed.is_contiguous(memory_format=torch.channels_last)
    for i in range(4):
        own = (mixed[i] == i).float().mean()
        torch.testing.assert_close(lam[i], own)
        if not has[i]:
            assert lam[i] == 1
        else:
            assert ((mixed[i] == i) | (mixed[i] == 10 + i)).all()


@pytest.mark.parametrize("with_queue", [True, False])
def test_clim_mixed_loss_without_mixing_is_info_nce(with_queue):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    queue = F.normalize(torch.randn(32, 8, generator=g), dim=1) if with_queue else None
    plain, _ = info_nce(q, k, queue, 0.2)
    mixed = mixed_info_nce(q, k, torch.arange(6), torch.ones(6), queue, 0.2)
    torch.testing.assert_close(mixed, plain)
    # lam = 0.5 towards a neighbour: between the two one-hot losses
    nbr = torch.tensor([1, 0, 3, 2, 5, 4])
    half = mixed_info_nce(q, k, nbr, torch.full((6,), 0.5), queue, 0.2)
    assert torch.isfinite(half)


def test_clim_memory_grows_and_the_table_reloads():
    """The bank holds a row per source image (the host's count, rounded up
    to 1024 rows: no device read to size it)."""
    _, model, views = build("clim")
    views.index = torch.cat([torch.tensor([3, 1500, 7, 9, 11, 13, 15, 17]), views.index[8:]])
    views.source_size = 1501
    model(views)
    assert model.memory.shape[0] == 2048 and int(model.filled.sum()) == 8
    torch.testing.assert_close(model.memory[1500].float().norm(), torch.tensor(1.0), atol=1e-3, rtol=0)
    table = model.neighbour_table(1)
    assert model.centres.shape[0] == 1                       # 8 rows -> min(num_clusters, 8 // 10) -> 1
    assert table.shape == (2048,) and set(np.flatnonzero(table >= 0)) <= {3, 1500, 7, 9, 11, 13, 15, 17}
    assert set(table[table >= 0]) <= {3, 1500, 7, 9, 11, 13, 15, 17}
    model(views)                                             # the bank moves on; the epoch's table stays
    assert np.array_equal(model.neighbour_table(1), table)
    _, fresh, _ = build("clim")
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.memory, model.memory) and torch.equal(fresh.filled, model.filled)
    assert np.array_equal(fresh.neighbour_table(1), table)   # resumed mid-epoch: the same table, not remade
    handed = []
    fresh.epoch_start(1, type("Loader", (), {"set_neighbours": lambda self, t: handed.append(t)})())
    assert len(handed) == 1 and np.array_equal(handed[0], table)  # the loop's hook hands the loader that table
    model.eval()
    model(views)
    assert int(model.filled.sum()) == 8                      # evaluation writes nothing


def test_clim_mixes_each_anchor_with_its_neighbour_row(monkeypatch):
    """The mixed query's partner is row B + b (the neighbour the plan fetched),
    only for anchors that have one; without neighbours there is no mixing."""
    from model.methods import clim as clim_mod
    calls = []
    real = clim_mod.cutmix
    monkeypatch.setattr(clim_mod, "cutmix",
                        lambda x, other, has, *a: calls.append((x, other, has)) or real(x, other, has, *a))
    _, model, views = build("clim")
    loss, metrics = model(views)
    b = views.batch_size
    x, other, has = calls[0]
    assert torch.equal(x, views.crops["global"][0][:b]) and torch.equal(other, views.crops["global"][0][b:])
    assert torch.equal(has, views.neighbour >= 0) and metrics["mixed"] == (views.neighbour >= 0).float().mean()
    views.neighbour, views.neighbours_found = torch.full_like(views.neighbour, -1), 0  # as bookkeeping counts them
    _, metrics = model(views)
    assert len(calls) == 1 and "mix_loss" not in metrics


# ----------------------------------------------------------------------------- CO-SSL
def test_cossl_local_loss_has_one_term_per_position():
    g = torch.Generator().manual_seed(0)
    pred, z = torch.randn(3, 5, 4, 2, generator=g), torch.randn(3, 5, generator=g)
    terms = local_loss_terms(pred, z)
    assert terms.shape == (3, 4, 2)                          # B * h * w terms
    ref = [2 - 2 * F.cosine_similarity(pred[b, :, i, j], z[b], dim=0)
           for b in range(3) for i in range(4) for j in range(2)]
    torch.testing.assert_close(terms.mean(), torch.stack(ref).mean())
    torch.testing.assert_close(local_loss_terms(z, pred), terms)  # a vector predicting a map: the same terms


def test_cossl_total_is_global_plus_weighted_local():
    _, model, views = build("cossl", local_weight=0.5)
    loss, m = model(views)
    torch.testing.assert_close(loss, m["global_loss"] + 0.5 * m["local_loss"])
    torch.testing.assert_close(m["local_loss"], (m["local_to_global"] + m["global_to_local"]) / 2)
    fmap, _ = model.backbone(views.crops["global"][0])
    assert fmap.shape[-2:] == (2, 2)                         # 16 px / stride 8: 4 local terms per image
    loss.backward()
    for head in (model.local_projector, model.local_predictor):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_cossl_local_loss_directions_against_a_reference():
    """Fig. 1: each online local prediction of one view against the target's
    global projection of the other; BYOL's online global prediction of one
    view against each target local projection of the other."""
    _, model, views = build("cossl")
    x1, x2 = views.crops["global"]
    with torch.no_grad():
        _, m = model(views)
        (g1, l1), (g2, l2) = model._online(x1), model._online(x2)
        (z1, zl1), (z2, zl2) = model._target(x1), model._target(x2)

    def ref(pred, target):  # mean over b, i, j of 2 - 2 cos; one side is a vector
        b, d, h, w = (pred if pred.dim() == 4 else target).shape
        p = pred if pred.dim() == 4 else pred[:, :, None, None].expand(b, d, h, w)
        t = target if target.dim() == 4 else target[:, :, None, None].expand(b, d, h, w)
        return (2 - 2 * F.cosine_similarity(p.permute(0, 2, 3, 1).reshape(-1, d),
                                            t.permute(0, 2, 3, 1).reshape(-1, d), dim=1)).mean()
    torch.testing.assert_close(m["local_to_global"], ref(l1, z2) + ref(l2, z1))
    torch.testing.assert_close(m["global_to_local"], ref(g1, zl2) + ref(g2, zl1))


def test_cossl_loss_is_symmetric_in_the_views():
    _, model, views = build("cossl")
    with torch.no_grad():
        _, m = model(views)
        views.crops["global"] = views.crops["global"].flip(0)   # view 1 first
        _, swapped = model(views)
    for k in ("global_loss", "local_to_global", "global_to_local", "local_loss"):
        torch.testing.assert_close(m[k], swapped[k])


def test_cossl_target_local_projector_is_an_ema_copy_without_gradient():
    _, model, views = build("cossl")
    target, online = model.target_local_projector, model.local_projector
    assert all(not p.requires_grad for p in target.parameters())
    for t, o in zip(target.state_dict().values(), online.state_dict().values()):
        torch.testing.assert_close(t, o)                    # a copy at the start
    loss, _ = model(views)
    loss.backward()
    assert all(p.grad is None for p in target.parameters())
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))                     # an online step
    before = [p.clone() for p in target.parameters()]
    model.step_end(0.5)
    tau = float(model.tau)
    assert 0.996 < tau < 1
    for t, b, o in zip(target.parameters(), before, online.parameters()):
        torch.testing.assert_close(t, tau * b + (1 - tau) * o)


def test_cossl_runs_on_the_rf_resnet():
    _, model, views = build("cossl", arch="rf_resnet18")     # 16 px views, small stem
    loss, _ = model(views)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.backbone.receptive_field == model.target_backbone.receptive_field == 7  # floor(99/224 * 16)


# ----------------------------------------------------------------------------- BYOL's heads
@pytest.mark.parametrize("name,over", [("byol", {}), ("scrl", {}), ("cossl", {}), ("mosrep", {"base": "byol"})])
def test_byol_family_heads_are_byols_mlp(name, over):
    """BYOL (App. J, official networks.py): Linear(bias)-BN-ReLU-Linear(no bias),
    hidden proj_hidden / pred_hidden, output proj_dim."""
    cfg, model, _ = build(name, **over)
    heads = [model.predictor] + ([model.projector.mlp] if name == "mosrep" else [model.projector])
    for head in heads:
        assert [type(m).__name__ for m in head] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
        assert head[0].bias is not None and head[-1].bias is None and head[-1].out_features == cfg.proj_dim

"""Shared pieces against hand-written references: losses, EMA, queue, LARS,
and the distributed gathers in a real two-process gloo group."""
import math
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from model.common import (Queue, ShuffleBN, batch_shuffle, batch_unshuffle, byol_loss, concat_all_gather,
                          copy_as_target, cosine_momentum, ema_update, info_nce, nt_xent, roi_features)
from model.optim import LARS, build_optimizer


# ----------------------------------------------------------------------------- losses
def _ce(logits, target):
    """-log softmax(logits)[target] for one row of Python floats."""
    m = max(logits)
    return -(logits[target] - m - math.log(sum(math.exp(v - m) for v in logits)))


def _unit(rows):
    return [[x / math.sqrt(sum(v * v for v in r)) for x in r] for r in rows]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


Q = [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 1.0]]
K = [[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]]
QUEUE = [[0.0, 0.0, 1.0], [0.6, 0.8, 0.0]]


def test_info_nce_with_queue_matches_reference():
    T = 0.2
    q, k = _unit(Q), _unit(K)
    expect = sum(_ce([_dot(q[i], k[i]) / T] + [_dot(q[i], n) / T for n in QUEUE], 0) for i in range(3)) / 3
    loss, acc = info_nce(torch.tensor(Q), torch.tensor(K), torch.tensor(QUEUE), temperature=T)
    assert loss.item() == pytest.approx(expect, rel=1e-5)
    # argmax: row 0 pos .707 vs queue 0/.6 -> right; row 1 pos 1 vs .8 -> right; row 2 pos .577 vs .577/.808 -> wrong
    assert acc.item() == pytest.approx(2 / 3)


def test_info_nce_in_batch_matches_reference():
    T = 0.5
    q, k = _unit(Q), _unit(K)
    expect = sum(_ce([_dot(q[i], k[j]) / T for j in range(3)], i) for i in range(3)) / 3
    loss, _ = info_nce(torch.tensor(Q), torch.tensor(K), None, temperature=T)
    assert loss.item() == pytest.approx(expect, rel=1e-5)


def test_info_nce_gradient_reaches_q_only_and_survives_enqueue():
    q = torch.randn(4, 8, requires_grad=True)
    k = torch.randn(4, 8, requires_grad=True)
    queue = Queue(8, 16)
    loss, _ = info_nce(q, k, queue.keys, 0.2)
    queue.enqueue(F.normalize(k.detach(), dim=1))  # before backward, as MoCoV2 does
    loss.backward()
    assert q.grad is not None and k.grad is None


def test_nt_xent_matches_naive_reference():
    torch.manual_seed(0)
    z1, z2, T = torch.randn(5, 7), torch.randn(5, 7), 0.1
    z = F.normalize(torch.cat([z1, z2]), dim=1).tolist()
    n = 5
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        others = [j for j in range(2 * n) if j != i]
        logits = [_dot(z[i], z[j]) / T for j in others]
        total += _ce(logits, others.index(pos))
    loss, acc = nt_xent(z1, z2, T, return_acc=True)
    assert loss.item() == pytest.approx(total / (2 * n), rel=1e-5)
    assert 0.0 <= acc.item() <= 1.0
    assert torch.equal(nt_xent(z1, z2, T), loss)


def test_byol_loss_known_values_and_stop_gradient():
    p = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 0.0]], requires_grad=True)
    z = torch.tensor([[0.0, 1.0], [2.0, 0.0], [-1.0, 0.0]], requires_grad=True)
    loss = byol_loss(p, z)  # rows: 2 - 0, 2 - 2, 2 + 2 -> mean 2
    assert loss.item() == pytest.approx(2.0)
    loss.backward()
    assert p.grad is not None and z.grad is None


def test_losses_run_in_float32_under_autocast():
    q, k = torch.randn(4, 8), torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = info_nce(q.bfloat16(), k.bfloat16(), torch.randn(16, 8), 0.2)[0]
        b = nt_xent(q.bfloat16(), k.bfloat16(), 0.1)
        c = byol_loss(q.bfloat16(), k.bfloat16())
    assert a.dtype == b.dtype == c.dtype == torch.float32


# ----------------------------------------------------------------------------- momentum encoder, queue
def test_ema_update_math_and_buffers():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    target = copy_as_target(online)
    assert all(not p.requires_grad for p in target.parameters())
    assert all(p.requires_grad for p in online.parameters())
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    online(torch.randn(8, 3))  # moves the BN running stats
    before = [p.clone() for p in target.parameters()]
    ema_update(target, online, 0.9)
    for t, b, o in zip(target.parameters(), before, online.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o)
    for t, o in zip(target.buffers(), online.buffers()):
        assert torch.equal(t, o)
    ema_update(target, online, 0.0)
    for t, o in zip(target.parameters(), online.parameters()):
        torch.testing.assert_close(t, o)


def test_cosine_momentum():
    assert cosine_momentum(0.996, 0.0) == pytest.approx(0.996)
    assert cosine_momentum(0.996, 0.5) == pytest.approx(0.998)
    assert cosine_momentum(0.996, 1.0) == pytest.approx(1.0)


def test_queue_enqueue_wraps_around():
    torch.manual_seed(0)
    q = Queue(dim=4, size=5)
    torch.testing.assert_close(q.keys.norm(dim=1), torch.ones(5))
    a, b = torch.full((3, 4), 1.0), torch.full((3, 4), 2.0)
    q.enqueue(a)
    assert q.ptr.item() == 3
    q.enqueue(b)  # slots 3, 4, then 0
    assert q.ptr.item() == 1
    assert q.keys[:, 0].tolist() == [2.0, 1.0, 1.0, 2.0, 2.0]
    q.enqueue(torch.arange(7.0)[:, None].expand(7, 4))  # more than the queue: the last 5 stay
    assert sorted(q.keys[:, 0].tolist()) == [2.0, 3.0, 4.0, 5.0, 6.0]
    assert set(dict(q.named_buffers())) == {"keys", "ptr"}


def test_roi_features_spatial_scale():
    fmap = torch.arange(16.0).view(1, 1, 4, 4)  # stride 8 -> a 32 px image
    rois = torch.tensor([[0, 0.0, 0.0, 32.0, 32.0], [0, 8.0, 8.0, 16.0, 16.0]])
    out = roi_features(fmap, rois, output_size=1, stride=8, sampling_ratio=2)
    assert out.shape == (2, 1, 1, 1)
    assert out[0].item() == pytest.approx(fmap.mean().item())
    assert out[1].item() == pytest.approx(5.0)  # the cell at (1, 1)


def test_roi_features_backward_under_bf16_autocast_keeps_the_heap():
    """SCRL's case that aborted training (torchvision's CPU roi_align
    backward on a bf16 channels_last map under autocast, 2 threads): run in
    a child process, since heap corruption kills the interpreter."""
    import subprocess
    import sys
    from pathlib import Path
    code = """
import torch
from model.common import roi_features
torch.set_num_threads(2)
torch.manual_seed(0)
fmap = torch.randn(64, 512, 4, 4, requires_grad=True)
g = torch.Generator().manual_seed(1)
xy = torch.rand(2000, 2, generator=g) * 24
rois = torch.cat([torch.randint(0, 64, (2000, 1), generator=g).float(), xy, xy + 2 + torch.rand(2000, 2, generator=g) * 6], 1)
with torch.autocast("cpu", dtype=torch.bfloat16):
    x = fmap.contiguous(memory_format=torch.channels_last).to(torch.bfloat16)
    for _ in range(3):
        out = roi_features(x, rois, 1, 8, sampling_ratio=-1, aligned=False)
        out.float().sum().backward()
assert out.dtype == torch.float32 and out.shape == (2000, 512, 1, 1)
print("ok", float(fmap.grad.abs().sum()) > 0)
"""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok True" in proc.stdout, proc.stderr[-500:]


# ----------------------------------------------------------------------------- optimizer
def test_lars_step_matches_formula_and_excludes_1d():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3, 4))
    b = nn.Parameter(torch.randn(4))
    gw, gb = torch.randn(3, 4), torch.randn(4)
    lr, wd, mom, eta = 0.5, 0.01, 0.9, 0.001
    opt = LARS([w, b], lr=lr, weight_decay=wd, momentum=mom, trust_coefficient=eta)
    w0, b0 = w.detach().clone(), b.detach().clone()
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    d = gw + wd * w0
    mu_w = eta * w0.norm() / d.norm() * d
    torch.testing.assert_close(w.detach(), w0 - lr * mu_w)
    torch.testing.assert_close(b.detach(), b0 - lr * gb)  # no decay, no trust ratio
    # second step: momentum buffers
    w1, b1 = w.detach().clone(), b.detach().clone()
    opt.step()
    d = gw + wd * w1
    mu_w = mom * mu_w + eta * w1.norm() / d.norm() * d
    torch.testing.assert_close(w.detach(), w1 - lr * mu_w)
    torch.testing.assert_close(b.detach(), b1 - lr * (mom * gb + gb))


def test_lars_zero_weight_uses_plain_gradient():
    w = nn.Parameter(torch.zeros(2, 2))
    w.grad = torch.ones(2, 2)
    LARS([w], lr=1.0, weight_decay=0.0, momentum=0.0).step()
    torch.testing.assert_close(w.detach(), -torch.ones(2, 2))


def test_build_optimizer_groups():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    frozen = copy_as_target(nn.Linear(3, 3))
    model.add_module("frozen", frozen)
    cfg = types.SimpleNamespace(optimizer="lars", weight_decay=1e-6, momentum=0.9)
    opt = build_optimizer(cfg, model, lr=0.1)
    assert isinstance(opt, LARS)
    decay, no_decay = opt.param_groups
    assert {p.ndim for p in decay["params"]} == {2} and len(decay["params"]) == 2
    assert no_decay["weight_decay"] == 0.0 and no_decay["lars_exclude"] and len(no_decay["params"]) == 4
    everything = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not everything & {id(p) for p in frozen.parameters()}
    sgd = build_optimizer(types.SimpleNamespace(optimizer="sgd", weight_decay=1e-4, momentum=0.9), model, 0.03)
    assert isinstance(sgd, torch.optim.SGD) and len(sgd.param_groups[0]["params"]) == 6
    with pytest.raises(ValueError):
        build_optimizer(types.SimpleNamespace(optimizer="adamw", weight_decay=0.0), model, 0.1)


# ----------------------------------------------------------------------------- shuffling BN
def _key_encoder():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 6), nn.BatchNorm1d(6)).train()


@pytest.mark.parametrize("batch,splits,subs", [(16, 4, 4), (16, 8, 8), (10, 3, 3), (4, 8, 2), (3, 8, 1)])
def test_shuffle_bn_equals_per_sub_batch_reference_after_unshuffle(batch, splits, subs):
    """One process: keys = the encoder on each sub-batch of the shuffled batch
    (each BN with that sub-batch's statistics), put back in batch order; a
    small batch gets fewer sub-batches, none under 2 samples."""
    enc = _key_encoder()
    x = torch.randn(batch, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    shuffle = ShuffleBN(True, splits, seed=7)
    with torch.no_grad():
        keys = shuffle(enc, x)
        perm = torch.randperm(batch, generator=torch.Generator().manual_seed(7 * 1_000_003))
        ref = torch.cat([enc(sub) for sub in x[perm].tensor_split(subs)])[torch.argsort(perm)]
        whole = enc(x)
    assert torch.allclose(keys, ref, atol=1e-6)
    assert torch.allclose(keys, whole, atol=1e-3) == (subs == 1)  # BN statistics of sub-batches, not of the batch
    assert shuffle.draws == 1


def test_shuffle_bn_off_is_the_plain_encoder_and_draws_resume():
    enc, x = _key_encoder(), torch.randn(12, 3, 6, 6)
    with torch.no_grad():
        whole = enc(x)
        assert torch.equal(ShuffleBN(True, 1)(enc, x), whole)        # --bn-splits 1: the old behaviour
        assert torch.equal(ShuffleBN(False, 8)(enc, x), whole)       # --no-shuffle-bn
        a = ShuffleBN(True, 4, seed=3)
        a(enc, x)
        b = ShuffleBN(True, 4, seed=3)
        b.load_state_dict(a.state_dict())                            # a resumed run draws what comes next
        assert b.draws == 1 and torch.equal(a(enc, x), b(enc, x))
        assert not torch.equal(ShuffleBN(True, 4, seed=3)(enc, x), b(enc, x))  # a fresh draw differs


# ----------------------------------------------------------------------------- distributed (2 gloo ranks)
def _dist_worker(rank, world, init_file, q):
    try:
        _dist_checks(rank, world, init_file, q)
    except BaseException as e:  # report instead of leaving the parent waiting
        q.put((rank, {"error": repr(e)}))
        raise


def _dist_checks(rank, world, init_file, q):
    torch.manual_seed(0)  # every rank makes the same global data, then takes its slice
    n, d = 3, 5
    z1_all, z2_all = torch.randn(world * n, d), torch.randn(world * n, d)
    w = torch.randn(d, d)
    # references: one process holding the global batch (computed before the group exists)
    wg = w.clone().requires_grad_(True)
    ref_nt = nt_xent(z1_all @ wg, z2_all @ wg, 0.2)
    ref_nt.backward()
    ref_info = info_nce(z1_all, z2_all, None, 0.2)[0]

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sl = slice(rank * n, (rank + 1) * n)
        # nt_xent across ranks == the global batch in one process (loss, and gradient after DDP's averaging)
        wl = w.clone().requires_grad_(True)
        loss = nt_xent(z1_all[sl] @ wl, z2_all[sl] @ wl, 0.2)
        loss.backward()
        dist.all_reduce(wl.grad)
        loss_sum = loss.detach().clone()
        dist.all_reduce(loss_sum)
        ok = {"nt_xent_loss": torch.allclose(loss_sum / world, ref_nt.detach(), atol=1e-6),
              "nt_xent_grad": torch.allclose(wl.grad / world, wg.grad, atol=1e-6)}
        # info_nce without queue: negatives are the keys of the whole global batch
        loss, _ = info_nce(z1_all[sl], z2_all[sl], None, 0.2)
        loss_sum = loss.detach().clone()
        dist.all_reduce(loss_sum)
        ok["info_nce"] = torch.allclose(loss_sum / world, ref_info, atol=1e-6)
        # gathers, the queue, and shuffling BN's round trip
        ok["gather"] = torch.equal(concat_all_gather(z1_all[sl]), z1_all)
        queue = Queue(d, 8)
        queue.enqueue(z1_all[sl])
        ok["queue"] = torch.equal(queue.keys[:world * n], z1_all) and queue.ptr.item() == world * n
        x_all = torch.arange(float(world * n * 2)).view(world * n, 2)
        x = x_all[sl]
        perm = torch.randperm(world * n, generator=torch.Generator().manual_seed(5))  # the same on both ranks
        shuffled, undo = batch_shuffle(x, perm)
        ok["shuffle"] = torch.equal(shuffled, x_all[perm[sl]]) and torch.equal(batch_unshuffle(shuffled, undo), x)
        # ShuffleBN under DDP: the cross-rank shuffle (no sub-batches), keys back in this rank's order
        seen = []
        keys = ShuffleBN(True, 8, seed=2)(lambda v: seen.append(v) or v * 3, x)
        perm = torch.randperm(world * n, generator=torch.Generator().manual_seed(2 * 1_000_003))
        ok["shuffle_bn"] = (len(seen) == 1 and torch.equal(seen[0], x_all[perm[sl]]) and torch.equal(keys, x * 3))
        q.put((rank, ok))
    finally:
        dist.destroy_process_group()


def test_distributed_gathers_two_ranks(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_dist_worker, args=(r, 2, str(tmp_path / "init"), q)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        rank, ok = q.get(timeout=120)
        results[rank] = ok
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank, ok in results.items():
        assert all(ok.values()), (rank, ok)

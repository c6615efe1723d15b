"""model/evaluation.py: the kNN classifier against a brute-force reference and
a hand-computed example, feature extraction in dataset order, BatchNorm
calibration, the random-init anchor, and the linear probe."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import evaluation
from model.evaluation import knn_accuracy, knn_predict


# ----------------------------------------------------------------------------- kNN
def _knn_reference(features, bank, bank_labels, num_classes, k, t):
    features, bank = F.normalize(features, dim=1), F.normalize(bank, dim=1)
    out = []
    for f in features:
        sims = sorted(((float(f @ b), int(y)) for b, y in zip(bank, bank_labels)), key=lambda s: -s[0])[:k]
        score = [0.0] * num_classes
        for s, y in sims:
            score[y] += math.exp(s / t)
        out.append(max(range(num_classes), key=lambda c: (score[c], -c)))
    return torch.tensor(out)


def test_knn_separable_and_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(4, 16) * 5
    bank_labels = torch.arange(40) % 4
    bank = centers[bank_labels] + 0.3 * torch.randn(40, 16, generator=g)
    labels = torch.arange(12) % 4
    feats = centers[labels] + 0.3 * torch.randn(12, 16, generator=g)
    assert knn_accuracy(feats, labels, bank, bank_labels, num_classes=4, k=5) == 1.0
    noisy = torch.randn(30, 16, generator=g)
    for k in (1, 7, 200):
        ref = _knn_reference(noisy, bank, bank_labels, 4, k, 0.1)
        assert torch.equal(knn_predict(noisy, bank, bank_labels, 4, k=k, temperature=0.1), ref)
        assert torch.equal(knn_predict(noisy, bank, bank_labels, 4, k=k, temperature=0.1, chunk_size=4), ref)


def test_knn_hand_computed_example():
    """Two classes on the unit circle, k = 2, T = 1. The query at 0 degrees has
    its two nearest bank samples at 10 degrees (class 0, cos 0.985) and at 20
    degrees (class 1, cos 0.940): votes e^0.985 > e^0.940, so class 0 wins,
    though class 1 holds more of the bank. With k = 3 the third neighbour
    (30 degrees, class 1, cos 0.866) adds e^0.866 to class 1, which then wins."""
    def at(deg):
        return torch.tensor([[math.cos(math.radians(deg)), math.sin(math.radians(deg))]])
    bank = torch.cat([at(10), at(20), at(30), at(180)])
    bank_labels = torch.tensor([0, 1, 1, 0])
    query = at(0)
    assert math.exp(math.cos(math.radians(10))) > math.exp(math.cos(math.radians(20)))
    assert knn_predict(query, bank, bank_labels, 2, k=2, temperature=1.0).tolist() == [0]
    assert knn_predict(query, bank, bank_labels, 2, k=3, temperature=1.0).tolist() == [1]
    assert knn_accuracy(query, torch.tensor([1]), bank, bank_labels, 2, k=3, temperature=1.0) == 1.0


# ----------------------------------------------------------------------------- features, anchors
@pytest.fixture
def splits(labelled_folder):
    from pipelines.data import open_source
    return open_source(str(labelled_folder), "train", progress=False), \
        open_source(str(labelled_folder), "test", progress=False)


def _backbone():
    from model.backbones import build_backbone
    torch.manual_seed(0)
    return build_backbone("resnet18_quarter", small_stem=True)


def test_features_are_in_dataset_order_and_normalised(splits):
    train, _ = splits
    net = _backbone()
    feats, labels = evaluation.extract_features(net, train, 16, "cpu", "fp32", workers=0)
    assert feats.shape == (len(train), net.out_dim) and torch.equal(labels, torch.as_tensor(train.labels))
    assert torch.allclose(feats.norm(dim=1), torch.ones(len(train)), atol=1e-5)
    one = train.__class__(**{**train.__dict__, "paths": train.paths[5:6], "labels": train.labels[5:6],
                             "widths": train.widths[5:6], "heights": train.heights[5:6]})
    alone, _ = evaluation.extract_features(net, one, 16, "cpu", "fp32", workers=0)
    assert torch.allclose(alone[0], feats[5], atol=1e-5)  # eval mode: a sample's features do not depend on its batch


def test_raw_pixels_separate_the_colour_coded_classes(splits):
    train, test = splits
    acc = evaluation.knn_of_features(lambda s: evaluation.pixel_features(s, 16, "cpu", 0), train, test, 200, 0.1)
    assert acc > 0.9


def test_calibration_sets_the_data_batchnorm_statistics(splits):
    """After calibration every BN's running mean is the exact mean of its
    input over the images (here: the first BN, whose input is conv1's output)."""
    from pipelines.evaluation import eval_batches
    train, _ = splits
    net = _backbone()
    weights = net.conv1.weight.clone()
    evaluation.calibrate_batchnorm(net, train, 16, "cpu", 0, "fp32")
    x = torch.cat([b for b, _ in eval_batches(train, 16, 256, "cpu", 0)])
    with torch.no_grad():
        want = net.conv1(x).mean(dim=(0, 2, 3))
    assert not net.training and torch.equal(net.conv1.weight, weights)
    assert torch.allclose(net.bn1.running_mean, want, atol=1e-4)
    assert not torch.allclose(net.bn1.running_var, torch.ones_like(net.bn1.running_var))


def test_anchor_calibrates_a_copy_and_equals_the_monitor_on_it(splits):
    train, test = splits
    net = _backbone()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    anchor = evaluation.random_init_anchor(net, train, test, 16, "cpu", "fp32", workers=0, k=10)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the backbone is left alone
    calibrated = evaluation.calibrate_batchnorm(_backbone(), train, 16, "cpu", 0, "fp32")
    assert anchor == evaluation.knn_top1(calibrated, train, test, 16, "cpu", "fp32", 0, k=10)
    assert 0.0 <= anchor <= 1.0


def test_anchor_from_log_reads_the_first_record(tmp_path):
    log = tmp_path / "log.jsonl"
    assert evaluation.anchor_from_log(log) is None
    log.write_text('{"step": 0, "loss": 1.0}\n{"step": 0, "knn_random": 0.625}\n'
                   '{"step": 9, "knn_top1": 0.7, "knn_random": 0.625}\n')
    assert evaluation.anchor_from_log(log) == 0.625


def test_knn_line_shows_the_gain():
    assert evaluation.knn_line(3, 0.712, 0.65, 200, 0.1) == \
        "epoch 3: kNN top-1 71.20% (random init 65.00%, +6.20; k=200, T=0.1)"
    assert evaluation.knn_line(0, 0.5, None, 20, 0.1) == "epoch 0: kNN top-1 50.00% (k=20, T=0.1)"


# ----------------------------------------------------------------------------- linear probe
def test_linear_probe_separates_separable_features():
    """Three classes in tight clusters around orthogonal centres (a margin of
    several noise widths): a linear classifier separates them exactly."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    x = 4 * torch.eye(3, 8)[y] + 0.3 * torch.randn(300, 8, generator=g)
    acc = evaluation.probe_features(x[:200], y[:200], x[200:], y[200:], 3, max_iter=100)
    assert acc == 1.0


def test_linear_probe_on_a_backbone(splits):
    train, test = splits
    acc = evaluation.linear_probe(_backbone(), train, test, 16, "cpu", "fp32", workers=0, max_iter=20)
    assert 0.0 <= acc <= 1.0


def test_feature_rows_put_batches_in_dataset_order_in_place():
    import types
    source = types.SimpleNamespace(labels=np.array([3, 1, 4, 1, 5, 9, 2]))
    feats = torch.randn(7, 5)
    rows = evaluation.FeatureRows(source)
    for idx in ([6, 0], [3], [5, 1, 2], [4]):  # any order, as ranks and workers deliver them
        rows.add(feats[idx], torch.tensor(idx))
    bank, labels = rows.result()
    assert torch.equal(bank, feats) and torch.equal(labels, torch.as_tensor(source.labels))


def test_knn_scales_by_the_bank_norms_as_if_the_bank_were_normalised():
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(300, 16, generator=g), torch.randn(40, 16, generator=g)
    labels = torch.randint(0, 5, (300,), generator=g)
    scaled = bank * torch.rand(300, 1, generator=g).add(0.1) * 7  # same directions, other lengths
    unit = torch.nn.functional.normalize(bank, dim=1)
    assert torch.equal(evaluation.knn_predict(queries, scaled, labels, 5, k=20),
                       evaluation.knn_predict(queries, unit, labels, 5, k=20))

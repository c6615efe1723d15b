"""Evaluation of a backbone on frozen features, shared by train.py and bench/quality.py.

    feats, labels = extract_features(backbone, source, image_size=32, device="cpu")
    acc = knn_top1(backbone, bank_src, query_src, image_size=32, device="cpu")       # the monitor
    anchor = random_init_anchor(fresh_backbone, bank_src, query_src, 32, "cpu")      # what learning must beat
    acc = linear_probe(backbone, train_src, test_src, image_size=32, device="cpu")

Features are the backbone's pooled output of unaugmented images
(pipelines.evaluation.eval_batches: resize, centre crop, normalise),
L2-normalised, in dataset order.

kNN: the weighted k-nearest-neighbour classifier of Wu et al. 2018
("Unsupervised Feature Learning via Non-Parametric Instance Discrimination",
Sec. 3.4; the MoCo CIFAR demo's knn_predict): each of the k most
cosine-similar bank samples votes for its label with weight exp(sim / T),
and the class with the largest sum wins.

The random-init anchor: the same backbone untrained, with its BatchNorm
statistics estimated on the bank images. A fresh network's eval-mode BN is
the identity (mean 0, variance 1), which is not the network a trained run
evaluates, so only the weights differ between the anchor and a trained
backbone. A method has learned when its kNN is above this anchor.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

class EvaluationError(Exception):
    """Evaluation asked of data that cannot give it: one line, exit code 2."""


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EVAL_BATCH = 256


def autocast(device, amp: str):
    """torch.autocast for `amp` ('bf16', 'fp16', 'fp32': off) on `device`."""
    return torch.autocast(torch.device(device).type, dtype=AMP_DTYPES[amp], enabled=amp != "fp32")


# ----------------------------------------------------------------------------- kNN classifier
@torch.no_grad()
def knn_predict(features: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
                k: int = 200, temperature: float = 0.1, chunk_size: int | None = None) -> torch.Tensor:
    """features [N, D], bank [M, D], bank_labels [M] -> predicted labels [N].

    Rows are L2-normalised here. Queries go in chunks so that a chunk's
    similarity matrix holds at most 2^26 entries (256 MB in float32)
    unless chunk_size says otherwise."""
    features = F.normalize(features.float(), dim=1)
    bank = bank.to(features.device, torch.float32)
    # The bank's norms scale each similarity column instead of a normalised
    # copy of the bank: at 1.28M x 2048 features a copy is 10.5 GB more.
    inverse_norms = 1.0 / torch.linalg.vector_norm(bank, dim=1).clamp_min(1e-12)
    bank_labels = bank_labels.to(features.device, torch.long)
    k = min(k, bank.shape[0])
    chunk = chunk_size or max(1, 2 ** 26 // max(1, bank.shape[0]))
    preds = []
    for start in range(0, features.shape[0], chunk):
        sim = (features[start:start + chunk] @ bank.T).mul_(inverse_norms)  # n x M
        weight, idx = sim.topk(k, dim=1)                                   # n x k
        scores = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        scores.scatter_add_(1, bank_labels[idx], (weight / temperature).exp())  # n x classes
        preds.append(scores.argmax(dim=1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=features.device)


def knn_accuracy(features: torch.Tensor, labels: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
                 num_classes: int, k: int = 200, temperature: float = 0.1) -> float:
    """Top-1 accuracy in [0, 1] of knn_predict on labelled features."""
    pred = knn_predict(features, bank, bank_labels, num_classes, k=k, temperature=temperature)
    return (pred.cpu() == labels.cpu().long()).float().mean().item()


# ----------------------------------------------------------------------------- features
class FeatureRows:
    """Per-sample features written straight into one [N, D] tensor at their
    dataset indices, as batches arrive: no list of batches joined and then
    reordered, each a whole copy (10.5 GB apiece at 1.28M x 2048 float32).
    Under DDP each rank keeps its own batches, and every rank's are gathered
    into the tensor at the end."""

    def __init__(self, source, world: int = 1):
        self.n, self.world, self.rows, self.own = len(source.labels), world, None, []
        self.labels = torch.as_tensor(source.labels)

    def add(self, features: torch.Tensor, indices: torch.Tensor) -> None:
        if self.world > 1:
            self.own.append((features, indices))
        else:
            self._write(features, indices)

    def _write(self, features: torch.Tensor, indices: torch.Tensor) -> None:
        if self.rows is None:
            self.rows = torch.empty(self.n, features.shape[1], dtype=features.dtype)
        self.rows[indices] = features

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [N, D], labels [N]) in dataset order."""
        if self.world > 1:
            mine = (torch.cat([f for f, _ in self.own]), torch.cat([i for _, i in self.own]))
            self.own = []
            parts = [None] * self.world
            dist.all_gather_object(parts, mine)
            del mine
            for features, indices in parts:
                self._write(features, indices)
        return self.rows, self.labels


@torch.no_grad()
def extract_features(backbone, source, image_size: int, device, amp: str = "bf16", workers: int = 2,
                     rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised pooled features of every sample of `source` (each rank
    extracts its share; all ranks get all of them), and the labels."""
    from pipelines.evaluation import eval_batches
    was_training = backbone.training
    backbone.eval()
    rows = FeatureRows(source, world)
    with autocast(device, amp):
        for x, idx in eval_batches(source, image_size, EVAL_BATCH, device, workers, rank, world):
            _, pooled = backbone(x.contiguous(memory_format=torch.channels_last))
            rows.add(F.normalize(pooled.float(), dim=1).cpu(), idx)
    backbone.train(was_training)
    return rows.result()


@torch.no_grad()
def pixel_features(source, image_size: int, device, workers: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval images themselves (normalised, image_size px) as vectors: the raw-pixel anchor."""
    from pipelines.evaluation import eval_batches
    rows = FeatureRows(source)
    for x, idx in eval_batches(source, image_size, EVAL_BATCH, device, workers):
        rows.add(x.flatten(1).float().cpu(), idx)
    return rows.result()


def knn_of_features(features_of, bank_src, query_src, k: int = 200, temperature: float = 0.1) -> float:
    """kNN top-1 of the features `features_of(source)` gives, the queries against the bank."""
    bank, bank_labels = features_of(bank_src)
    feats, labels = features_of(query_src)
    return knn_accuracy(feats, labels, bank, bank_labels, num_classes=len(bank_src.classes), k=k,
                        temperature=temperature)


def knn_top1(backbone, bank_src, query_src, image_size: int, device, amp: str = "bf16", workers: int = 2,
             k: int = 200, temperature: float = 0.1, rank: int = 0, world: int = 1) -> float:
    """The kNN monitor: the backbone's features of the queries against those of the bank."""
    return knn_of_features(lambda src: extract_features(backbone, src, image_size, device, amp, workers, rank, world),
                           bank_src, query_src, k, temperature)


# ----------------------------------------------------------------------------- the random-init anchor
@torch.no_grad()
def calibrate_batchnorm(backbone, source, image_size: int, device, workers: int = 2, amp: str = "bf16"):
    """Every BatchNorm's running mean and variance := the exact average over
    `source`'s unaugmented images (momentum None), weights untouched; in place.
    Every rank reads all of `source`, so the statistics agree across ranks."""
    from pipelines.evaluation import eval_batches
    bns = [m for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    backbone.train()
    with autocast(device, amp):
        for x, _ in eval_batches(source, image_size, EVAL_BATCH, device, workers):
            backbone(x.contiguous(memory_format=torch.channels_last))
    backbone.eval()
    return backbone


def random_init_anchor(fresh_backbone, bank_src, query_src, image_size: int, device, amp: str = "bf16",
                       workers: int = 2, k: int = 200, temperature: float = 0.1, rank: int = 0,
                       world: int = 1) -> float:
    """kNN top-1 of an untrained backbone with its BN statistics estimated on
    the bank (a copy is calibrated; `fresh_backbone` is left as it is)."""
    net = copy.deepcopy(fresh_backbone)
    calibrate_batchnorm(net, bank_src, image_size, device, workers, amp)
    return knn_top1(net, bank_src, query_src, image_size, device, amp, workers, k, temperature, rank, world)


def anchor_from_log(log_path: Path) -> float | None:
    """The random-init anchor a run logged (its first `knn_random` record), or None."""
    try:
        with open(log_path) as f:
            for line in f:
                record = json.loads(line)
                if "knn_random" in record:
                    return float(record["knn_random"])
    except (OSError, ValueError):
        return None
    return None


def knn_line(epoch: int, acc: float, anchor: float | None, k: int, temperature: float) -> str:
    """'epoch 3: kNN top-1 71.20% (random init 65.00%, +6.20; k=200, T=0.1)'."""
    gain = f"random init {anchor * 100:.2f}%, {(acc - anchor) * 100:+.2f}; " if anchor is not None else ""
    return f"epoch {epoch}: kNN top-1 {acc * 100:.2f}% ({gain}k={k}, T={temperature:g})"


# ----------------------------------------------------------------------------- linear probe
def linear_probe(backbone, train_src, test_src, image_size: int, device, amp: str = "bf16", workers: int = 2,
                 max_iter: int = 100, weight_decay: float = 1e-4) -> float:
    """Top-1 of a logistic regression on frozen, unaugmented features
    (full batch, L-BFGS with strong-Wolfe line search, L2 penalty)."""
    xtr, ytr = extract_features(backbone, train_src, image_size, device, amp, workers)
    xte, yte = extract_features(backbone, test_src, image_size, device, amp, workers)
    return probe_features(xtr, ytr, xte, yte, len(train_src.classes), max_iter, weight_decay)


def probe_features(xtr, ytr, xte, yte, num_classes: int, max_iter: int = 100, weight_decay: float = 1e-4) -> float:
    """The linear probe on given features: fit on (xtr, ytr), top-1 on (xte, yte)."""
    head = torch.nn.Linear(xtr.shape[1], num_classes)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(xtr), ytr) + weight_decay * head.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (head(xte).argmax(1) == yte).float().mean().item()


def evaluate_checkpoint(cfg, model, ckpt, run_dir: Path, train_src, test_src, device, log=print) -> float:
    """train.py --eval linear: the linear probe of the run's backbone on frozen
    features (cfg.linear_epochs L-BFGS iterations); written to run_dir/eval.json."""
    if test_src is None or not train_src.has_labels:
        raise EvaluationError("linear evaluation needs a labelled train split and a test split")
    acc = linear_probe(model.backbone, train_src, test_src, cfg.image_size, device, cfg.amp, cfg.workers,
                       max_iter=cfg.linear_epochs)
    log(f"linear probe top-1: {acc * 100:.2f}%")
    with open(run_dir / "eval.json", "w") as f:
        json.dump({"linear_top1": acc, "epoch": ckpt["epoch"]}, f)
    return acc

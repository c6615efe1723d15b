"""Weighted k-nearest-neighbour classifier on frozen features: the online
monitor (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric
Instance Discrimination", Sec. 3.4; the MoCo CIFAR demo's knn_predict).

Each of the k most cosine-similar bank samples votes for its label with
weight exp(sim / T); the class with the largest sum wins.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(features: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
                k: int = 200, temperature: float = 0.1, chunk_size: int | None = None) -> torch.Tensor:
    """features [N, D], bank [M, D], bank_labels [M] -> predicted labels [N].

    Rows are L2-normalised here. Queries go in chunks so that a chunk's
    similarity matrix holds at most 2^26 entries (256 MB in float32)
    unless chunk_size says otherwise."""
    features = F.normalize(features.float(), dim=1)
    bank = F.normalize(bank.to(features.device, torch.float32), dim=1)
    bank_labels = bank_labels.to(features.device, torch.long)
    k = min(k, bank.shape[0])
    chunk = chunk_size or max(1, 2 ** 26 // max(1, bank.shape[0]))
    preds = []
    for start in range(0, features.shape[0], chunk):
        sim = features[start:start + chunk] @ bank.T                       # n x M
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

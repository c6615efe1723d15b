"""Unaugmented images in dataset order, for the kNN monitor and linear probes.

Evaluation needs every sample exactly once (no shuffle, no dropped batch),
resized then centre-cropped as usual (resize to size * 256/224, crop size),
so it has its own small loader rather than a training pipeline.
"""
from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode

from .render import decode
from .workers import batches, worker_init_fn
from .views import MEAN, STD


class _Eval(Dataset):
    def __init__(self, source, indices, size):
        self.source, self.indices, self.size = source, indices, size

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        idx = int(self.indices[i])
        img = decode(self.source.read(idx))
        img = F.resize(img, int(round(self.size * 256 / 224)), InterpolationMode.BILINEAR, antialias=True)
        img = F.center_crop(img, [self.size, self.size])
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()), idx


def eval_batches(source, size: int, batch_size: int, device, workers: int = 2, rank: int = 0, world_size: int = 1):
    """Yields (images [B,C,H,W] normalised channels_last float32, dataset indices [B]);
    rank r gets samples r, r + world_size, ... so the ranks together see each sample once."""
    indices = np.arange(rank, len(source), world_size)
    loader = DataLoader(_Eval(source, indices, size), batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=torch.device(device).type == "cuda", worker_init_fn=worker_init_fn())
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255
    for pixels, idx in batches(loader):  # its workers stop when this generator ends, however it ends
        x = pixels.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
        yield (x - mean) / std, idx

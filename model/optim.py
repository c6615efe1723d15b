"""Optimizers: SGD (MoCo) and LARS (BYOL, SimCLR).

    optimizer = build_optimizer(cfg, model, lr)   # cfg.optimizer in {sgd, lars}, cfg.weight_decay
    lr_per_step = cosine_schedule(lr, total, warmup)

Parameters that do not require grad (momentum encoders) are left out.
"""
from __future__ import annotations

import numpy as np
import torch


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (You et al. 2017), as in BYOL (Sec. 3.3)
    and MoCo v3's PyTorch code. For a parameter w with gradient g:

        d  = g + weight_decay * w
        d *= trust_coefficient * |w| / |d|   (1 when either norm is 0)
        mu = momentum * mu + d
        w -= lr * mu

    1-d parameters (biases, BN) and groups with `lars_exclude=True` skip both
    the weight decay and the trust ratio: d = g.
    """

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        trust_coefficient=trust_coefficient, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            adapt, plain = [], []
            for p in group["params"]:
                if p.grad is not None:
                    (plain if group["lars_exclude"] or p.ndim <= 1 else adapt).append(p)
            updates = []
            if adapt:
                grads = [p.grad for p in adapt]
                d = torch._foreach_add(grads, adapt, alpha=group["weight_decay"])
                w_norm = torch.stack(torch._foreach_norm(adapt))
                d_norm = torch.stack(torch._foreach_norm(d))
                trust = torch.where((w_norm > 0) & (d_norm > 0),
                                    group["trust_coefficient"] * w_norm / d_norm, torch.ones_like(w_norm))
                torch._foreach_mul_(d, list(trust.unbind()))
                updates += d
            updates += [p.grad for p in plain]
            params = adapt + plain
            if not params:
                continue
            bufs = []
            for p in params:
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bufs.append(state["mu"])
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, updates)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        return loss


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """The linear scaling rule (Goyal et al. 2017, Sec. 2.1): a yaml's lr is for batch 256."""
    return base_lr * batch_size / 256


def build_optimizer(cfg, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """cfg.optimizer 'sgd': SGD with cfg.momentum, weight decay on every
    parameter (MoCo). 'lars': LARS, 1-d parameters in a group without weight
    decay or adaptation (BYOL Sec. 3.3); trust coefficient
    cfg.trust_coefficient (default 0.001)."""
    params = [p for p in model.parameters() if p.requires_grad]
    name = str(cfg.optimizer).lower()
    momentum = getattr(cfg, "momentum", 0.9)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=cfg.weight_decay)
    if name == "lars":
        groups = [{"params": [p for p in params if p.ndim > 1]},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lars_exclude": True}]
        return LARS([g for g in groups if g["params"]], lr=lr, weight_decay=cfg.weight_decay, momentum=momentum,
                    trust_coefficient=getattr(cfg, "trust_coefficient", 0.001))
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose sgd or lars")


# ----------------------------------------------------------------------------- schedules
def cosine_schedule(base: float, total: int, warmup: int, final: float = 0.0) -> np.ndarray:
    """Per-step values: linear warm-up from 0, then half a cosine to `final`."""
    warm = np.linspace(0.0, base, warmup, endpoint=False) if warmup > 0 else np.array([])
    steps = np.arange(total - len(warm))
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(1, len(steps))))
    return np.concatenate([warm, cos])


def schedule_steps(epochs: int, steps_per_epoch: int, warmup_epochs: float, max_steps: int | None) -> tuple:
    """(total, warm-up) steps. A --max-steps budget shorter than the epochs
    compresses the whole schedule into it, warm-up included (same fraction
    of the run), so a short run is never all warm-up."""
    total, warmup = epochs * steps_per_epoch, int(round(warmup_epochs * steps_per_epoch))
    if max_steps and max_steps < total:
        warmup = int(round(warmup * max_steps / total))
        total = max_steps
    return total, warmup

"""One training step, and the clock of how long the loop waits for data:
what train.py's loop runs, shared with bench/throughput.py so that the
bench times the loop's own step.

    step = TrainStep(method, optimizer, scaler, autocast, lr_schedule, forward=ddp_or_compiled)
    clock = WaitClock()
    for views in clock.batches(loader):
        loss, metrics = step(views, global_step)     # nothing here waits for the device
    clock.wait_s, clock.step_s                        # blocked in next(loader), whole steps

Nothing in a step reads the device on the host (the GPU runs ahead): the
learning rate comes from a host array, and a NaN or inf loss is noted on the
device and read when the loop logs or checkpoints (`first_nonfinite`).
"""
from __future__ import annotations

import time

import torch


class TrainStep:
    """forward under autocast, zero_grad, (scaled) backward, optimizer step,
    the method's step_end (momentum schedules)."""

    def __init__(self, method, optimizer, scaler, autocast, lr_schedule, forward=None):
        """`method`: the method's module (its step_end); `forward`: what runs
        it (the method under DDP or torch.compile), the method itself by default."""
        self.method, self.forward = method, forward or method
        self.optimizer, self.scaler, self.autocast = optimizer, scaler, autocast
        self.lr_schedule, self.total_steps = lr_schedule, len(lr_schedule)
        device = next(method.parameters()).device
        self._first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self._last_finite = torch.zeros((), dtype=torch.float32, device=device)

    def __call__(self, views, global_step: int):
        """Step `global_step` (0-based) on `views`: (loss, metrics), both on the device."""
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.lr_schedule[global_step]) * group.get("lr_scale", 1.0)
        with self.autocast:
            loss, metrics = self.forward(views)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)  # fp16 only: the scaler reads its inf check on the host
        self.scaler.update()
        finite = torch.isfinite(loss.detach()).all()
        self._first_bad.copy_(torch.where(finite | (self._first_bad >= 0), self._first_bad, global_step + 1))
        self._last_finite.copy_(torch.where(finite & (self._first_bad < 0), loss.detach().float(),
                                            self._last_finite))
        self.method.step_end((global_step + 1) / self.total_steps)
        return loss, metrics

    def first_nonfinite(self) -> tuple[int, float] | None:
        """(1-based step of the first NaN or inf loss, the last finite loss before it), or None.
        Reads the device: call it where the loop logs or checkpoints, not every step."""
        bad = int(self._first_bad)
        return None if bad < 0 else (bad, float(self._last_finite))


class WaitClock:
    """Seconds the loop spends blocked in next(loader) (`wait_s`) and in whole
    steps, from asking for one batch to asking for the next (`step_s`). On a
    GPU that runs ahead of the host, a step whose batch is ready spends its
    time in the model's launches, and one that waits spends it here, so
    wait_s / step_s is the share of the run that is input-bound."""

    def __init__(self):
        self.wait_s = self.step_s = 0.0
        self.steps = 0

    def batches(self, loader):
        it, began = iter(loader), None  # began: when the step now running asked for its batch
        try:
            while True:
                asked = time.perf_counter()
                self._count(began, asked)
                began = None
                try:
                    batch = next(it)
                except StopIteration:
                    return
                self.wait_s += time.perf_counter() - asked
                began = asked
                yield batch
        finally:  # the end of the epoch, or a caller that stopped iterating: the last step counts too
            self._count(began, time.perf_counter())
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def _count(self, began, now) -> None:
        if began is not None:
            self.step_s += now - began
            self.steps += 1

    @property
    def share(self) -> float:
        """wait_s / step_s (0 before the first step)."""
        return self.wait_s / self.step_s if self.step_s > 0 else 0.0

    def reset(self) -> dict:
        """This window's figures, then zero."""
        out = {"data_wait_s": round(self.wait_s, 4), "step_s": round(self.step_s, 4), "steps": self.steps,
               "wait_share": round(self.share, 4)}
        self.wait_s = self.step_s = 0.0
        self.steps = 0
        return out

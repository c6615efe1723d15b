"""How the bench measures: synchronised timing windows after a warm-up, the
rates a window gives, a pipeline's loader timed alone, the loop's own step
(model/step.py's TrainStep, the one train.py runs) fed by a pipeline, host
memory at epoch ends, and a measurement that fails becoming a row's error
rather than the run's end."""
from __future__ import annotations

import multiprocessing
import os
import resource
import statistics
import time
import traceback
from pathlib import Path

import numpy as np
import torch

import pipelines
from bench.specs import pixels_per_sample, views_per_sample
from model import evaluation
from model.optim import build_optimizer, scaled_lr
from model.step import TrainStep, WaitClock

# Host memory is "flat" when it grows by at most this much from the end of epoch 2 to the last.
RSS_FLAT_MB, RSS_FLAT_FRACTION = 16.0, 0.02


def comma_list(value: str) -> list:
    """'a, b,,c' -> ['a', 'b', 'c']: a flag's comma list."""
    return [v.strip() for v in str(value).split(",") if v.strip()]


# ----------------------------------------------------------------------------- failures
def short_error(e: BaseException) -> str:
    """'Type: first line' (and the last line, where DALI and DataLoader put the cause)."""
    lines = [ln.strip() for ln in f"{type(e).__name__}: {e}".splitlines() if ln.strip()]
    text = lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"
    return text[:400]


def attempt(what: str, fn):
    """(result, None) or (None, error line); the error is printed and the run goes on."""
    try:
        return fn(), None
    except Exception as e:
        err = short_error(e)
        print(f"  {what}: FAILED {err}", flush=True)
        if os.environ.get("VIEWFORGE_BENCH_TRACEBACK"):
            traceback.print_exc()
        return None, err


# ----------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_windows(step, device, warmup: int, steps: int, repeats: int) -> list:
    """Seconds of each of `repeats` windows of `steps` calls, after `warmup` untimed calls.
    Each window starts and ends synchronised, so it holds all its device work."""
    for _ in range(warmup):
        step()
    windows = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        windows.append(time.perf_counter() - t0)
    return windows


def rates(windows: list, batch: int, steps: int, spec) -> dict:
    t = statistics.median(windows)
    sps = batch * steps / t
    return {"samples_per_s": sps, "views_per_s": sps * views_per_sample(spec),
            "mpix_per_s": sps * pixels_per_sample(spec) / 1e6, "step_ms": 1e3 * t / steps,
            "windows_s": [round(w, 6) for w in windows]}


def samples_per_s(part):
    """The samples/s of one part's `rates`, None when the part did not run."""
    return part["samples_per_s"] if part else None


# ----------------------------------------------------------------------------- pipelines
def resolve_pipelines(requested: str) -> tuple:
    """(names to run, {name: reason skipped})."""
    names = [n for n in pipelines.PIPELINES if n != "synthetic"] if requested == "all" else comma_list(requested)
    run, skipped = [], {}
    for name in names:
        try:
            pipelines.loader_class(name)
            run.append(name)
        except Exception as e:
            skipped[name] = short_error(e)
    return run, skipped


def endless(loader):
    """Batches across epoch boundaries, as train.py's loop sees them."""
    while True:
        empty = True
        for views in loader:
            empty = False
            yield views
        if empty:
            raise RuntimeError(f"the loader yields no batches ({len(loader.source)} images, "
                               f"batch {loader.batch_size})")


def pipeline_options(name: str, cpu_graph: bool) -> dict:
    """train.py's --cpu-graph: DALI's CPU graph on a machine that has a GPU."""
    return {"cpu": True} if name == "dali" and cpu_graph and torch.cuda.is_available() else {}


def build_loader(name, spec, source, args, *, batch, workers, device, cpu_graph=False):
    return pipelines.build(name, spec, source, batch_size=batch, seed=args.seed, device=device, workers=workers,
                           **pipeline_options(name, cpu_graph))


def time_pipeline(name, spec, source, args, *, batch, workers, device, cpu_graph=False, timing=None) -> dict:
    """Rates of one pipeline; `timing` (warmup, steps, repeats) defaults to the flags'."""
    warmup, steps, repeats = timing or (args.warmup, args.steps, args.repeats)
    loader = build_loader(name, spec, source, args, batch=batch, workers=workers, device=device, cpu_graph=cpu_graph)
    it = endless(loader)
    try:
        windows = time_windows(lambda: next(it), device, warmup, steps, repeats)
    finally:
        it.close()
        loader.close()
    return rates(windows, batch, steps, spec)


# ----------------------------------------------------------------------------- the loop's step
class Trainer:
    """A method with its optimizer and scaler, stepped by train.py's own step
    (model/step.py's TrainStep: autocast forward, zero_grad, (scaled)
    backward, optimizer step, step_end) at a constant learning rate, without
    logging or checkpoints."""

    def __init__(self, method_cls, cfg, device: torch.device, nominal_steps: int):
        torch.manual_seed(cfg.seed)
        self.model = method_cls(cfg).to(device, memory_format=torch.channels_last)
        self.model.train()
        lr = scaled_lr(getattr(cfg, "lr", 0.03), cfg.batch_size)
        optimizer = build_optimizer(cfg, self.model, lr)
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
        self.train_step = TrainStep(self.model, optimizer, scaler, evaluation.autocast(device, cfg.amp),
                                    np.full(max(1, nominal_steps), lr),
                                    forward=torch.compile(self.model) if cfg.compile else self.model)
        self.done = 0

    def step(self, views) -> None:
        self.train_step(views, min(self.done, self.train_step.total_steps - 1))
        self.done += 1


def time_training(trainer: Trainer, loader_name, spec, source, args, device, cpu_graph=False) -> dict:
    """Rates of the loop's step fed by a pipeline, and the share of each
    window the step spent blocked on the next batch (model/step.py's WaitClock)."""
    loader = build_loader(loader_name, spec, source, args, batch=args.batch_size, workers=args.workers,
                          device=device, cpu_graph=cpu_graph)
    clock = WaitClock()
    it = clock.batches(endless(loader))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    shares, calls = [], [0]

    def step():  # the clock's windows follow time_windows': the warm-up, then each timed window
        trainer.step(next(it))
        calls[0] += 1
        timed = calls[0] - args.warmup
        if timed == 0:
            clock.reset()
        elif timed > 0 and timed % args.steps == 0:
            shares.append(clock.reset()["wait_share"])
    try:
        windows = time_windows(step, device, args.warmup, args.steps, args.repeats)
    finally:
        it.close()
        loader.close()
    out = rates(windows, args.batch_size, args.steps, spec)
    out["wait_share"] = statistics.median(shares) if shares else None
    if device.type == "cuda":
        out["gpu_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return out


# ----------------------------------------------------------------------------- host memory
def _status_mb(pid, field: str = "VmRSS") -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return float("nan") if pid == "self" else 0.0


def rss_mb() -> float:
    """Resident memory of this process (DALI's threads live here)."""
    value = _status_mb("self")
    if value != value:  # no /proc: the peak is the best we have (KB on Linux)
        value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return value


def _pss_mb(pid) -> float:
    """Proportional set size: resident memory with shared pages split among their sharers."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return _status_mb(pid)  # no smaps_rollup: RSS, which counts the parent's shared pages again


def children_mb() -> float:
    """Memory of our worker processes (DataLoader workers): summed PSS, so the
    pages they share with this process after fork are not counted twice."""
    return sum(_pss_mb(p.pid) for p in multiprocessing.active_children())


def measure_rss(name, spec, source, args, device, epochs: int) -> dict:
    """Host memory at the end of each epoch. The total is this process's PSS
    plus its workers' PSS: every page counted once, however fork shares it.
    Growth is measured from the end of epoch 2 (epoch 1 when there are
    fewer than 3), after caches, allocators and copy-on-write have settled."""
    before = rss_mb()
    loader = build_loader(name, spec, source, args, batch=args.batch_size, workers=args.workers, device=device,
                          cpu_graph=args.cpu_graph)
    per_epoch = []
    try:
        for epoch in range(epochs):
            t0 = time.perf_counter()
            steps = sum(1 for _ in loader)
            synchronize(device)
            own, workers = _pss_mb("self"), children_mb()
            per_epoch.append({"epoch": epoch + 1, "rss_mb": rss_mb(), "pss_mb": own, "children_mb": workers,
                              "total_mb": own + workers, "steps": steps, "seconds": time.perf_counter() - t0})
    finally:
        loader.close()
    total = [e["total_mb"] for e in per_epoch]
    base = 1 if len(total) >= 3 else 0
    growth = total[-1] - total[base]
    return {"rss_before_mb": before, "epochs": per_epoch, "peak_rss_mb": _status_mb("self", "VmHWM"),
            "rss_mb": [e["rss_mb"] for e in per_epoch], "children_mb": [e["children_mb"] for e in per_epoch],
            "total_mb": total, "growth_from_epoch": base + 1, "growth_mb": growth,
            "flat": growth <= max(RSS_FLAT_MB, RSS_FLAT_FRACTION * total[base])}

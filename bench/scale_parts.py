"""What bench/scale.py measures, one point per call, each call run in a
fresh process (`python -m bench.scale --child NAME JSON`) so that its peak
RSS (VmHWM, bench/rss.py) is its own: every function returns
{"seconds" or the figure, "peak_mb": the process's high-water mark,
reset just before the measured call, "base_mb": its RSS then}.

The imports are inside the functions: a child loads only what it measures.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.rss import max_rss_bytes, reset_max_rss, rss_bytes

MB = 1e6


def peak_mb() -> float:
    return max_rss_bytes() / MB


def start_peak() -> float:
    """Lower the process's RSS high-water mark to its RSS now and return
    that RSS in MB: the base of the measured call."""
    reset_max_rss()
    return rss_bytes() / MB


def index(data: str, cache_dir: str) -> dict:
    """open_source of an ImageFolder with the index cache in cache_dir
    (empty: the first open; filled: the reopen)."""
    from pipelines.data import open_source
    base = start_peak()
    start = time.perf_counter()
    source = open_source(data, cache_dir=cache_dir, progress=False)
    return {"seconds": time.perf_counter() - start, "images": len(source), "peak_mb": peak_mb(), "base_mb": base}


def method_spec(name: str, **overrides):
    """The ViewSpec of method `name` as its config (configs/<name>.yaml) gives it."""
    from configs import resolve_config
    from model.methods import METHODS
    argv = ["--method", name] + [a for k, v in overrides.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    cfg, _ = resolve_config(argv)
    return METHODS[name].spec(cfg), cfg


def synthetic_sizes(n: int, seed: int = 0) -> tuple:
    """Widths and heights of n images, as varied as ImageNet's (100-500 px a side)."""
    g = np.random.default_rng(seed)
    return g.integers(100, 501, n).astype(np.int32), g.integers(100, 501, n).astype(np.int32)


def planner(n: int, methods: list, batch: int, steps: int, seed: int = 0) -> dict:
    """Epoch order (the permutation of a new epoch) and one step's plan per
    method's spec, ms (median of `steps` steps after compilation on a
    small planner); neighbour specs get a table of n rows."""
    from pipelines.plan import Planner
    specs = {m: method_spec(m)[0] for m in methods}
    small_w, small_h = synthetic_sizes(4 * batch, seed)
    for spec in specs.values():  # Numba compiles (or loads its cache) here, outside the timing
        p = Planner(spec, small_w, small_h, batch, seed=seed)
        p.set_neighbours(np.arange(len(small_w)))
        p.order(0), p.plan(0, 0), p.close()
    base = start_peak()
    widths, heights = synthetic_sizes(n, seed)
    out = {"step_ms": {}}
    for m, spec in specs.items():
        p = Planner(spec, widths, heights, batch, seed=seed)
        if spec.neighbours:
            p.set_neighbours(np.random.default_rng(seed).integers(0, n, n))
        start = time.perf_counter()
        p.order(0)
        out.setdefault("epoch_s", time.perf_counter() - start)
        times = []
        for s in range(min(steps, len(p))):
            t0 = time.perf_counter()
            p.plan(0, s)
            times.append(time.perf_counter() - t0)
        out["step_ms"][m] = 1e3 * statistics.median(times)
        p.close()
    return dict(out, peak_mb=peak_mb(), base_mb=base)


def ffcv_write(data: str, index_dir: str, cache_dir: str) -> dict:
    """pipelines/ffcv.py's ensure_beton (write_beton into cache_dir, empty)
    of the ImageFolder at data, its index already in index_dir (untimed)."""
    from pipelines.data import open_source
    from pipelines.ffcv import ensure_beton
    source = open_source(data, cache_dir=index_dir, progress=False)
    base = start_peak()
    start = time.perf_counter()
    path = ensure_beton(source, cache_dir=cache_dir)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "bytes": path.stat().st_size, "peak_mb": peak_mb(), "base_mb": base}


def knn_bank(n: int, dim: int, queries: int, classes: int = 1000, seed: int = 0) -> dict:
    """The kNN monitor's bank of n x dim features assembled by the monitor's
    own code (model/evaluation.py FeatureRows: each batch written in place at
    its dataset indices), then `queries` queries classified against it."""
    import types

    import torch
    import torch.nn.functional as F

    from model import evaluation
    g = torch.Generator().manual_seed(seed)
    base = start_peak()
    start = time.perf_counter()
    rows = evaluation.FeatureRows(types.SimpleNamespace(labels=np.arange(n) % classes))
    for i in range(0, n, evaluation.EVAL_BATCH):  # what extract_features collects, batch by batch
        count = min(evaluation.EVAL_BATCH, n - i)
        rows.add(F.normalize(torch.randn(count, dim, generator=g), dim=1), torch.arange(i, i + count))
    bank, labels = rows.result()
    evaluation.knn_predict(bank[:queries], bank, labels, classes)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "bank_bytes": bank.element_size() * bank.numel(), "peak_mb": peak_mb(),
            "base_mb": base}


def clim_model(n: int, arch: str, chunk: int = 65536):
    """CLIM as train.py builds it (configs/clim.yaml, `arch`), its bank
    filled with n unit keys by its own _remember, its table of n rows, and
    SGD's momentum buffers made by one step: the state a checkpoint holds."""
    import torch
    import torch.nn.functional as F

    from model.optim import build_optimizer
    _, cfg = method_spec("clim", arch=arch)
    from model.methods import METHODS
    model = METHODS["clim"](cfg)
    g = torch.Generator().manual_seed(0)
    for i in range(0, n, chunk):
        rows = torch.arange(i, min(n, i + chunk))
        model._remember(rows, F.normalize(torch.randn(len(rows), cfg.proj_dim, generator=g), dim=1), n)
    model.neighbours = torch.randint(-1, n, (model.memory.shape[0],), generator=g)
    optimizer = build_optimizer(cfg, model, cfg.lr)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return model, optimizer, cfg


def checkpoint(n: int, arch: str) -> dict:
    """model/checkpoints.py's save of the state train.py saves, for CLIM at n images."""
    from model import checkpoints
    base = start_peak()
    model, optimizer, cfg = clim_model(n, arch)
    with tempfile.TemporaryDirectory(prefix="viewforge-scale-ckpt-") as run_dir:
        start = time.perf_counter()
        path = checkpoints.save(Path(run_dir), {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                                "step": 0, "epoch": 1, "config": vars(cfg),
                                                "data": {"fingerprint": "", "images": n}})
        seconds = time.perf_counter() - start
        size = path.stat().st_size
    bank = sum(getattr(model, k).element_size() * getattr(model, k).numel() for k in ("memory", "filled", "neighbours"))
    return {"seconds": seconds, "bytes": size, "bank_bytes": bank, "peak_mb": peak_mb(), "base_mb": base}


def feed(pipeline: str, data: str, cache_dir: str, method: str, batch: int, workers: int, warmup: int,
         steps: int) -> dict:
    """ms per step of pipelines.build(pipeline) over the ImageFolder at data,
    median of `steps` steps after `warmup`, and the start-up: seconds from
    build to the first batch (its index, and FFCV's .beton, made before,
    untimed, into cache_dir when not there yet)."""
    import pipelines
    from bench.measure import endless
    from pipelines.data import open_source
    source = open_source(data, cache_dir=cache_dir, progress=False)
    spec = method_spec(method)[0]
    options = {}
    if pipeline == "ffcv":
        from pipelines.ffcv import ensure_beton
        options = {"beton": str(ensure_beton(source, cache_dir=cache_dir))}
    base = start_peak()
    start = time.perf_counter()
    loader = pipelines.build(pipeline, spec, source, batch_size=batch, workers=workers, **options)
    it = endless(loader)
    next(it)
    start_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        next(it)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        next(it)
        times.append(time.perf_counter() - t0)
    start = time.perf_counter()  # closed mid-epoch: the loader must stop at once, not finish the epoch
    it.close()
    loader.close()
    close_s = time.perf_counter() - start
    return {"step_ms": 1e3 * statistics.median(times), "start_s": start_s, "close_s": close_s, "peak_mb": peak_mb(),
            "base_mb": base}


CHILDREN = {"index": index, "planner": planner, "ffcv_write": ffcv_write, "knn_bank": knn_bank,
            "checkpoint": checkpoint, "feed": feed}

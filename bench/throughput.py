"""Measured speed: the view pipeline alone, the model step alone, and both together.

For each method and pipeline asked for, on the same data and device in one run,
after a warm-up, the median of --repeats timed windows of --steps steps each:

  pipeline only  iterate the real pipeline's loader (decode, crop, colour,
                 normalise, onto the device); nothing else
  model only     train.py's step (autocast forward, backward, optimizer step,
                 step_end; channels_last) on synthetic views already on the
                 device (`pipelines.build("synthetic", ...)`): the ceiling
  end to end     the same step on the real pipeline's views

and the ratios end-to-end / model-only (1.0: the pipeline hides entirely
behind the model) and each pipeline's pipeline-only speed-up over torchvision
at the same worker count. Then the CPU recipe comparison the project
promises (whole multi-view samples/s, batch 64, 2 workers, on the CPU, targets
printed beside) and the host memory (PSS of this process and its workers) of
each pipeline at the end of each of --epochs-rss epochs. A window ends with
torch.cuda.synchronize on a GPU, so its wall time covers all queued work;
windows may cross epoch boundaries, as training does.

    python bench/throughput.py                                  # everything installed, device defaults
    python bench/throughput.py --pipelines dali,torchvision --methods mocov2,mosrep
    python bench/throughput.py --parts recipes                  # only the CPU recipe comparison
    python bench/throughput.py --sweep views                    # 2x224 + N x 96, N = 0, 2, 4, 6
    python bench/throughput.py --sweep batch,size,workers       # pipeline-only sweeps

Defaults (each a flag):           GPU (cuda)              CPU
  --arch / --image-size           resnet50, 224 px        resnet18, 224 px
  --batch-size (per device)       256                     16
  --workers (threads/processes)   all cores               all cores
  --warmup / --steps / --repeats  10 / 20 / 5             2 / 4 / 3
  --methods                       every registered one    mocov2
  --pipelines                     every registered one except synthetic
  --photos                        max(512, 16 x batch) ImageNet-sized JPEGs (500x375, q90)
  --recipes                       byol (2x224), multicrop (2x224+6x96), mosrep (2x224+mosaic 4x112)
  --recipe-epochs                 3 windows of one whole epoch each, after one untimed epoch
  --epochs-rss / --rss-images     5 epochs of all photos  5 epochs of 256 photos

Data: real photographs, cut once by `pipelines.data.make_photo_folder` from
Debian's wallpapers into the viewforge cache and reused (--synthetic-jpegs:
random-noise JPEGs instead, with a warning; --data DIR: your own images).

Results: a table on stdout; JSON and a PNG under bench/results/<device>/
(throughput.json/.png, or throughput-sweep-<kinds>.json/.png) holding the
device, CPU count, versions, date and the exact command. Methods or
pipelines that are not installed are reported as skipped, with the reason;
a failing row prints its error and the run goes on. See bench/README.md.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import multiprocessing
import os
import platform
import re
import resource
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as train.py: large CPU tensors on 2 MB pages

import numpy as np  # noqa: E402
import torch  # noqa: E402

import pipelines  # noqa: E402
from model.precision import AMP_CHOICES, resolve_amp  # noqa: E402
from pipelines.views import (BYOL_AUG_1, BYOL_AUG_2, CropSpec, MosaicSpec, ViewSpec)  # noqa: E402

PHOTO_SIZE = (500, 375)  # ImageNet's most common size
PHOTO_QUALITY = 90
# The CPU recipe comparison the project promises: batch 64, 2 workers.
RECIPE_BATCH, RECIPE_WORKERS = 64, 2
# Its windows are whole epochs, so that each holds one epoch boundary (where
# every pipeline restarts and drains) and a few slow steps do not decide the median.
RECIPE_EPOCHS = 3
RECIPES = {
    # BYOL (Grill et al. 2020, Table 6): two 224 views, asymmetric blur/solarize.
    "byol": ViewSpec(crops=(CropSpec("global", 2, 224, scale=(0.08, 1.0), augs=(BYOL_AUG_1, BYOL_AUG_2)),)),
    # Multi-crop (Caron et al. 2020, SwAV Sec. 3.2): 2 x 224 + 6 x 96.
    "multicrop": ViewSpec(crops=(CropSpec("global", 2, 224, scale=(0.14, 1.0)),
                                 CropSpec("local", 6, 96, scale=(0.05, 0.14)))),
    # MosRep (Wang et al., ICLR 2023): 2 x 224 + a 224 mosaic of 4 x 112 crops.
    "mosrep": ViewSpec(crops=(CropSpec("global", 2, 224),), mosaic=MosaicSpec(crops_per_image=4, crop_size=112)),
}
# Our aim: DALI's CPU graph at 1.5x the best stock baseline (bench/baselines.py), same data and workers.
RECIPE_TARGETS = {"byol": 1.5, "multicrop": 1.5, "mosrep": 1.5}
TARGET_PIPELINE = "dali"
SWEEPS = ("batch", "views", "size", "workers")
# Host memory is "flat" when it grows by at most this much from the end of epoch 2 to the last.
RSS_FLAT_MB, RSS_FLAT_FRACTION = 16.0, 0.02


# ----------------------------------------------------------------------------- arguments
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="viewforge throughput: pipeline only, model only, end to end",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipelines", default="all", help="comma list, or 'all' registered except synthetic")
    p.add_argument("--methods", default=None, help="comma list or 'all' (default: all on a GPU, mocov2 on the CPU)")
    p.add_argument("--parts", default="pipeline,model,e2e,recipes,rss",
                   help="what to run: pipeline, model, e2e, recipes, rss (comma list)")
    p.add_argument("--recipes", default="all", help=f"CPU recipe comparison: {', '.join(RECIPES)}, 'all' or 'none'")
    p.add_argument("--recipe-batch", type=int, default=RECIPE_BATCH, help="batch of the recipe comparison (64)")
    p.add_argument("--recipe-workers", type=int, default=RECIPE_WORKERS, help="workers of the recipe comparison (2)")
    p.add_argument("--recipe-epochs", type=int, default=RECIPE_EPOCHS,
                   help="timed windows of the recipe comparison, one whole epoch each, after one untimed epoch (3)")
    p.add_argument("--baselines", default="all",
                   help="stock pipelines timed beside the recipes: stock-torchvision, stock-dali, 'all' or 'none'")
    p.add_argument("--sweep", default=None, help=f"run only these pipeline-only sweeps: {', '.join(SWEEPS)}")
    p.add_argument("--sweep-values", default=None, help="comma list overriding the swept values")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--arch", default=None, help="backbone (GPU: resnet50, CPU: resnet18)")
    p.add_argument("--image-size", type=int, default=None, help="global view size (224)")
    p.add_argument("--batch-size", type=int, default=None, help="per device (GPU: 256, CPU: 16)")
    p.add_argument("--workers", type=int, default=None, help="pipeline threads/processes (all cores)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (GPU 10, CPU 2)")
    p.add_argument("--steps", type=int, default=None, help="steps per timed window (GPU 20, CPU 4)")
    p.add_argument("--repeats", type=int, default=None, help="timed windows; the median is reported (GPU 5, CPU 3)")
    p.add_argument("--amp", default="auto", choices=AMP_CHOICES, help="autocast dtype, as train.py")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (warm-up covers compilation)")
    p.add_argument("--cpu-graph", action="store_true", help="DALI: run the graph on the CPU even with a GPU")
    p.add_argument("--epochs-rss", type=int, default=5, help="epochs over which host RSS is recorded (0: skip)")
    p.add_argument("--rss-images", type=int, default=None,
                   help="epoch length of the RSS part, in images (GPU: all photos, CPU: 256; 0: all)")
    data_arguments(p, None, "max(512, 16 x batch)")
    p.add_argument("--view-scale", type=float, default=1.0,
                   help="multiply every recipe/sweep view size (smoke tests); the main rows use --image-size")
    p.add_argument("--out", default=None, help="results folder (default bench/results/<device>)")
    return p


def device_defaults(args, device: torch.device) -> None:
    gpu = device.type == "cuda"
    for key, gpu_value, cpu_value in [("arch", "resnet50", "resnet18"), ("image_size", 224, 224),
                                      ("batch_size", 256, 16), ("warmup", 10, 2), ("steps", 20, 4),
                                      ("repeats", 5, 3), ("methods", "all", "mocov2"), ("rss_images", 0, 256)]:
        if getattr(args, key) is None:
            setattr(args, key, gpu_value if gpu else cpu_value)
    if args.workers is None:
        args.workers = cpu_count()
    if args.photos is None:
        args.photos = max(512, 16 * args.batch_size)


def split(value: str) -> list:
    return [v.strip() for v in str(value).split(",") if v.strip()]


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------- environment
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_slug(device: torch.device) -> str:
    """'cpu-2core', 'nvidia-h100', 'nvidia-a100-sxm4': the results folder."""
    if device.type != "cuda":
        return f"cpu-{cpu_count()}core"
    words = re.split(r"[^a-z0-9]+", torch.cuda.get_device_name(device).lower())
    kept = []
    for w in words:
        if re.fullmatch(r"\d+gb", w) or w in ("pcie", "hbm3", "hbm2e", "nvl"):
            break  # memory size and packaging do not name the chip
        if w:
            kept.append(w)
    return "-".join(kept) or "cuda"


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for name, module in [("torchvision", "torchvision"), ("dali", "nvidia.dali"), ("numba", "numba"),
                         ("pillow", "PIL"), ("accimage", "accimage"), ("ffcv", "ffcv")]:
        try:
            out[name] = __import__(module, fromlist=["__version__"]).__version__
        except Exception:  # not installed, or no version
            out[name] = None
    return out


def environment(device: torch.device, argv: list, script: str = "bench/throughput.py") -> dict:
    return {
        "device": str(device), "device_name": device_name(device), "slug": device_slug(device),
        "cpu_count": cpu_count(), "cpu_model": device_name(torch.device("cpu")),
        "torch_threads": torch.get_num_threads(), "gpu_count": torch.cuda.device_count(),
        "versions": versions(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": f"python {script} " + " ".join(shlex.quote(a) for a in argv),
        "host": platform.node(),
    }


# ----------------------------------------------------------------------------- data
def data_arguments(p: argparse.ArgumentParser, photos, photos_default_text: str = "") -> None:
    """The options `prepare_data` reads (every bench script that times photos takes them)."""
    p.add_argument("--photos", type=int, default=photos,
                   help=f"ImageNet-sized photos to cut ({photos_default_text or photos})")
    p.add_argument("--photo-size", default="500x375", help="WxH of the prepared JPEGs")
    p.add_argument("--synthetic-jpegs", action="store_true", help="random-noise JPEGs instead of photos (warned)")
    p.add_argument("--data", default=None, help="time on this ImageFolder / file list instead of prepared photos")
    p.add_argument("--seed", type=int, default=0)


def prepare_data(args) -> tuple:
    """The source every measurement reads, and a description of it."""
    from bench.photos import make_photo_folder
    from pipelines.data import cache_root, open_source
    w, h = (int(v) for v in args.photo_size.lower().split("x"))
    if args.data:
        source = open_source(args.data, "train")
        return source, {"kind": "data", "path": args.data, "count": len(source)}
    if args.synthetic_jpegs:
        print("WARNING: --synthetic-jpegs: random-noise JPEGs are larger and slower to decode than photos; "
              "these numbers do not compare with photo runs", file=sys.stderr)
        folder = cache_root() / f"bench-noise-{w}x{h}-q{PHOTO_QUALITY}"
        source = noise_folder(folder, args.photos, (w, h), args.seed)
        return source, {"kind": "synthetic-jpegs", "path": str(folder), "count": len(source), "size": [w, h]}
    folder = cache_root() / f"bench-photos-{w}x{h}-q{PHOTO_QUALITY}"
    source = make_photo_folder(folder, args.photos, size=(w, h), quality=PHOTO_QUALITY, seed=args.seed)
    return source, {"kind": "photos", "path": str(folder), "count": len(source), "size": [w, h],
                    "quality": PHOTO_QUALITY}


def noise_folder(folder: Path, count: int, size: tuple, seed: int):
    """`count` uniform-noise JPEGs (q90) of `size`, written once and reused."""
    from PIL import Image

    from pipelines.data import open_source
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        path = folder / f"noise_{i:06d}.jpg"
        if not path.exists():
            pixels = np.random.default_rng([seed, i]).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            tmp = folder / f".{path.name}.tmp"
            Image.fromarray(pixels).save(tmp, format="JPEG", quality=PHOTO_QUALITY)
            os.replace(tmp, path)
    source = open_source(str(folder), "train", progress=False)
    keep = [k for k, p in enumerate(source.paths) if int(Path(p).stem.split("_")[1]) < count]
    return subset(source, keep)


def subset(source, keep):
    keep = np.asarray(keep, dtype=np.int64)
    return dataclasses.replace(source, paths=[source.paths[k] for k in keep], labels=source.labels[keep],
                               widths=source.widths[keep], heights=source.heights[keep])


# ----------------------------------------------------------------------------- specs
def two_views(size: int) -> ViewSpec:
    return ViewSpec(crops=(CropSpec("global", 2, size),))


def with_locals(n: int, size: int = 224, local: int = 96) -> ViewSpec:
    crops = (CropSpec("global", 2, size),)
    if n:
        crops += (CropSpec("local", n, local, scale=(0.05, 0.14)),)
    return ViewSpec(crops=crops)


def scaled(spec: ViewSpec, factor: float) -> ViewSpec:
    return spec if factor == 1.0 else spec.scaled(factor)


def describe(spec: ViewSpec) -> str:
    """'2x224+6x96+mosaic4x112': what one sample holds."""
    parts = [f"{c.count}x{c.size}" for c in spec.crops]
    if spec.original is not None:
        parts.append(f"orig{spec.original.size}")
    if spec.mosaic is not None:
        parts.append(f"mosaic{spec.mosaic.crops_per_image}x{spec.mosaic.crop_size}")
    if spec.pairs is not None:
        parts.append(f"pairs{spec.pairs.boxes_per_image}")
    return "+".join(parts) or "none"


def views_per_sample(spec: ViewSpec) -> int:
    """Rendered views per sample: every crop, the original, and each mosaic tile."""
    n = sum(c.count for c in spec.crops) + (spec.original is not None)
    return n + (spec.mosaic.crops_per_image if spec.mosaic is not None else 0)


def pixels_per_sample(spec: ViewSpec) -> int:
    """Output pixels per sample (a mosaic canvas counts once)."""
    n = sum(c.count * c.size ** 2 for c in spec.crops)
    n += spec.original.size ** 2 if spec.original is not None else 0
    return n + (spec.mosaic.canvas_size ** 2 if spec.mosaic is not None else 0)


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


def rates(windows: list, batch: int, steps: int, spec: ViewSpec) -> dict:
    t = statistics.median(windows)
    sps = batch * steps / t
    return {"samples_per_s": sps, "views_per_s": sps * views_per_sample(spec),
            "mpix_per_s": sps * pixels_per_sample(spec) / 1e6, "step_ms": 1e3 * t / steps,
            "windows_s": [round(w, 6) for w in windows]}


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


# ----------------------------------------------------------------------------- the model step
def load_method(name: str, args) -> tuple:
    """(method class, cfg) as train.py resolves them (configs/<name>.yaml and its
    defaults), with the bench's arch, image size, batch size and amp where the
    method has those keys. Raises LookupError (skipped) when it is not there."""
    try:
        from model.methods import METHODS
    except Exception as e:  # the registry itself does not import yet
        raise LookupError(f"model.methods does not import ({type(e).__name__}: {e})") from None
    if name not in METHODS:
        raise LookupError(f"not in model.methods.METHODS (registered: {', '.join(sorted(METHODS)) or 'none'})")
    import train
    cfg, _ = train.resolve_config(["--method", name])
    for key in ("arch", "image_size", "batch_size"):
        if hasattr(cfg, key):
            setattr(cfg, key, getattr(args, key))
        else:
            print(f"note: {name} has no '{key}' setting; the bench's --{key.replace('_', '-')} does not apply to it")
    cfg.amp, cfg.compile, cfg.workers, cfg.seed = args.amp, args.compile, args.workers, args.seed
    return METHODS[name], cfg


class Trainer:
    """train.py's step (model/step.py's TrainStep: autocast forward, zero_grad,
    (scaled) backward, optimizer step, step_end) at a constant learning rate,
    without logging or checkpoints."""

    def __init__(self, method_cls, cfg, device: torch.device, nominal_steps: int):
        from model import evaluation
        from model.optim import build_optimizer
        from model.step import TrainStep
        torch.manual_seed(cfg.seed)
        self.model = method_cls(cfg).to(device, memory_format=torch.channels_last)
        self.model.train()
        lr = getattr(cfg, "lr", 0.03) * cfg.batch_size / 256
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
    from model.step import WaitClock
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


# ----------------------------------------------------------------------------- the parts
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


def resolve_pipelines(requested: str) -> tuple:
    """(names to run, {name: reason skipped})."""
    names = [n for n in pipelines.PIPELINES if n != "synthetic"] if requested == "all" else split(requested)
    run, skipped = [], {}
    for name in names:
        try:
            pipelines.loader_class(name)
            run.append(name)
        except Exception as e:
            skipped[name] = short_error(e)
    return run, skipped


def resolve_methods(requested: str, args) -> tuple:
    """([(name, cls, cfg)], {name: reason skipped})."""
    if requested == "all":
        try:
            from model.methods import METHODS
            names = list(METHODS)
        except Exception as e:
            return [], {"all": f"model.methods does not import ({short_error(e)})"}
    else:
        names = split(requested)
    found, skipped = [], {}
    for name in names:
        try:
            cls, cfg = load_method(name, args)
            found.append((name, cls, cfg))
        except Exception as e:
            skipped[name] = e.args[0] if isinstance(e, LookupError) else short_error(e)
    return found, skipped


def run_main(source, args, device, parts: set) -> list:
    """One row per (method, pipeline): pipeline only, model only, end to end."""
    pipes, pipe_skipped = resolve_pipelines(args.pipelines)
    methods, method_skipped = resolve_methods(args.methods, args)
    rows = [{"method": None, "pipeline": p, "status": "skipped", "reason": r} for p, r in pipe_skipped.items()]
    rows += [{"method": m, "pipeline": None, "status": "skipped", "reason": r} for m, r in method_skipped.items()]
    for p, r in pipe_skipped.items():
        print(f"skipped pipeline {p}: {r}")
    for m, r in method_skipped.items():
        print(f"skipped method {m}: {r}")
    pipeline_cache = {}  # (pipeline, spec) -> result: methods that ask for the same views share it
    nominal = args.warmup + args.steps * args.repeats
    for name, cls, cfg in methods:
        spec, err = attempt(f"{name} spec", lambda: cls.spec(cfg))
        if spec is None:
            rows.append({"method": name, "pipeline": None, "status": "error", "errors": {"spec": err}})
            continue
        trainer, model_only, errors = None, None, {}
        if parts & {"model", "e2e"}:
            trainer, errors["model"] = attempt(f"{name} model", lambda: Trainer(cls, cfg, device, nominal))
        if "model" in parts and trainer is not None:
            print(f"timing {name}: model only (synthetic views, {describe(spec)}, batch {args.batch_size})", flush=True)
            model_only, errors["model"] = attempt(f"{name} model only", lambda: time_training(
                trainer, "synthetic", spec, source, args, device))
        for pipe in pipes:
            row = {"method": name, "pipeline": pipe, "spec": describe(spec), "views_per_sample": views_per_sample(spec),
                   "batch_size": args.batch_size, "workers": args.workers, "pipeline_only": None,
                   "model_only": model_only, "end_to_end": None, "errors": {k: v for k, v in errors.items() if v}}
            if "pipeline" in parts:
                key = (pipe, spec)
                if key not in pipeline_cache:
                    print(f"timing {name}: {pipe} pipeline only", flush=True)
                    pipeline_cache[key] = attempt(f"{name} {pipe} pipeline only", lambda: time_pipeline(
                        pipe, spec, source, args, batch=args.batch_size, workers=args.workers, device=device,
                        cpu_graph=args.cpu_graph))
                row["pipeline_only"], err = pipeline_cache[key]
                if err:
                    row["errors"]["pipeline_only"] = err
            if "e2e" in parts and trainer is not None:
                print(f"timing {name}: {pipe} end to end", flush=True)
                row["end_to_end"], err = attempt(f"{name} {pipe} end to end", lambda: time_training(
                    trainer, pipe, spec, source, args, device, cpu_graph=args.cpu_graph))
                if err:
                    row["errors"]["end_to_end"] = err
            row["status"] = "error" if row["errors"] else "ok"
            rows.append(row)
        trainer = None  # free the model before the next method
    add_ratios(rows)
    return rows


def _sps(part):
    return part["samples_per_s"] if part else None


def add_ratios(rows: list) -> None:
    """end_to_end / model_only, and pipeline-only speed-up over torchvision (same spec, workers)."""
    base = {r["method"]: _sps(r.get("pipeline_only")) for r in rows if r.get("pipeline") == "torchvision"}
    for r in rows:
        if "pipeline_only" not in r:
            continue
        e2e, model, pipe = _sps(r["end_to_end"]), _sps(r["model_only"]), _sps(r["pipeline_only"])
        r["e2e_over_model"] = e2e / model if e2e and model else None
        tv = base.get(r["method"])
        r["speedup_vs_torchvision"] = pipe / tv if pipe and tv else None


def run_recipes(source, args) -> list:
    """Whole multi-view samples/s on the CPU, batch 64, 2 workers, per recipe and pipeline."""
    names = list(RECIPES) if args.recipes == "all" else [] if args.recipes == "none" else split(args.recipes)
    pipes, skipped = resolve_pipelines(args.pipelines)
    baselines = resolve_baselines(args.baselines)
    cpu = torch.device("cpu")
    rows = [{"recipe": n, "pipeline": p, "status": "skipped", "reason": r} for n in names for p, r in skipped.items()]
    batch, workers = args.recipe_batch, args.recipe_workers
    epoch = len(source) // batch  # every pipeline here drops the last partial batch
    if epoch < 1:
        reason = f"{len(source)} images are less than one batch of {batch}"
        print(f"skipped the recipes: {reason}")
        return rows + [{"recipe": n, "status": "skipped", "reason": reason} for n in names]
    timing = (epoch, epoch, args.recipe_epochs)  # one untimed epoch, then whole epochs
    print(f"recipe windows: {args.recipe_epochs} epochs of {epoch} steps ({len(source)} images), "
          "after one untimed epoch", flush=True)
    for name in names:
        if name not in RECIPES:
            print(f"skipped recipe {name}: unknown (choose from {', '.join(RECIPES)})")
            rows.append({"recipe": name, "status": "skipped", "reason": "unknown recipe"})
            continue
        spec = scaled(RECIPES[name], args.view_scale)
        for pipe in pipes:
            print(f"timing recipe {name} ({describe(spec)}): {pipe} on the CPU, batch {batch}, "
                  f"{workers} workers", flush=True)
            result, err = attempt(f"recipe {name} {pipe}", lambda: in_fresh_process(
                time_pipeline, pipe, spec, source, args, batch=batch, workers=workers, device=cpu, cpu_graph=True,
                timing=timing))
            row = {"recipe": name, "pipeline": pipe, "spec": describe(spec), "views_per_sample": views_per_sample(spec),
                   "batch_size": batch, "workers": workers, "device": "cpu",
                   "status": "error" if err else "ok", **(result or {})}
            if err:
                row["error"] = err
            rows.append(row)
        for stock in baselines:
            print(f"timing recipe {name} ({describe(spec)}): {stock} on the CPU, batch {batch}, "
                  f"{workers} workers", flush=True)
            result, err = attempt(f"recipe {name} {stock}", lambda: in_fresh_process(
                time_baseline, stock, spec, source, batch=batch, workers=workers, timing=timing))
            row = {"recipe": name, "pipeline": stock, "baseline": True, "spec": describe(spec),
                   "views_per_sample": views_per_sample(spec), "batch_size": batch, "workers": workers,
                   "device": "cpu", "status": "error" if err else "ok", **(result or {})}
            if err:
                row["error"] = err
            rows.append(row)
    base = {r["recipe"]: r.get("samples_per_s") for r in rows if r.get("pipeline") == "torchvision"}
    best = {}
    for r in rows:
        if r.get("baseline") and r.get("samples_per_s"):
            best[r["recipe"]] = max(best.get(r["recipe"], 0.0), r["samples_per_s"])
    for r in rows:
        tv, top, sps = base.get(r["recipe"]), best.get(r["recipe"]), r.get("samples_per_s")
        r["speedup_vs_torchvision"] = sps / tv if sps and tv else None
        r["speedup_vs_best_baseline"] = sps / top if sps and top else None
        if r.get("pipeline") == TARGET_PIPELINE and r["recipe"] in RECIPE_TARGETS:
            r["target"] = RECIPE_TARGETS[r["recipe"]]
            ratio = r["speedup_vs_best_baseline"]
            r["meets_target"] = None if ratio is None else ratio >= r["target"]
    return rows


def in_fresh_process(fn, *args, **kwargs):
    """fn(*args, **kwargs) in a new interpreter (spawned; its DataLoader
    workers allowed): nothing that the pipelines timed before it left behind
    (threads, thread counts, a fragmented heap) slows it. In one process the
    same recipe's first epochs ran up to 1.6x slower after other pipelines."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def resolve_baselines(requested: str) -> list:
    from bench.baselines import BASELINES
    if requested == "none":
        return []
    names = list(BASELINES) if requested == "all" else split(requested)
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise SystemExit(f"unknown baseline {', '.join(unknown)} (choose from {', '.join(BASELINES)}, all, none)")
    return names


def time_baseline(name, spec, source, *, batch, workers, timing) -> dict:
    """A stock pipeline of bench/baselines.py, timed like ours (whole samples, after a warm-up)."""
    from bench.baselines import BUILDERS
    warmup, steps, repeats = timing
    it, close = BUILDERS[name](spec, source.paths, batch, workers)
    try:
        windows = time_windows(lambda: next(it), torch.device("cpu"), warmup, steps, repeats)
    finally:
        close()
    return rates(windows, batch, steps, spec)


def run_rss(source, args, device) -> list:
    pipes, skipped = resolve_pipelines(args.pipelines)
    spec = two_views(args.image_size)
    if args.rss_images and args.rss_images < len(source):
        source = subset(source, range(args.rss_images))
    rows = [{"pipeline": p, "status": "skipped", "reason": r} for p, r in skipped.items()]
    for pipe in pipes:
        print(f"host memory: {pipe}, {describe(spec)}, batch {args.batch_size}, {args.epochs_rss} epochs of "
              f"{len(source)} images", flush=True)
        result, err = attempt(f"rss {pipe}", lambda: measure_rss(pipe, spec, source, args, device, args.epochs_rss))
        rows.append({"pipeline": pipe, "spec": describe(spec), "batch_size": args.batch_size, "workers": args.workers,
                     "images": len(source),
                     "status": "error" if err else "ok", **({"error": err} if err else {}), **(result or {})})
    return rows


def sweep_points(kind: str, args) -> list:
    """[(value, spec, batch, workers)] of one sweep."""
    gpu = args.device_type == "cuda"
    default = {"batch": [64, 128, 256, 512] if gpu else [16, 32, 64, 128],
               "views": [0, 2, 4, 6],
               "size": [96, 128, 160, 192, 224, 256],
               "workers": sorted({1, 2, 4, 8, 16, 32, 64} & set(range(1, cpu_count() + 1)) | {cpu_count()})}[kind]
    values = [int(v) for v in split(args.sweep_values)] if args.sweep_values else default
    base = scaled(two_views(224), args.view_scale)
    points = []
    for v in values:
        if kind == "batch":
            points.append((v, base, v, args.workers))
        elif kind == "views":
            points.append((v, scaled(with_locals(v), args.view_scale), args.batch_size, args.workers))
        elif kind == "size":
            points.append((v, scaled(two_views(v), args.view_scale), args.batch_size, args.workers))
        else:
            points.append((v, base, args.batch_size, v))
    return points


def run_sweep(kind: str, source, args, device) -> list:
    pipes, skipped = resolve_pipelines(args.pipelines)
    rows = [{"sweep": kind, "pipeline": p, "status": "skipped", "reason": r} for p, r in skipped.items()]
    for value, spec, batch, workers in sweep_points(kind, args):
        for pipe in pipes:
            print(f"sweep {kind}={value}: {pipe} pipeline only ({describe(spec)}, batch {batch}, {workers} workers)",
                  flush=True)
            result, err = attempt(f"sweep {kind}={value} {pipe}", lambda: time_pipeline(
                pipe, spec, source, args, batch=batch, workers=workers, device=device, cpu_graph=args.cpu_graph))
            rows.append({"sweep": kind, "pipeline": pipe, "value": value, "spec": describe(spec),
                         "views_per_sample": views_per_sample(spec), "batch_size": batch, "workers": workers,
                         "status": "error" if err else "ok", **({"error": err} if err else {}), **(result or {})})
    return rows


# ----------------------------------------------------------------------------- reports
def _f(x, fmt="{:.1f}", none="-"):
    return none if x is None else fmt.format(x)


def format_main(rows: list) -> str:
    head = (f"{'method':<10} {'pipeline':<12} {'views':<26} {'pipeline':>9} {'views/s':>9} {'model':>9} "
            f"{'end2end':>9} {'e2e/model':>9} {'wait':>6} {'vs tv':>7}")
    lines = ["", "samples/s (a sample = one source image and all its views); wait: share of the end-to-end steps "
             "spent blocked on the next batch; vs tv: pipeline-only speed-up over torchvision, same workers",
             head, "-" * len(head)]
    for r in rows:
        if r["status"] == "skipped" or "pipeline_only" not in r:
            what = r.get("method") or r.get("pipeline")
            lines.append(f"{str(what):<23} {r['status']}: {r.get('reason') or r.get('errors')}")
            continue
        po, mo, ee = r["pipeline_only"], r["model_only"], r["end_to_end"]
        lines.append(f"{r['method']:<10} {r['pipeline']:<12} {r['spec']:<26} {_f(_sps(po)):>9} "
                     f"{_f(po and po['views_per_s']):>9} {_f(_sps(mo)):>9} {_f(_sps(ee)):>9} "
                     f"{_f(r['e2e_over_model'], '{:.2f}'):>9} {_f(ee and ee.get('wait_share'), '{:.0%}'):>6} "
                     f"{_f(r['speedup_vs_torchvision'], '{:.2f}x'):>7}")
        for part, err in r["errors"].items():
            lines.append(f"{'':<23} {part} failed: {err}")
    return "\n".join(lines)


def format_recipes(rows: list) -> str:
    head = (f"{'recipe':<10} {'views':<20} {'pipeline':<18} {'samples/s':>10} {'views/s':>9} {'vs tv':>7} "
            f"{'vs best stock':>13}  target")
    ran = next((r for r in rows if "batch_size" in r), {"batch_size": RECIPE_BATCH, "workers": RECIPE_WORKERS})
    lines = ["", f"CPU recipes: batch {ran['batch_size']}, {ran['workers']} workers, pipeline only; vs best stock: "
             f"against the faster of the stock pipelines (bench/baselines.py); target: {TARGET_PIPELINE} vs best stock",
             head, "-" * len(head)]
    for r in rows:
        if r["status"] == "skipped":
            lines.append(f"{r['recipe']:<10} {'':<20} {str(r.get('pipeline') or ''):<18} skipped: {r['reason']}")
            continue
        target = ""
        if "target" in r:
            met = {True: "met", False: "NOT MET", None: "?"}[r["meets_target"]]
            target = f">= {r['target']:.1f}x {met}"
        if r["status"] == "error":
            lines.append(f"{r['recipe']:<10} {r['spec']:<20} {r['pipeline']:<18} error: {r['error']}")
        else:
            lines.append(f"{r['recipe']:<10} {r['spec']:<20} {r['pipeline']:<18} {_f(r['samples_per_s']):>10} "
                         f"{_f(r['views_per_s']):>9} {_f(r['speedup_vs_torchvision'], '{:.2f}x'):>7} "
                         f"{_f(r.get('speedup_vs_best_baseline'), '{:.2f}x'):>13}  {target}")
    return "\n".join(lines)


def format_rss(rows: list) -> str:
    lines = ["", "host memory (MB, PSS of this process + its workers) at the end of each epoch"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['pipeline']:<12} {r['status']}: {r.get('reason') or r.get('error')}")
            continue
        per = "  ".join(f"{t:.0f}" for t in r["total_mb"])
        lines.append(f"{r['pipeline']:<12} {per}   (RSS of this process {r['rss_mb'][-1]:.0f}) growth since epoch "
                     f"{r['growth_from_epoch']}: {r['growth_mb']:+.0f} MB ({'flat' if r['flat'] else 'GROWING'})")
    return "\n".join(lines)


def format_sweep(kind: str, rows: list) -> str:
    head = f"{'pipeline':<12} {kind:>8} {'views':<18} {'views/img':>9} {'samples/s':>10} {'views/s':>9} {'Mpx/s':>8}"
    lines = ["", f"sweep: {kind} (pipeline only)", head, "-" * len(head)]
    for r in rows:
        if r["status"] == "skipped":
            lines.append(f"{r['pipeline']:<12} skipped: {r['reason']}")
        elif r["status"] == "error":
            lines.append(f"{r['pipeline']:<12} {r['value']:>8} {r['spec']:<18} error: {r['error']}")
        else:
            lines.append(f"{r['pipeline']:<12} {r['value']:>8} {r['spec']:<18} {r['views_per_sample']:>9} "
                         f"{r['samples_per_s']:>10.1f} {r['views_per_s']:>9.1f} {r['mpix_per_s']:>8.1f}")
    return "\n".join(lines)


def _recipe_label(row, pipe) -> str:
    if row is None:
        return ""
    text = f"{row['samples_per_s']:.3g}"
    if not row.get("baseline") and row.get("speedup_vs_best_baseline"):
        text += f"\n{row['speedup_vs_best_baseline']:.2f}x stock"
        if row.get("target"):
            text += f" (>= {row['target']:.1f}x)"
    return text


def plot(result: dict, path: Path) -> None:
    """One PNG: a panel per part that ran."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    main = [r for r in result.get("rows", []) if "pipeline_only" in r]
    if main:
        panels.append("main")
    if any(r["status"] == "ok" for r in result.get("recipes", [])):
        panels.append("recipes")
    if any(r["status"] == "ok" for r in result.get("rss", [])):
        panels.append("rss")
    panels += [f"sweep:{k}" for k in result.get("sweeps", {})]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6.5 * max(1, len(panels)), 4.8), squeeze=False)
    axes = axes[0]
    env = result["environment"]
    fig.suptitle(f"viewforge throughput on {env['device_name']} ({env['cpu_count']} CPUs), "
                 f"torch {env['versions']['torch']}, DALI {env['versions']['dali']}, {env['date'][:10]}", fontsize=9)
    for ax, panel in zip(axes, panels):
        if panel == "main":
            labels = [f"{r['method']}\n{r['pipeline']}" for r in main]
            x = np.arange(len(main))
            for k, (part, name) in enumerate([("pipeline_only", "pipeline only"), ("model_only", "model only"),
                                              ("end_to_end", "end to end")]):
                values = [_sps(r[part]) or 0 for r in main]
                bars = ax.bar(x + (k - 1) * 0.27, values, 0.27, label=name)
                ax.bar_label(bars, [f"{v:.3g}" if v else "" for v in values], fontsize=6)
            ax.set_xticks(x, labels, fontsize=7)
            ax.set_yscale("log")  # pipelines and models differ by orders of magnitude
            ax.set_ylabel("samples/s (log)")
            ax.set_title(f"batch {result['settings']['batch_size']}, {result['settings']['workers']} workers, "
                         f"{result['settings']['arch']}", fontsize=9)
            ax.legend(fontsize=7)
        elif panel == "recipes":
            rows = [r for r in result["recipes"] if r["status"] == "ok"]
            recipes = list(dict.fromkeys(r["recipe"] for r in rows))
            pipes = list(dict.fromkeys(r["pipeline"] for r in rows))
            x = np.arange(len(recipes))
            width = 0.8 / max(1, len(pipes))
            for k, pipe in enumerate(pipes):
                got = {r["recipe"]: r for r in rows if r["pipeline"] == pipe}
                bars = ax.bar(x + k * width - 0.4 + width / 2, [got[n]["samples_per_s"] if n in got else 0
                                                                for n in recipes], width, label=pipe)
                ax.bar_label(bars, [_recipe_label(got.get(n), pipe) for n in recipes], fontsize=6)
            ax.set_xticks(x, recipes)
            ax.margins(y=0.2)
            ax.set_ylabel("samples/s")
            ax.set_title(f"CPU recipes, batch {rows[0]['batch_size']}, {rows[0]['workers']} workers", fontsize=9)
            ax.legend(fontsize=7)
        elif panel == "rss":
            for r in result["rss"]:
                if r["status"] == "ok":
                    ax.plot(range(1, len(r["total_mb"]) + 1), r["total_mb"], marker="o", label=r["pipeline"])
            ax.set_xlabel("epoch")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set_ylabel("host MB (PSS, process + workers)")
            ax.set_title("host memory at epoch ends", fontsize=9)
            ax.legend(fontsize=7)
        else:
            kind = panel.split(":", 1)[1]
            rows = [r for r in result["sweeps"][kind] if r["status"] == "ok"]
            for pipe in dict.fromkeys(r["pipeline"] for r in rows):
                pts = [r for r in rows if r["pipeline"] == pipe]
                xs = [r["views_per_sample"] if kind == "views" else r["value"] for r in pts]
                ax.plot(xs, [r["samples_per_s"] for r in pts], marker="o", label=pipe)
            ax.set_xlabel({"batch": "batch size", "views": "views per image", "size": "view size (px)",
                           "workers": "DALI threads / loader workers"}[kind])
            ax.set_ylabel("images/s (samples/s)")
            ax.set_title(f"sweep: {kind}, pipeline only", fontsize=9)
            ax.legend(fontsize=7)
    if not panels:
        axes[0].text(0.5, 0.5, "nothing measured", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(result: dict, out_dir: Path, stem: str) -> tuple:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / f"{stem}.json", out_dir / f"{stem}.png"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    os.replace(tmp, json_path)
    try:
        plot(result, png_path)
    except ImportError as e:  # matplotlib comes with the dev extra
        print(f"warning: no plot ({e}); pip install matplotlib", file=sys.stderr)
        return json_path, None
    return json_path, png_path


# ----------------------------------------------------------------------------- main
def main(argv: list | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_args_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.device_type = device.type
    device_defaults(args, device)
    args.amp, amp_reason = resolve_amp(args.amp, device)
    env = environment(device, argv)
    parts = set(split(args.parts))
    unknown = parts - {"pipeline", "model", "e2e", "recipes", "rss"}
    if unknown:
        print(f"error: unknown --parts {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    if args.recipe_epochs < 1:
        print(f"error: --recipe-epochs must be at least 1, not {args.recipe_epochs}", file=sys.stderr)
        return 2
    sweeps = split(args.sweep) if args.sweep else []
    bad = [s for s in sweeps if s not in SWEEPS]
    if bad:
        print(f"error: unknown --sweep {', '.join(bad)}; choose from {', '.join(SWEEPS)}", file=sys.stderr)
        return 2
    print(f"viewforge throughput on {env['device_name']} ({env['cpu_count']} CPUs, torch {torch.__version__}, "
          f"DALI {env['versions']['dali']}), amp {args.amp} ({amp_reason}), "
          f"results under {args.out or 'bench/results/' + env['slug']}")
    source, data = prepare_data(args)
    print(f"data: {data['count']} {data['kind']} from {data['path']}")
    settings = {k: getattr(args, k) for k in ("arch", "image_size", "batch_size", "workers", "warmup", "steps",
                                              "repeats", "amp", "compile", "cpu_graph", "methods", "pipelines",
                                              "epochs_rss", "seed", "view_scale", "recipe_batch", "recipe_workers",
                                              "recipe_epochs", "photos", "photo_size", "rss_images")}
    settings["amp_reason"] = amp_reason
    result = {"environment": env, "settings": settings, "data": data}
    if sweeps:
        result["sweeps"] = {}
        for kind in sweeps:
            result["sweeps"][kind] = run_sweep(kind, source, args, device)
            print(format_sweep(kind, result["sweeps"][kind]))
        stem = "throughput-sweep-" + "-".join(sweeps)
    else:
        if parts & {"pipeline", "model", "e2e"}:
            result["rows"] = run_main(source, args, device, parts)
            print(format_main(result["rows"]))
        if "recipes" in parts:
            result["recipes"] = run_recipes(source, args)
            print(format_recipes(result["recipes"]))
        if "rss" in parts and args.epochs_rss > 0:
            result["rss"] = run_rss(source, args, device)
            print(format_rss(result["rss"]))
        stem = "throughput"
    out_dir = Path(args.out) if args.out else ROOT / "bench" / "results" / env["slug"]
    json_path, png_path = write_results(result, out_dir, stem)
    print(f"\nwrote {json_path}" + (f" and {png_path}" if png_path else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Golden records of behaviour that a refactor must keep bit for bit.

Two records, committed under tests/data/golden/:
- views.json: a SHA-256 of every tensor of the first two batches of Views that
  each pipeline renders from one plan (every family: crops with colour
  operations, their boxes, the original, the mosaic and its RoIs, SCRL's pairs);
- losses.json: the loss of each of 8 steps of every method, trained by
  train.py on the built-in sample with a fixed seed.

Both are made in a child process whose numerics do not depend on which x86
CPU runs it: ATen's kernels at their baseline (no AVX2/AVX-512 dispatch, so a
reduction's order is the same everywhere), oneDNN capped at SSE4.1, MKL in
its conditional-reproducibility mode and one thread.

    python -m tests.golden views        # print this checkout's record
    python -m tests.golden losses --write   # rewrite the committed record

tests/test_golden.py compares the committed records with this checkout's.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "tests" / "data" / "golden"
METHODS = ["mocov2", "byol", "simclr", "multicrop", "multicrop_mosrep", "mosrep", "leoclr", "scrl", "clim",
           "cossl"]
STEPS = 8
PORTABLE_NUMERICS = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "DNNL_MAX_CPU_ISA": "SSE41",
                     "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _digest(tensor) -> str:
    import torch
    t = tensor.detach().to("cpu").contiguous()
    raw = t.view(torch.uint8) if t.dtype != torch.bool else t.to(torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()[:16] + f" {t.dtype} {list(t.shape)}"


def views_record(data_root: Path, cache_dir: Path) -> dict:
    """pipeline -> step -> field -> digest, for every pipeline installed."""
    import pipelines
    from pipelines.data import open_source
    from pipelines.views import BYOL_AUG_1, BYOL_AUG_2, CropSpec, MosaicSpec, OriginalSpec, PairSpec, ViewSpec
    from tests.conftest import make_image_folder

    spec = ViewSpec(
        crops=(CropSpec("global", 2, 32, augs=(BYOL_AUG_1, BYOL_AUG_2)),
               CropSpec("local", 3, 16, scale=(0.05, 0.4), augs=(BYOL_AUG_1,))),
        original=OriginalSpec(24, aug=BYOL_AUG_2),
        mosaic=MosaicSpec(crops_per_image=4, crop_size=16, jitter=4),
        pairs=PairSpec(family="global", min_size=4))
    source = open_source(str(make_image_folder(data_root, classes=2, per_class=12, size=(40, 30))),
                         cache_dir=str(cache_dir), progress=False)
    record = {}
    for name in sorted(n for n in pipelines.PIPELINES if n != "synthetic"):
        steps = {}
        with pipelines.build(name, spec, source, batch_size=8, seed=3, workers=1) as loader:
            for step, views in zip(range(2), loader):
                fields = {f"crops.{k}": v for k, v in views.crops.items()}
                fields.update({f"boxes.{k}": v for k, v in views.boxes.items()})
                for key in ("original", "mosaic", "mosaic_rois", "mosaic_src", "mosaic_weight", "pair_boxes",
                            "index", "labels"):
                    if getattr(views, key) is not None:
                        fields[key] = getattr(views, key)
                steps[str(step)] = {k: _digest(v) for k, v in sorted(fields.items())}
        record[name] = steps
    return record


def _method_losses(method: str, cache_dir: Path) -> list[float]:
    with tempfile.TemporaryDirectory() as run_dir:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), "--method", method, "--pipeline", "torchvision",
             "--max-steps", str(STEPS), "--log-every", "1", "--knn-every", "0", "--workers", "0",
             "--batch-size", "32", "--amp", "fp32", "--seed", "0", "--run-dir", run_dir],
            cwd=ROOT, capture_output=True, text=True, timeout=900,
            env={**os.environ, "VIEWFORGE_CACHE": str(cache_dir)})
        if proc.returncode != 0:
            raise RuntimeError(f"{method}: train.py exited {proc.returncode}\n{proc.stdout[-2000:]}\n"
                               f"{proc.stderr[-4000:]}")
        by_step = {}
        for line in (Path(run_dir) / "log.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if "loss" in rec:
                by_step[rec["step"]] = rec["loss"]
    return [by_step[s] for s in sorted(by_step)]


def losses_record(cache_dir: Path) -> dict:
    """method -> the losses of steps 1..8, two methods at a time (2 cores, one thread each)."""
    from pipelines.data import open_source
    open_source(None, cache_dir=str(cache_dir), progress=False)  # make the sample once, before the runs share it
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        losses = pool.map(lambda m: _method_losses(m, cache_dir), METHODS)
        return dict(zip(METHODS, losses))


def record(kind: str) -> dict:
    """This checkout's record of `kind`, made in a child with portable numerics."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-m", "tests.golden", kind, "--child", tmp], cwd=ROOT,
                              capture_output=True, text=True, timeout=1800,
                              env={**os.environ, **PORTABLE_NUMERICS})
        if proc.returncode != 0:
            raise RuntimeError(f"golden {kind} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                               f"{proc.stderr[-4000:]}")
        return json.loads(proc.stdout.splitlines()[-1])


def committed(kind: str) -> dict:
    return json.loads((RECORDS / f"{kind}.json").read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=["views", "losses"])
    p.add_argument("--write", action="store_true", help="rewrite the committed record")
    p.add_argument("--child", metavar="TMP", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        tmp = Path(args.child)
        if args.kind == "views":
            out = views_record(tmp / "data", tmp / "cache")
        else:
            out = losses_record(tmp / "cache")
        print(json.dumps(out, sort_keys=True))
        return 0
    out = record(args.kind)
    if args.write:
        RECORDS.mkdir(parents=True, exist_ok=True)
        (RECORDS / f"{args.kind}.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
        print(f"wrote {RECORDS / (args.kind + '.json')}")
    else:
        print(json.dumps(out, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The CPU recipe comparison the project promises: whole multi-view
samples/s of each pipeline alone on the CPU, batch 64, 2 workers, for three
published view recipes, beside the stock pipelines users would otherwise run
(bench/baselines.py), each row in a fresh process, with our target."""
from __future__ import annotations

import concurrent.futures
import multiprocessing

import torch

from bench.baselines import BASELINES, BUILDERS
from bench.measure import attempt, comma_list, rates, resolve_pipelines, time_pipeline, time_windows
from bench.specs import describe, scaled, views_per_sample
from pipelines.views import BYOL_AUG_1, BYOL_AUG_2, CropSpec, MosaicSpec, ViewSpec

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


def run_recipes(source, args) -> list:
    """Whole multi-view samples/s on the CPU, batch 64, 2 workers, per recipe and pipeline."""
    names = list(RECIPES) if args.recipes == "all" else [] if args.recipes == "none" else comma_list(args.recipes)
    pipes, skipped = resolve_pipelines(args.pipelines)
    baselines = resolve_baselines(args.baselines)
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
    cpu = torch.device("cpu")
    for name in names:
        if name not in RECIPES:
            print(f"skipped recipe {name}: unknown (choose from {', '.join(RECIPES)})")
            rows.append({"recipe": name, "status": "skipped", "reason": "unknown recipe"})
            continue
        spec = scaled(RECIPES[name], args.view_scale)
        for pipe in pipes:
            rows.append(recipe_row(name, pipe, spec, batch, workers, lambda: in_fresh_process(
                time_pipeline, pipe, spec, source, args, batch=batch, workers=workers, device=cpu, cpu_graph=True,
                timing=timing)))
        for stock in baselines:
            rows.append(recipe_row(name, stock, spec, batch, workers, lambda: in_fresh_process(
                time_baseline, stock, spec, source, batch=batch, workers=workers, timing=timing), baseline=True))
    add_recipe_ratios(rows)
    return rows


def recipe_row(name, pipe, spec, batch, workers, measure, baseline=False) -> dict:
    """One recipe's row for one pipeline (ours or a stock `baseline`): `measure()`'s rates, or its error."""
    print(f"timing recipe {name} ({describe(spec)}): {pipe} on the CPU, batch {batch}, {workers} workers",
          flush=True)
    result, err = attempt(f"recipe {name} {pipe}", measure)
    row = {"recipe": name, "pipeline": pipe, **({"baseline": True} if baseline else {}), "spec": describe(spec),
           "views_per_sample": views_per_sample(spec), "batch_size": batch, "workers": workers, "device": "cpu",
           "status": "error" if err else "ok", **(result or {})}
    if err:
        row["error"] = err
    return row


def add_recipe_ratios(rows: list) -> None:
    """Speed-ups over our torchvision reference and over the best stock pipeline; the target's verdict."""
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


def in_fresh_process(fn, *args, **kwargs):
    """fn(*args, **kwargs) in a new interpreter (spawned; its DataLoader
    workers allowed): nothing that the pipelines timed before it left behind
    (threads, thread counts, a fragmented heap) slows it. In one process the
    same recipe's first epochs ran up to 1.6x slower after other pipelines."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def resolve_baselines(requested: str) -> list:
    if requested == "none":
        return []
    names = list(BASELINES) if requested == "all" else comma_list(requested)
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise SystemExit(f"unknown baseline {', '.join(unknown)} (choose from {', '.join(BASELINES)}, all, none)")
    return names


def time_baseline(name, spec, source, *, batch, workers, timing) -> dict:
    """A stock pipeline of bench/baselines.py, timed like ours (whole samples, after a warm-up)."""
    warmup, steps, repeats = timing
    it, close = BUILDERS[name](spec, source.paths, batch, workers)
    try:
        windows = time_windows(lambda: next(it), torch.device("cpu"), warmup, steps, repeats)
    finally:
        close()
    return rates(windows, batch, steps, spec)

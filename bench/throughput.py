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

Data: real photographs, cut once by `bench.photos.make_photo_folder` from
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
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as train.py: large CPU tensors on 2 MB pages

import torch  # noqa: E402

from bench.data import data_arguments, prepare_data, subset  # noqa: E402
from bench.machine import cpu_count, environment  # noqa: E402
from bench.measure import (Trainer, attempt, comma_list, measure_rss, resolve_pipelines,  # noqa: E402
                           samples_per_s, short_error, time_pipeline, time_training)
from bench.recipes import RECIPE_BATCH, RECIPE_EPOCHS, RECIPE_WORKERS, RECIPES, run_recipes  # noqa: E402
from bench.report import format_main, format_recipes, format_rss, format_sweep, write_results  # noqa: E402
from bench.specs import describe, scaled, two_views, views_per_sample, with_locals  # noqa: E402
from configs import resolve_config  # noqa: E402
from model.precision import AMP_CHOICES, resolve_amp  # noqa: E402

SWEEPS = ("batch", "views", "size", "workers")


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


# ----------------------------------------------------------------------------- the parts
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
    cfg, _ = resolve_config(["--method", name])
    for key in ("arch", "image_size", "batch_size"):
        if hasattr(cfg, key):
            setattr(cfg, key, getattr(args, key))
        else:
            print(f"note: {name} has no '{key}' setting; the bench's --{key.replace('_', '-')} does not apply to it")
    cfg.amp, cfg.compile, cfg.workers, cfg.seed = args.amp, args.compile, args.workers, args.seed
    return METHODS[name], cfg


def resolve_methods(requested: str, args) -> tuple:
    """([(name, cls, cfg)], {name: reason skipped})."""
    if requested == "all":
        try:
            from model.methods import METHODS
            names = list(METHODS)
        except Exception as e:
            return [], {"all": f"model.methods does not import ({short_error(e)})"}
    else:
        names = comma_list(requested)
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


def add_ratios(rows: list) -> None:
    """end_to_end / model_only, and pipeline-only speed-up over torchvision (same spec, workers)."""
    base = {r["method"]: samples_per_s(r.get("pipeline_only")) for r in rows if r.get("pipeline") == "torchvision"}
    for r in rows:
        if "pipeline_only" not in r:
            continue
        e2e, model, pipe = samples_per_s(r["end_to_end"]), samples_per_s(r["model_only"]), samples_per_s(r["pipeline_only"])
        r["e2e_over_model"] = e2e / model if e2e and model else None
        tv = base.get(r["method"])
        r["speedup_vs_torchvision"] = pipe / tv if pipe and tv else None


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
    values = [int(v) for v in comma_list(args.sweep_values)] if args.sweep_values else default
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


# ----------------------------------------------------------------------------- main
def main(argv: list | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_args_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.device_type = device.type
    device_defaults(args, device)
    args.amp, amp_reason = resolve_amp(args.amp, device)
    env = environment(device, argv)
    parts = set(comma_list(args.parts))
    unknown = parts - {"pipeline", "model", "e2e", "recipes", "rss"}
    if unknown:
        print(f"error: unknown --parts {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    if args.recipe_epochs < 1:
        print(f"error: --recipe-epochs must be at least 1, not {args.recipe_epochs}", file=sys.stderr)
        return 2
    sweeps = comma_list(args.sweep) if args.sweep else []
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

"""How each host-side cost grows with the dataset, N = 10k to ImageNet-1k
(1,281,167), extrapolated to ImageNet-21k (14,197,122) (issue 25):

    PYTHONPATH=$PWD python bench/scale.py                        # every part, default sizes (about 10 min, 2 quiet cores)
    PYTHONPATH=$PWD python bench/scale.py --only planner,clim    # some parts
    PYTHONPATH=$PWD python bench/scale.py --sizes 10000,50000 --work-dir /data/scale

Parts (`--only`), default sizes, and what one point is:

  index       10k, 100k, 1.28M real files: the first open of an ImageFolder
              (an empty index cache) and the reopen (the same cache), each in
              a fresh process: seconds and that process's peak RSS
  planner     10k-1.28M, and 14.2M when memory allows, synthetic image sizes:
              a new epoch's order, and one step of batch 256 for each of
              the mosrep, multicrop, scrl and clim view specs
  ffcv        10k, 100k, 1.28M real files: pipelines/ffcv.py's beton write
  clim        20k, 50k, 100k: CLIM's k-means and neighbour table at the
              default 2 GB budget (bench/clim_search.py's measure; the
              search is O(N^2), so its seconds scale by N^2 from the largest
              N measured), their peak at other N by the budget's formula, and
              their GPU seconds from FLOPs
  knn         10k, 30k, 100k (fewer when memory is short): the kNN monitor's
              bank of N features of the backbone's width, assembled by
              model/evaluation.py, and 256 queries against it
  checkpoint  10k, 100k, 1.28M: model/checkpoints.py's save of CLIM's state
              with its bank of N rows (file size, seconds)
  feeds       10k, 100k, 1.28M real files: DALI's and FFCV's ms per step (MoCo v2's
              two 224 px views, batch 64, 2 workers; flat in N), and the
              seconds from building the loader to its first batch, and to
              close it mid-epoch

Real files: small JPEGs (16 distinct byte strings, 48-76 x 36-57 px,
about 0.6-3 KB) written under many names into 1000 class folders of a work
dir that later runs reuse and grow (`--work-dir`, default
<viewforge cache>/scale-files): a pool of files grown to the largest N,
and for each N a tree of hard links to the pool's first N files. The
largest real N is capped by free disk space and inodes (statvfs, stated
in the output). File creation is timed and reported, not counted as a
cost. All files sit in the page cache when the index reads them: "cold"
means no index cache, not a cold disk.

Each point runs in a fresh process (`python -m bench.scale --child ...`), so
its peak RSS is its own; peak figures are that process's high-water mark
(VmHWM), lowered to its RSS just before the measured call, and "base" that
RSS (the imports: torch, numba); CLIM's are the extra above it, as
bench/clim_search.py reports them.
Every size of the table (10k, 100k, 1.28M, 14.2M) that a cost did not
measure is extrapolated from the nearest measured N with the exponent
fitted on log-log over the measured points, or exactly where the cost is
linear or affine in N by construction (bench/scale_report.py), and
marked "(ext.)"; GPU seconds are estimates, "(est.)". Writes
bench/results/<device>/scale/scale.json, scale.md and scale.png.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import scale_files, scale_parts, scale_report  # noqa: E402
from bench.scale_report import IMAGENET_1K, IMAGENET_21K  # noqa: E402

DEFAULT_SIZES = {
    "index": (10_000, 100_000, IMAGENET_1K),
    "planner": (10_000, 100_000, IMAGENET_1K, IMAGENET_21K),
    "ffcv": (10_000, 100_000, IMAGENET_1K),
    "clim": (20_000, 50_000, 100_000),
    "knn": (10_000, 30_000, 100_000),
    "checkpoint": (10_000, 100_000, IMAGENET_1K),
    "feeds": (10_000, 100_000, IMAGENET_1K),
}
REAL_FILES = ("index", "ffcv", "feeds")
PLANNER_METHODS = ("mosrep", "multicrop", "scrl", "clim")
TARGETS = {"index cold": 180.0, "index warm": 10.0}  # issue 25, seconds at 1.28M; and peak RSS <= 1 GB
RSS_TARGET_MB = 1000.0


def say(text: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def child(name: str, **kwargs) -> dict:
    """scale_parts.CHILDREN[name](**kwargs) in a fresh interpreter; its JSON result."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "bench.scale", "--child", name, json.dumps(kwargs)], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, text=True)
    if done.returncode:
        raise RuntimeError(f"{name} {kwargs} ended with exit code {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def point(n: int, value: float, got: dict) -> dict:
    return {"n": n, "value": value, "peak_mb": got.get("peak_mb"), "base_mb": got.get("base_mb")}


def cost(name: str, unit: str, part: str, law: str, points: list, **extra) -> dict:
    return {"cost": name, "unit": unit, "part": part, "law": law, "points": points, **extra}


# ----------------------------------------------------------------------------- the parts
def part_index(sizes: list, work: scale_files.WorkDir, args) -> list:
    cold, warm = [], []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="index-cache-", dir=work.root) as cache:
            for label, points in (("cold", cold), ("warm", warm)):
                got = child("index", data=str(work.tree(n)), cache_dir=cache)
                if got["images"] != n:
                    raise RuntimeError(f"the index of {work.tree(n)} holds {got['images']:,} images, not {n:,}")
                points.append(point(n, got["seconds"], got))
                say(f"index {label} N={n:,}: {got['seconds']:.1f} s ({n / got['seconds']:,.0f} files/s), "
                    f"peak {got['peak_mb']:.0f} MB (base {got['base_mb']:.0f})")
    return [cost("index cold", "s", "index", "fit", cold, show_peak=True),
            cost("index warm", "s", "index", "fit", warm, show_peak=True)]


def part_planner(sizes: list, work, args) -> list:
    epoch, steps = [], {m: [] for m in args.methods}
    for n in sizes:
        batch = min(args.batch, n)
        got = child("planner", n=n, methods=args.methods, batch=batch, steps=args.plan_steps)
        epoch.append(point(n, got["epoch_s"], got))
        for m, ms in got["step_ms"].items():
            steps[m].append(point(n, ms, {}))
        say(f"planner N={n:,}: epoch order {got['epoch_s']:.3f} s, step of {batch}: "
            + ", ".join(f"{m} {ms:.2f} ms" for m, ms in got["step_ms"].items()) + f", peak {got['peak_mb']:.0f} MB")
    return [cost("planner: epoch order", "s", "planner", "fit", epoch, show_peak=True)] + [
        cost(f"planner: step of {args.batch}, {m}", "ms", "planner", "fit", pts) for m, pts in steps.items()]


def part_ffcv(sizes: list, work: scale_files.WorkDir, args) -> list:
    points = []
    for n in sizes:
        child("index", data=str(work.tree(n)), cache_dir=str(work.cache))  # the index, untimed
        with tempfile.TemporaryDirectory(prefix="beton-", dir=work.root) as betons:
            got = child("ffcv_write", data=str(work.tree(n)), index_dir=str(work.cache), cache_dir=betons)
        points.append(point(n, got["seconds"], got))
        say(f"ffcv write N={n:,}: {got['seconds']:.1f} s ({n / got['seconds']:,.0f} files/s), "
            f"{got['bytes'] / 1e6:.0f} MB, peak {got['peak_mb']:.0f} MB")
    return [cost("FFCV beton write", "s", "ffcv", "fit", points, show_peak=True)]


def part_clim(sizes: list, work, args) -> list:
    from bench import clim_search
    params = argparse.Namespace(dim=128, knn=5, clusters=1000, kmeans_iters=10, seed=0)
    out = []
    for what, name in (("kmeans", "CLIM k-means"), ("neighbours", "CLIM neighbour table")):
        points = []
        for n in sizes:
            row = clim_search.run_one(params, what, n, args.clim_budget)
            extra = row["extra_bytes"] / 1e6 if row["clean"] else None  # else the mark is not the call's
            points.append(point(n, row["seconds"], {"peak_mb": extra, "base_mb": 0.0}))
            say(f"{name} N={n:,}: {row['seconds']:.1f} s, peak extra {row['extra_bytes'] / 1e6:.0f} MB")
        # the chunks are sized to the budget: at an unmeasured N the peak is the formula's, not a fit's
        formula = {n: clim_search.predicted(what, n, params.dim, params.knn, min(params.clusters, max(1, n // 10)),
                                            args.clim_budget, 2)[1] / 1e6 for n in scale_report.TABLE_SIZES}
        law = "quadratic" if what == "neighbours" else "fit"  # k-means: N x 1000 centres, linear
        out.append(cost(name, "s", "clim", law, points, show_peak=True, peak_is="extra above the process's RSS",
                        peak_formula=formula))
    gpu = {"kmeans": [], "neighbours": []}
    for n in sorted(set(scale_report.TABLE_SIZES) | set(sizes)):
        search, kmeans = clim_search.flops(n, min(1000, max(1, n // 10)), 128, 10)
        gpu["neighbours"].append({"n": n, "value": search / (args.gpu_tflops * 1e12), "status": "estimated"})
        gpu["kmeans"].append({"n": n, "value": kmeans / (args.gpu_tflops * 1e12), "status": "estimated"})
    note = f"FLOPs at {args.gpu_tflops:g} TFLOPS (bench/clim_search.py flops), not measured"
    return out + [cost(f"CLIM {k} on a GPU", "s", "clim", "flops", pts, note=note) for k, pts in gpu.items()]


def sized_and_timed(sizes: list, measure, size_key: str, describe) -> tuple[list, list]:
    """(MB points of got[size_key], seconds points) of got = measure(n) over sizes."""
    sized, timed = [], []
    for n in sizes:
        got = measure(n)
        sized.append(point(n, got[size_key] / 1e6, got))
        timed.append(point(n, got["seconds"], got))
        say(describe(n, got))
    return sized, timed


def part_knn(sizes: list, work, args) -> list:
    dim = args.knn_dim
    bank, secs = sized_and_timed(
        sizes, lambda n: child("knn_bank", n=n, dim=dim, queries=min(256, n)), "bank_bytes",
        lambda n, got: (f"kNN bank N={n:,} x {dim}: {got['bank_bytes'] / 1e6:.0f} MB, assembled and 256 queries "
                        f"in {got['seconds']:.1f} s, peak {got['peak_mb']:.0f} MB (base {got['base_mb']:.0f})"))
    return [cost(f"kNN monitor bank ({dim} float32 per image)", "MB", "knn", "linear", bank, show_peak=True),
            cost("kNN bank assembly + 256 queries", "s", "knn", "fit", secs)]


def part_checkpoint(sizes: list, work, args) -> list:
    size, secs = sized_and_timed(
        sizes, lambda n: child("checkpoint", n=n, arch=args.arch), "bytes",
        lambda n, got: (f"checkpoint CLIM {args.arch} N={n:,}: {got['bytes'] / 1e6:.0f} MB (bank "
                        f"{got['bank_bytes'] / 1e6:.0f} MB) in {got['seconds']:.1f} s, peak {got['peak_mb']:.0f} MB"))
    return [cost(f"checkpoint, CLIM {args.arch} with its bank", "MB", "checkpoint", "affine", size, show_peak=True),
            cost("checkpoint save", "s", "checkpoint", "fit", secs)]


def part_feeds(sizes: list, work: scale_files.WorkDir, args) -> list:
    out = []
    for pipe in ("dali", "ffcv"):
        points, start, close = [], [], []
        for n in sizes:
            got = child("feed", pipeline=pipe, data=str(work.tree(n)), cache_dir=str(work.cache), method="mocov2",
                        batch=min(args.feed_batch, n), workers=args.workers, warmup=args.feed_warmup,
                        steps=args.feed_steps)
            points.append(point(n, got["step_ms"], got))
            start.append(point(n, got["start_s"], {}))
            close.append(point(n, got["close_s"], {}))
            say(f"{pipe} feed N={n:,}: {got['step_ms']:.1f} ms/step, build to first batch {got['start_s']:.1f} s, "
                f"closed mid-epoch in {got['close_s']:.2f} s, "
                f"peak {got['peak_mb']:.0f} MB")
        out += [cost(f"{pipe} feed, ms per step of {args.feed_batch}", "ms", "feeds", "fit", points, show_peak=True),
                cost(f"{pipe} feed, build to first batch", "s", "feeds", "fit", start),
                cost(f"{pipe} feed, closed mid-epoch", "s", "feeds", "fit", close)]
    return out


PARTS = {"index": part_index, "planner": part_planner, "ffcv": part_ffcv, "clim": part_clim, "knn": part_knn,
         "checkpoint": part_checkpoint, "feeds": part_feeds}


# ----------------------------------------------------------------------------- sizes, caps, the run
def mem_available_mb() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) / 1024


def resolve_sizes(args, work: scale_files.WorkDir) -> tuple[dict, list]:
    """{part: sizes} after the caps (disk for real files, memory for the
    planner and the kNN bank), and a note per cap."""
    sizes = {p: sorted(args.sizes or DEFAULT_SIZES[p]) for p in args.only}
    notes, avail = [], mem_available_mb()
    if "planner" in sizes:  # widths, heights, order, a table: 8 bytes each per image, and copies
        keep = [n for n in sizes["planner"] if n * 64 / 1e6 < avail / 2]
        if keep != sizes["planner"]:
            notes.append(f"planner: N > {keep[-1]:,} not run: {avail:,.0f} MB available")
        sizes["planner"] = keep
    if "knn" in sizes:  # the per-batch list, the joined bank, its ordered copy, knn_predict's normalised one
        keep = [n for n in sizes["knn"] if 4.5 * n * args.knn_dim * 4 / 1e6 < avail / 2]
        if keep != sizes["knn"]:
            notes.append(f"knn: N > {keep[-1] if keep else 0:,} not run: {avail:,.0f} MB available")
        sizes["knn"] = keep
    real = [n for p in REAL_FILES if p in sizes for n in sizes[p]]
    if real:
        fits, statement = work.largest_fitting(max(real))
        notes.append(statement)
        for p in REAL_FILES:
            if p in sizes:
                sizes[p] = [n for n in sizes[p] if n <= fits]
    return sizes, notes


def run(args) -> dict:
    from bench.machine import environment
    import torch
    work = scale_files.WorkDir(args.work_dir)
    sizes, notes = resolve_sizes(args, work)
    for note in notes:
        say(note)
    real = sorted({n for p in REAL_FILES for n in sizes.get(p, ())})
    if real:
        say(f"work dir {work.root}: files for N = {', '.join(f'{n:,}' for n in real)}")
        for n in real:
            work.tree(n)
        for c in work.created:
            say(f"made {c['what']}: {c['files']:,} in {c['seconds']:.1f} s ({c['files'] / c['seconds']:,.0f}/s)")
    env = environment(torch.device("cpu"), args.argv, "bench/scale.py")
    result = {"environment": env, "sizes": sizes, "notes": notes, "created": work.created, "costs": [],
              "errors": {}}
    for part in args.only:
        if not sizes.get(part):
            continue
        say(f"part {part}: N = {', '.join(f'{n:,}' for n in sizes[part])}")
        start = time.perf_counter()
        try:
            result["costs"] += [scale_report.finish(c) for c in PARTS[part](sizes[part], work, args)]
        except Exception as e:  # one part failing leaves the others' figures
            result["errors"][part] = f"{type(e).__name__}: {e}"
            say(f"part {part} FAILED: {result['errors'][part]}")
        say(f"part {part} took {time.perf_counter() - start:.0f} s")
        write(result, args.out)
    return result


def target_notes(costs: list) -> list:
    """Issue 25's index targets at N = 1.28M, against the measured or extrapolated figure."""
    out = []
    for c in costs:
        p = scale_report.at(c, IMAGENET_1K)
        if c["cost"] in TARGETS and p and p["value"] is not None:
            ok = "meets" if p["value"] <= TARGETS[c["cost"]] else "misses"
            peak = "-" if p["peak_mb"] is None else f"{p['peak_mb']:.0f}"
            out.append(f"{c['cost']} at 1.28M: {p['value']:.1f} s ({p['status']}) {ok} the target of "
                       f"{TARGETS[c['cost']]:g} s; peak RSS {peak} MB against {RSS_TARGET_MB:g} MB")
    return out


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result["targets"] = target_notes(result["costs"])
    notes = result["notes"] + result["targets"] + [
        f"{c['what']}: {c['files']:,} in {c['seconds']:.1f} s ({c['files'] / c['seconds']:,.0f}/s)"
        for c in result["created"]] + [f"{p} failed: {e}" for p, e in result["errors"].items()]
    (out / "scale.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "scale.md").write_text(scale_report.markdown(result["costs"], result["environment"], notes))
    try:
        scale_report.plot(result["costs"], result["environment"], out / "scale.png")
    except ImportError:
        say("no matplotlib: scale.png not written")


def default_out() -> Path:
    from bench.machine import device_slug
    import torch
    return ROOT / "bench" / "results" / device_slug(torch.device("cpu")) / "scale"


def default_work_dir() -> Path:
    from pipelines.data import cache_root
    return cache_root() / "scale-files"


def parse(argv: list) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=lambda s: [int(float(v)) for v in s.split(",") if v.strip()], default=None,
                   help="N for every part, comma list (default: each part's own, see above)")
    p.add_argument("--only", default=",".join(PARTS), help=f"parts, comma list of {', '.join(PARTS)}")
    p.add_argument("--work-dir", type=Path, default=None, help="the real files (default <cache>/scale-files)")
    p.add_argument("--out", type=Path, default=None, help="default bench/results/<device>/scale/")
    p.add_argument("--arch", default="resnet50", help="CLIM's backbone for the checkpoint (configs/clim.yaml)")
    p.add_argument("--knn-dim", type=int, default=2048, help="the monitor's feature width (ResNet-50: 2048)")
    p.add_argument("--batch", type=int, default=256, help="the planner's batch")
    p.add_argument("--plan-steps", type=int, default=20)
    p.add_argument("--methods", default=",".join(PLANNER_METHODS), help="the planner's view specs, comma list")
    p.add_argument("--clim-budget", type=float, default=2.0, help="GB, CLIM's neighbour_memory_gb")
    p.add_argument("--gpu-tflops", type=float, default=60.0, help="assumed fp32 peak for the GPU estimate")
    p.add_argument("--feed-batch", type=int, default=64)
    p.add_argument("--feed-warmup", type=int, default=3)
    p.add_argument("--feed-steps", type=int, default=10)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    args.argv = argv
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    args.methods = [x.strip() for x in args.methods.split(",") if x.strip()]
    unknown = [x for x in args.only if x not in PARTS]
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    args.work_dir = args.work_dir or default_work_dir()
    args.out = args.out or default_out()
    return args


def main(argv: list | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:  # one point, in this fresh process: its result as the last line
        print(json.dumps(scale_parts.CHILDREN[argv[1]](**json.loads(argv[2]))), flush=True)
        sys.stderr.flush()
        os._exit(0)  # the point is measured; skip the interpreter's slow teardown
    args = parse(argv)
    start = time.perf_counter()
    run(args)
    say(f"done in {time.perf_counter() - start:.0f} s: {args.out}")


if __name__ == "__main__":
    main()

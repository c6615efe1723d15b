"""What throughput.py prints and writes: a table per part (main rows, CPU
recipes, host memory, sweeps) and the results files, JSON plus the PNG of
bench/plot.py, under bench/results/<device>/."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from bench.measure import samples_per_s
from bench.plot import plot
from bench.recipes import RECIPE_BATCH, RECIPE_WORKERS, TARGET_PIPELINE


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
        lines.append(f"{r['method']:<10} {r['pipeline']:<12} {r['spec']:<26} {_f(samples_per_s(po)):>9} "
                     f"{_f(po and po['views_per_s']):>9} {_f(samples_per_s(mo)):>9} {_f(samples_per_s(ee)):>9} "
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


def write_results(result: dict, out_dir: Path, stem: str) -> tuple:
    """<stem>.json (written atomically) and <stem>.png; (json path, png path or None without matplotlib)."""
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

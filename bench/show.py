"""Pictures of what the trainer does: the views a method gets, and a run's curves.

A sheet of one step's views (the plan of epoch 0, step 0, at a batch of 4):
    python bench/show.py views --method mosrep --out views.png
    python bench/show.py views --method scrl --pipelines dali,torchvision --out scrl.png   # same plan, each pipeline
Every train.py flag (--data, --image-size, --seed, --base byol, ...) resolves the method's views as a
training run would; the sheet's own flags are --pipelines, --out, --samples, --epoch, --step, --panel.
A run's curves (train.py redraws RUN_DIR/curves.png at every epoch end):
    python bench/show.py curves runs/mosrep-sample

The sheet and the curves are drawn by model/sheets.py and model/curves.py,
which the training loop uses too; this is their command line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the project's packages sit beside bench/
    sys.path.insert(0, str(ROOT))

import pipelines  # noqa: E402
from configs import apply_small_profile, resolve_config  # noqa: E402
from model.curves import write_curves  # noqa: E402
from model.methods import METHODS  # noqa: E402
from model.sheets import sheet_for  # noqa: E402
from pipelines.data import DataError, open_source  # noqa: E402


# ----------------------------------------------------------------------------- command line
class _Usage(Exception):
    pass


def _views_command(argv: list) -> int:
    p = argparse.ArgumentParser(prog="bench/show.py views", description="a sheet of one step's views; other flags go "
                                "to train.py's configuration", add_help=True)
    p.add_argument("--pipelines", default=None, help="comma-separated; default: train.py's --pipeline")
    p.add_argument("--out", default="views.png")
    p.add_argument("--samples", type=int, default=4, help="batch of the step shown (at least a mosaic's crops)")
    p.add_argument("--epoch", type=int, default=0)
    p.add_argument("--step", type=int, default=0)
    p.add_argument("--panel", type=int, default=96, help="panel side in pixels")
    own, rest = p.parse_known_args(argv)
    cfg, explicit = resolve_config(rest)
    names = [n for n in (own.pipelines or cfg.pipeline).split(",") if n]
    bad = [n for n in names if n not in pipelines.PIPELINES]
    if bad or not names or len(names) > 2:
        raise _Usage(f"--pipelines: give one or two of {', '.join(sorted(pipelines.PIPELINES))}"
                     + (f" (unknown: {', '.join(bad)})" if bad else ""))
    if own.samples < 1 or own.panel < 8:
        raise _Usage("--samples must be at least 1 and --panel at least 8")
    try:
        source = open_source(cfg.data, "train", progress=False)
    except DataError as e:
        raise _Usage(str(e))
    apply_small_profile(cfg, explicit, float(np.median(np.minimum(source.widths, source.heights))))
    spec = METHODS[cfg.method].spec(cfg)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        sheet = sheet_for(cfg, spec, source, names, samples=own.samples, epoch=own.epoch, step=own.step,
                          panel=own.panel, device=device)
    except pipelines.PipelineError as e:
        raise _Usage(str(e))
    sheet.image.save(own.out, optimize=True)
    if sheet.diffs:
        by_view = {}
        for (name, v, _), d in sheet.diffs.items():
            by_view.setdefault(f"{name} {v}", []).append(d)
        print(f"mean |{names[0]} - {names[1]}| per view (0..255): "
              + ", ".join(f"{k} {np.mean(d):.2f}" for k, d in by_view.items()))
    print(f"wrote {own.out} ({sheet.image.width}x{sheet.image.height})")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if not argv or argv[0] not in ("views", "curves"):
            raise _Usage("usage: python bench/show.py views [--method M] [--pipelines a,b] [--out PNG] ... | "
                         "python bench/show.py curves RUN_DIR")
        if argv[0] == "views":
            return _views_command(argv[1:])
        if len(argv) != 2 or not (Path(argv[1]) / "log.jsonl").is_file():
            raise _Usage("usage: python bench/show.py curves RUN_DIR (a run directory holding log.jsonl)")
        print(f"wrote {write_curves(argv[1])}")
        return 0
    except _Usage as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Where a sample's CPU time goes in DALI's CPU graph or FFCV's compiled stage, stage by stage, on one thread.

    python bench/profile_cpu.py                      # the three recipes, 512 photos, batch 64
    python bench/profile_cpu.py --recipes byol --batches 8
    python bench/profile_cpu.py --pipeline ffcv      # FFCV's stages instead

For each recipe (bench/recipes.py's RECIPES), milliseconds of one core
per whole sample (all its views), each stage timed on its own:

  plan        the Numba planner (batch plan / B)
  read        reading the files' bytes
  decode      DALI's CPU decoder (a graph that only decodes)
  resize      every view's window resize (a graph that decodes and resizes, less decode)
  <op>        each colour operation of pipelines/colour.py on the real resized views
              with the plan's parameters (only the views the plan gives it)
  normalise   the operator's final pass to float32
  graph       the whole CPU graph (DALI's numba operator, mosaic paste), one thread
  loader      DaliLoader end to end on one thread (graph + copies out + Python)

The stages add up to roughly `graph`; `loader` - `graph` is the copies and
Python around it. Samples/s on N cores is at most N * 1000 / loader.

With --pipeline ffcv (pipelines/ffcv.py, the same plans):

  plan        the Numba planner (batch plan / B)
  params      the step's parameter rows written for the compiled stage
  decode      turbojpeg, once per image, as FFCV's _Decode calls it
  resize      every view's window resampled as Pillow does (resample_view)
  colour      pipelines/colour.py's `render` of every resized view (jitter,
              grayscale, blur, solarize, normalisation to float32)
  loader      FfcvLoader end to end on one thread over one whole epoch (the
              compiled stage with its memory reads, the mosaic paste,
              copies out, Python)

`loader` - (plan + params + decode + resize + colour) is the paste, the
copies out of FFCV's buffers and FFCV's own machinery.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.data import data_arguments, prepare_data  # noqa: E402
from bench.recipes import RECIPES  # noqa: E402
from bench.specs import describe  # noqa: E402
from pipelines import colour  # noqa: E402
from pipelines.dali import DaliLoader  # noqa: E402
from pipelines.dali_graph import BYTES  # noqa: E402

OPS = {"brightness": 0, "contrast": 1, "saturation": 2, "hue": 3}


def per_sample(fn, samples: int, repeats: int = 3) -> float:
    """Median ms per sample of fn() (which handles `samples` samples)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times) / samples


def graph_only(loader: DaliLoader, views: bool):
    """A one-thread graph over the loader's feed that decodes (and resizes) only."""
    from nvidia.dali import fn, pipeline_def, types

    loader._pipeline()  # sets up the feed
    feed = loader._feed
    keys = feed.keys

    @pipeline_def
    def graph():
        inputs = dict(zip(keys, fn.external_source(source=feed, num_outputs=len(keys), batch=True,
                                                    dtype=[k.dtype for k in keys],
                                                    ndim=[k.ndim for k in keys])))
        image = fn.decoders.image(inputs[BYTES], device="cpu", output_type=types.RGB)
        if not views:
            return image
        outs = []
        for g, group in enumerate(feed.groups):
            for view in feed.views[g]:
                k = view.inputs(feed.mode)
                outs.append(fn.resize(image, size=[group.size] * 2, roi_start=inputs[k["start"]],
                                      roi_end=inputs[k["end"]], roi_relative=True,
                                      interp_type=types.INTERP_LINEAR, antialias=True))
        return tuple(outs)

    pipe = graph(batch_size=loader.batch_size, num_threads=1, device_id=None, prefetch_queue_depth=1,
                 exec_pipelined=False, exec_async=False)
    pipe.build()
    return pipe, feed


def run_graph(pipe, feed, steps):
    feed.start(0, 0)  # the feed's reader works ahead from step 0
    for _ in range(steps):
        pipe.run()
    feed.halt()


def profile(name, spec, source, batch, batches) -> dict:
    out = {}
    loader = DaliLoader(spec, source, batch_size=batch, workers=1, cpu=True)
    planner = loader.planner
    steps = min(batches, len(loader))
    n = steps * batch
    out["plan"] = per_sample(lambda: [planner.plan(0, s) for s in range(steps)], n)
    plans = [planner.plan(0, s) for s in range(steps)]
    out["read"] = per_sample(lambda: [source.read_many(p.index.tolist()) for p in plans], n)
    pipe, feed = graph_only(loader, views=False)
    out["decode"] = per_sample(lambda: run_graph(pipe, feed, steps), n)
    pipe, feed = graph_only(loader, views=True)
    out["resize"] = per_sample(lambda: run_graph(pipe, feed, steps), n) - out["decode"]
    # the colour operations on the real resized views, with the plan's parameters
    feed.start(0, 0)
    tiles, params = [], []
    for s in range(steps):
        outs = pipe.run()
        plan = feed.plans.popleft()
        i = 0
        for group in loader._groups:
            p = colour.view_params(group.plan(plan), group.augs, group.size)
            for v in range(group.count):
                tiles += [np.array(outs[i + v][b]) for b in range(batch)]
                params += [p[v, b] for b in range(batch)]
            i += group.count
    feed.halt()
    for op, code in OPS.items():
        def one_op(code=code):
            for x, p in zip(tiles, params):
                if p[colour.PARAM_JITTER] > 0.5 and code in p[colour.PARAM_ORDER:colour.PARAM_ORDER + 4]:
                    q = np.zeros_like(p)
                    q[colour.PARAM_JITTER], q[colour.PARAM_ORDER:colour.PARAM_ORDER + 4] = 1, colour.SKIP
                    q[colour.PARAM_ORDER] = code
                    q[colour.PARAM_BRIGHTNESS:colour.PARAM_HUE + 1] = p[colour.PARAM_BRIGHTNESS:colour.PARAM_HUE + 1]
                    colour.augment(np.empty_like(x), x, q)
        out[op] = per_sample(one_op, n)
    for op, column in (("grayscale", colour.PARAM_GRAY), ("blur", colour.PARAM_SIGMA),
                       ("solarize", colour.PARAM_SOLARIZE)):
        def other(column=column):
            for x, p in zip(tiles, params):
                if p[column] > 0:
                    q = np.zeros_like(p)
                    q[column], q[colour.PARAM_KERNEL] = p[column], p[colour.PARAM_KERNEL]
                    colour.augment(np.empty_like(x), x, q)
        out[op] = per_sample(other, n)
    copies = per_sample(lambda: [colour.augment(np.empty_like(x), x, np.zeros_like(p)) for x, p in zip(tiles, params)], n)
    plain = per_sample(lambda: [colour.render(np.empty(x.shape, np.float32), x, np.zeros_like(p))
                                for x, p in zip(tiles, params)], n)
    out["normalise"] = plain
    out["op copies"] = copies
    def whole_graph():
        loader._restart(0, 0)  # drains what the last call prefetched
        for _ in range(steps):
            loader._pipe.run()
    out["graph"] = per_sample(whole_graph, n)
    it_loader = DaliLoader(spec, source, batch_size=batch, workers=1, cpu=True)

    def loader_epoch():
        it_loader.epoch, it_loader.step = 0, 0
        for i, _ in enumerate(it_loader):
            if i + 1 == steps:
                break
    out["loader"] = per_sample(loader_epoch, n)
    loader.close()
    it_loader.close()
    return out


def profile_ffcv(name, spec, source, batch, batches) -> dict:
    from pipelines import ffcv, ffcv_stage

    out = {}
    loader = ffcv.FfcvLoader(spec, source, batch_size=batch, workers=1)
    planner = loader.planner
    steps = min(batches, len(loader))
    n = steps * batch
    out["plan"] = per_sample(lambda: [planner.plan(0, s) for s in range(steps)], n)
    plans = [planner.plan(0, s) for s in range(steps)]
    rows = []  # per plan, per family: float32 [count, B, ROW_LEN], as the stage receives them

    def param_rows():
        rows[:] = [[loader._view_rows(group.plan(plan), group.augs, plan.index) for group in loader._groups]
                   for plan in plans]
    out["params"] = per_sample(param_rows, n)
    files = [source.read_many(plan.index.tolist()) for plan in plans]
    sizes = [(loader.decoded_h[plan.index], loader.decoded_w[plan.index]) for plan in plans]
    decoded = [[np.empty(int(h) * int(w) * 3, np.uint8) for h, w in zip(*hw)] for hw in sizes]

    def decode_all():
        for data_s, hw, out_s in zip(files, sizes, decoded):
            for data, h, w, image in zip(data_s, *hw, out_s):
                if ffcv_stage.jpeg_decode(data.ctypes.data, data.size, image.ctypes.data, h, w) != 0:
                    raise SystemExit("profile: --pipeline ffcv times JPEG files; turbojpeg refused one")
    out["decode"] = per_sample(decode_all, n)
    tiles = [[np.empty((group.count, len(plan.index), group.size, group.size, 3), np.uint8)
              for group in loader._groups] for plan in plans]

    def resize_all():
        for images, rows_s, tiles_s in zip(decoded, rows, tiles):
            for group_rows, group_tiles in zip(rows_s, tiles_s):
                for v in range(group_rows.shape[0]):
                    for b, image in enumerate(images):
                        ffcv_stage.resample_view(image, group_rows[v, b], group_tiles[v, b])
    out["resize"] = per_sample(resize_all, n)

    def colour_all():
        for rows_s, tiles_s in zip(rows, tiles):
            for group_rows, group_tiles in zip(rows_s, tiles_s):
                views = np.empty(group_tiles.shape, np.float32)
                for v in range(group_rows.shape[0]):
                    for b in range(group_rows.shape[1]):
                        colour.render(views[v, b], group_tiles[v, b], group_rows[v, b, ffcv_stage.ROW_COLOUR:])
    out["colour"] = per_sample(colour_all, n)

    def loader_epoch():  # whole: stopping early would wait for the batches FFCV's thread renders ahead
        loader.epoch, loader.step = 0, 0
        for _ in loader:
            pass
    out["loader"] = per_sample(loader_epoch, len(loader) * batch)
    loader.close()
    return out


PROFILES = {"dali": profile, "ffcv": profile_ffcv}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default="all", help=f"comma list of {', '.join(RECIPES)} or 'all'")
    p.add_argument("--pipeline", default="dali", choices=sorted(PROFILES), help="whose stages to time")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=4, help="batches timed per stage")
    data_arguments(p, 512)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    source, _ = prepare_data(a)
    names = list(RECIPES) if a.recipes == "all" else a.recipes.split(",")
    for name in names:
        spec = RECIPES[name]
        got = PROFILES[a.pipeline](name, spec, source, a.batch_size, a.batches)
        print(f"\n{name} ({describe(spec)}), {a.pipeline}: ms of one core per sample")
        for stage, ms in got.items():
            print(f"  {stage:<11} {ms:7.3f}")
        print(f"  -> at most {1000 / got['loader']:.0f} samples/s per core")
    return 0


if __name__ == "__main__":
    sys.exit(main())

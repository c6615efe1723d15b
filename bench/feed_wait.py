"""How long the training loop's own thread spends in DALI's feed, per step (CPU graph).

    python bench/feed_wait.py                                  # 64 photos, batch 32, 2 x 224 MoCo v2 views
    python bench/feed_wait.py --photos 256 --batch-size 64 --epochs 4 --workers 2

DALI's `fn.external_source` is not parallel here, so DALI calls the feed
(pipelines/dali.py's `_Feed.__call__`) on the thread that calls `pipe.run`:
the training loop's. This script wraps three functions from outside (so it
times any version of pipelines/dali.py that has them) and, after one untimed
epoch, iterates the loader for --epochs epochs, reporting per step (mean and
median over every timed step; a step's first call also restarts the graph):

  callback   ms inside `_Feed.__call__` on the loop thread
  run        ms inside DALI's `Pipeline.run` on the loop thread (waiting for
             the rendered batch; the callback runs inside it)
  step       ms of `next()` on the loader (run, copies out, bookkeeping)
  read       ms of `read_checked` (reading and checking the files) over the
             timed epochs per step, by the thread that ran it ('loop': the
             loop's own); wall time, so on a busy machine it holds waits
             for the GIL and the cores

The load average is printed: on a machine others are using, every number
here is a smoke number; compare two versions in alternating runs.

The photos are cut once by bench/data.py's `prepare_data` from Debian's
wallpapers (mate-backgrounds) into the viewforge cache; they sit in the page
cache after the untimed epoch.
"""
from __future__ import annotations

import argparse
import collections
import functools
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.data import data_arguments, prepare_data  # noqa: E402
from bench.machine import environment  # noqa: E402
from pipelines import dali  # noqa: E402
from pipelines.views import MOCOV2_AUG, CropSpec, ViewSpec  # noqa: E402


class Clock:
    """Seconds spent inside wrapped functions, per (what, thread)."""

    def __init__(self):
        self.total = collections.defaultdict(float)
        self.lock = threading.Lock()

    def wrap(self, what: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                with self.lock:
                    self.total[what, threading.current_thread().name] += time.perf_counter() - t0
        return timed

    def snapshot(self) -> dict:
        with self.lock:
            return dict(self.total)


def measure(source, batch_size: int, size: int, workers: int, epochs: int, seed: int = 0) -> dict:
    """Per-step ms lists of 'callback', 'run' and 'step' on the loop thread,
    and 'read': the timed epochs' read_checked ms per step, by thread ('loop'
    for the loop's own). The wrappers are taken off again at the end."""
    from nvidia.dali.pipeline import Pipeline

    clock = Clock()
    originals = (dali._Feed.__call__, dali.read_checked, Pipeline.run)
    dali._Feed.__call__ = clock.wrap("callback", dali._Feed.__call__)
    dali.read_checked = clock.wrap("read", dali.read_checked)
    Pipeline.run = clock.wrap("run", Pipeline.run)
    spec = ViewSpec(crops=(CropSpec("global", 2, size, augs=(MOCOV2_AUG,)),))
    loader = dali.DaliLoader(spec, source, batch_size=batch_size, workers=workers, cpu=True, seed=seed)
    try:
        for _ in loader:  # untimed: graph build, Numba, page cache
            pass
        loop = threading.current_thread().name
        rows = collections.defaultdict(list)
        start = clock.snapshot()
        for _ in range(epochs):
            it = iter(loader)
            while True:
                before = clock.snapshot()
                t0 = time.perf_counter()
                try:
                    next(it)
                except StopIteration:
                    break
                wall = time.perf_counter() - t0
                after = clock.snapshot()
                rows["step"].append(1e3 * wall)
                for what in ("callback", "run"):
                    key = (what, loop)
                    rows[what].append(1e3 * (after.get(key, 0.0) - before.get(key, 0.0)))
        end = clock.snapshot()
    finally:
        loader.close()
        dali._Feed.__call__, dali.read_checked, Pipeline.run = originals
    steps = len(rows["step"])
    rows["read"] = {"loop" if name == loop else name: 1e3 * (t - start.get((what, name), 0.0)) / steps
                    for (what, name), t in end.items() if what == "read"}
    return dict(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data_arguments(p, 64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--size", type=int, default=224, help="the two views' size")
    p.add_argument("--workers", type=int, default=2, help="DALI threads")
    p.add_argument("--epochs", type=int, default=6, help="timed epochs, after one untimed")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    source, data = prepare_data(a)
    rows = measure(source, a.batch_size, a.size, a.workers, a.epochs, a.seed)

    env = environment(torch.device("cpu"), sys.argv[1:] if argv is None else argv, "bench/feed_wait.py")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{env['cpu_model']}, {env['cpu_count']} cores, load average {load} (1, 5, 15 min); "
          f"DALI {env['versions']['dali']}, torch {env['versions']['torch']}")
    print(f"{data['count']} {data['kind']} ({data.get('size')}), batch {a.batch_size}, 2 x {a.size} views "
          f"(MoCo v2), {a.workers} DALI threads, {a.epochs} timed epochs = {len(rows['step'])} steps")
    print(f"{'ms per step':<22}{'mean':>8}{'median':>8}")
    for what in ("callback", "run", "step"):
        print(f"{what + ' (loop thread)':<22}{statistics.fmean(rows[what]):8.2f}{statistics.median(rows[what]):8.2f}")
    for name, ms in sorted(rows["read"].items()):
        print(f"{'read on ' + name:<22}{ms:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

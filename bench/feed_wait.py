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
  read       ms of `read_checked` (reading and checking the step's files),
             per thread that ran it ('loop' is the loop thread)

The photos are cut once by bench/throughput.py's `prepare_data` from Debian's
wallpapers (mate-backgrounds) into the viewforge cache; they sit in the page
cache after the untimed epoch.
"""
from __future__ import annotations

import argparse
import collections
import functools
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.throughput import data_arguments, environment, prepare_data  # noqa: E402
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

    clock = Clock()
    dali._Feed.__call__ = clock.wrap("callback", dali._Feed.__call__)
    dali.read_checked = clock.wrap("read", dali.read_checked)
    from nvidia.dali.pipeline import Pipeline
    Pipeline.run = clock.wrap("run", Pipeline.run)

    spec = ViewSpec(crops=(CropSpec("global", 2, a.size, augs=(MOCOV2_AUG,)),))
    loader = dali.DaliLoader(spec, source, batch_size=a.batch_size, workers=a.workers, cpu=True, seed=a.seed)
    for _ in loader:  # untimed: graph build, Numba, page cache
        pass
    loop = threading.current_thread().name
    rows = collections.defaultdict(list)  # what -> per-step ms
    threads = collections.defaultdict(float)  # read, per thread: total ms
    steps = 0
    for _ in range(a.epochs):
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
            delta = {k: after[k] - before.get(k, 0.0) for k in after}
            rows["step"].append(1e3 * wall)
            rows["callback"].append(1e3 * delta.get(("callback", loop), 0.0))
            rows["run"].append(1e3 * delta.get(("run", loop), 0.0))
            for (what, name), s in delta.items():
                if what == "read":
                    threads["loop" if name == loop else name] += 1e3 * s
            steps += 1
    loader.close()

    env = environment(torch.device("cpu"), sys.argv[1:] if argv is None else argv, "bench/feed_wait.py")
    print(f"{env['cpu_model']}, {env['cpu_count']} cores; DALI {env['versions']['dali']}, "
          f"torch {env['versions']['torch']}")
    print(f"{data['count']} {data['kind']} ({data.get('size')}), batch {a.batch_size}, 2 x {a.size} views "
          f"(MoCo v2), {a.workers} DALI threads, {a.epochs} timed epochs = {steps} steps")
    print(f"{'ms per step':<22}{'mean':>8}{'median':>8}")
    for what in ("callback", "run", "step"):
        print(f"{what + ' (loop thread)':<22}{statistics.fmean(rows[what]):8.2f}{statistics.median(rows[what]):8.2f}")
    for name, ms in sorted(threads.items()):
        print(f"{'read on ' + name:<22}{ms / steps:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

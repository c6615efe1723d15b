"""CLIM's k-means and neighbour search within a memory budget (issue 25):
time and peak extra host memory on the CPU, against what neighbour_bytes and
kmeans_bytes predict, plus a FLOP estimate of the GPU time at ImageNet size.

    PYTHONPATH=$PWD python bench/clim_search.py --sizes 20000,50000,100000 --budgets 2,0.5

Each (function, N, budget) runs in a fresh spawned process on a float16
bank of unit rows (CLIM's memory), all rows filled, knn 5, 1000 centres (as
configs/clim.yaml; fewer when N // 10 is smaller, as neighbour_table).
Peak extra memory = the process's RSS high-water mark (VmHWM) after the
call minus its RSS just before it; the inputs are built in slices, a
warm-up call on 4096 rows runs first (thread pool, BLAS, code) and the mark
is then lowered to the RSS (clear_refs), so the mark is the call's when the
call raised it (checked: `clean`). Writes
bench/results/<device>/clim-search/clim-search.json.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.machine import environment
from bench.measure import comma_list
from bench.rss import max_rss_bytes, reset_max_rss, rss_bytes
from model.methods.clim import GB, bank_neighbours, chunk_rows, kmeans, kmeans_bytes, neighbour_bytes

IMAGENET_ROWS = 1_281_167


def unit_bank(n: int, d: int, seed: int) -> torch.Tensor:
    """n x d float16 unit rows, made 4096 rows at a time (no n-sized temporaries)."""
    g, bank = torch.Generator().manual_seed(seed), torch.empty(n, d, dtype=torch.float16)
    for start in range(0, n, 4096):
        rows = bank[start:start + 4096]
        rows.copy_(F.normalize(torch.randn(rows.shape[0], d, generator=g), dim=1))
    return bank


def predicted(what: str, n: int, d: int, knn: int, k: int, budget_gb: float, threads: int) -> tuple[int, int]:
    """(chunk, predicted peak extra bytes) by the formula the function uses."""
    if what == "kmeans":
        fixed, per_row = kmeans_bytes(n, d, k, itemsize=2)
    else:
        fixed, per_row = neighbour_bytes(n, n, d, min(knn, n - 1), k, threads, itemsize=2)
    chunk = chunk_rows(budget_gb * GB, fixed, per_row, n)
    return chunk, fixed + chunk * per_row


def measure(what: str, n: int, d: int, knn: int, k: int, iters: int, budget_gb: float, seed: int) -> dict:
    """One timed call in this process (run in a fresh one): seconds and RSS."""
    bank, filled = unit_bank(n, d, seed), torch.ones(n, dtype=torch.bool)
    centres = F.normalize(bank[:k].float(), dim=1)
    small = slice(0, min(n, 4096))  # warm-up: thread pool, BLAS buffers, code
    kmeans(bank[small], min(k, 409), 1, torch.Generator().manual_seed(0), memory_gb=budget_gb)
    bank_neighbours(bank[small], filled[small], centres, knn, True, torch.Generator().manual_seed(0),
                    memory_gb=budget_gb)
    reset_max_rss()
    before, high_before = rss_bytes(), max_rss_bytes()
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    if what == "kmeans":
        kmeans(bank, k, iters, g, memory_gb=budget_gb)
    else:
        bank_neighbours(bank, filled, centres, knn, True, g, memory_gb=budget_gb)
    seconds = time.perf_counter() - start
    high = max_rss_bytes()
    return {"seconds": seconds, "extra_bytes": high - before, "clean": high > high_before}  # the call set the mark


def run_one(args: argparse.Namespace, what: str, n: int, budget_gb: float) -> dict:
    k = min(args.clusters, max(1, n // 10))
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        got = pool.apply(measure, (what, n, args.dim, args.knn, k, args.kmeans_iters, budget_gb, args.seed))
    chunk, bytes_ = predicted(what, n, args.dim, args.knn, k, budget_gb, torch.get_num_threads())
    return {"what": what, "n": n, "d": args.dim, "k": k, "budget_gb": budget_gb, "chunk": chunk,
            "predicted_bytes": bytes_, **got, "within_budget": got["extra_bytes"] <= budget_gb * GB}


def flops(n: int, k: int, d: int, iters: int) -> tuple[int, int]:
    """(search, k-means) FLOPs at n rows: the similarity GEMMs and the
    assignment of the neighbour search, `iters` assignments of k-means."""
    return 2 * n * n * d + 2 * n * k * d, 2 * n * k * d * iters


def imagenet_estimate(args: argparse.Namespace, rows: list[dict]) -> dict:
    """The formula's peak at N = 1.28M, the default budget; GPU seconds from
    FLOPs at args.gpu_tflops; CPU seconds scaled from the largest N run
    (N^2 for the search, N for k-means)."""
    n, k, d = IMAGENET_ROWS, args.clusters, args.dim
    flops_search, flops_kmeans = flops(n, k, d, args.kmeans_iters)
    out = {"n": n, "d": d, "k": k, "budget_gb": args.budgets[0], "gpu_tflops_assumed": args.gpu_tflops,
           "flops_search": flops_search, "flops_kmeans": flops_kmeans,
           "gpu_seconds_search": flops_search / (args.gpu_tflops * 1e12),
           "gpu_seconds_kmeans": flops_kmeans / (args.gpu_tflops * 1e12)}
    for what, power in (("neighbours", 2), ("kmeans", 1)):
        chunk, bytes_ = predicted(what, n, d, args.knn, k, args.budgets[0], 2)
        out[f"{what}_chunk"], out[f"{what}_predicted_bytes"] = chunk, bytes_
        ran = [r for r in rows if r["what"] == what and r["budget_gb"] == args.budgets[0]]
        if ran:
            big = max(ran, key=lambda r: r["n"])
            out[f"{what}_cpu_seconds_scaled"] = big["seconds"] * (n / big["n"]) ** power
    return out


def print_table(rows: list[dict], estimate: dict) -> None:
    print(f"{'what':<10} {'N':>8} {'budget GB':>9} {'chunk':>7} {'seconds':>8} {'extra MB':>9} "
          f"{'predicted MB':>12} {'within':>6} {'clean':>5}")
    for r in rows:
        print(f"{r['what']:<10} {r['n']:>8} {r['budget_gb']:>9g} {r['chunk']:>7} {r['seconds']:>8.1f} "
              f"{r['extra_bytes'] / 1e6:>9.0f} {r['predicted_bytes'] / 1e6:>12.0f} {str(r['within_budget']):>6} "
              f"{str(r['clean']):>5}")
    e = estimate
    print(f"N = {e['n']}, D = {e['d']}, budget {e['budget_gb']:g} GB: predicted peak extra "
          f"{e['neighbours_predicted_bytes'] / 1e9:.2f} GB (chunk {e['neighbours_chunk']}), k-means "
          f"{e['kmeans_predicted_bytes'] / 1e9:.2f} GB (chunk {e['kmeans_chunk']}); GPU at {e['gpu_tflops_assumed']:g} "
          f"TFLOPS: search {e['gpu_seconds_search']:.1f} s, k-means {e['gpu_seconds_kmeans']:.1f} s")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=comma_list, default="20000,50000,100000", help="bank rows N, comma list")
    p.add_argument("--budgets", type=comma_list, default="2,0.5", help="GB (1e9 bytes); the first is the default")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--knn", type=int, default=5)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--kmeans-iters", type=int, default=10)
    p.add_argument("--gpu-tflops", type=float, default=60.0, help="assumed fp32 peak (H200 ~60-67 TFLOPS dense)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.sizes, args.budgets = [int(s) for s in args.sizes], [float(b) for b in args.budgets]
    rows = [run_one(args, what, n, b) for n in args.sizes for b in args.budgets for what in ("kmeans", "neighbours")]
    estimate = imagenet_estimate(args, rows)
    print_table(rows, estimate)
    env = environment(torch.device("cpu"), argv if argv is not None else __import__("sys").argv[1:],
                      "bench/clim_search.py")
    out = args.out or Path(__file__).parent / "results" / env["slug"] / "clim-search" / "clim-search.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": env, "rows": rows, "imagenet": estimate}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

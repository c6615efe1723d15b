"""Measured learning: pre-train each method for a fixed budget, then kNN top-1
against the same backbone at random init.

    python bench/quality.py --budget cpu                         # every registered method, 2 CPU cores
    python bench/quality.py --budget full                        # a GPU: 100 epochs each, the whole dataset
    python bench/quality.py --methods mocov2,byol --steps 200    # a shorter budget of your own

Each method is pre-trained by running train.py in a subprocess, so the
numbers come from exactly the command a user types (it is printed and
stored), on Fashion-MNIST (--data fashion-mnist: Debian's
dataset-fashion-mnist, 60,000 train / 10,000 test). configs/small.yaml
applies to its 28 px images (32 px views, small stem, batch 256), and on the
CPU configs/small_cpu.yaml after it (ResNet-18 at a quarter width, each
family's published CIFAR recipe, cited there).

  cpu     --max-steps 500 --batch-size 256 --warmup-epochs 0 on the CPU
          (2.1 epochs per method), kNN after every 100 steps (the learning
          curve); kNN bank: a fixed random 5,000 of the train images,
          queries: a fixed random 5,000 of the test images.
  full    --epochs 100 on the device (a GPU: small.yaml's ResNet-18, the
          papers' recipes), kNN on the whole splits (60,000 / 10,000).

Then the pooled features of the trained backbone (unaugmented 32 px images)
are classified by the weighted kNN of model/evaluation.py (cosine similarity,
k=200, votes exp(sim/T), T=0.1) against two anchors measured with the same
kNN, bank and queries:

  random init   the same method's backbone, freshly initialised (seed 0), its
                weights untrained but its BatchNorm statistics estimated on
                the bank's train images (model/evaluation.py
                random_init_anchor, as train.py's first kNN line). The
                untouched fresh network is reported beside it ("BN as
                initialised") and in the JSON.
  raw pixels    the normalised 32 px image itself as the feature vector

Results: a markdown table and JSON under bench/results/<device>/
(quality-<budget>.md/.json) with device, versions, date, the commands, the
gain over the anchor and the curve. A method that is not registered is
skipped; one whose training fails is reported with the tail of its output,
and the rest go on.
"""
from __future__ import annotations

import argparse
import json
import math
import pickle
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.data import random_subset  # noqa: E402
from bench.machine import cpu_count, environment  # noqa: E402
from bench.measure import comma_list, short_error  # noqa: E402
from configs import apply_small_profile, resolve_config  # noqa: E402
from model import evaluation  # noqa: E402
from model.precision import AMP_CHOICES, resolve_amp  # noqa: E402

# What each budget passes to train.py, how much of each split the kNN reads
# (0: all of it), and every how many steps the curve gets a point.
BUDGETS = {
    "cpu": {"train": {"max_steps": 500, "batch_size": 256, "warmup_epochs": 0}, "device": "cpu",
            "bank": 5000, "queries": 5000, "curve_every": 100},
    "full": {"train": {"epochs": 100, "batch_size": 256}, "bank": 0, "queries": 0, "curve_every": 0},
}
KNN_K, KNN_T = 200, 0.1
SUBSET_SEED = 0


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="viewforge learning quality: fixed-budget pre-training, kNN top-1",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="all", help="comma list, or 'all' registered")
    p.add_argument("--budget", default="cpu", choices=sorted(BUDGETS))
    p.add_argument("--data", default="fashion-mnist", help="a labelled source with a test split (train.py --data)")
    p.add_argument("--pipeline", default=None, help="train.py --pipeline (default: train.py's own)")
    p.add_argument("--steps", type=int, default=None, help="override the budget's --max-steps")
    p.add_argument("--epochs", type=int, default=None, help="override the budget's --epochs")
    p.add_argument("--batch-size", type=int, default=None, help="override the budget's batch size")
    p.add_argument("--bank", type=int, default=None, help="kNN bank: this many train images (0: all)")
    p.add_argument("--queries", type=int, default=None, help="kNN queries: this many test images (0: all)")
    p.add_argument("--knn-k", type=int, default=KNN_K)
    p.add_argument("--knn-t", type=float, default=KNN_T)
    p.add_argument("--workers", type=int, default=None, help="train.py --workers and eval workers (all cores)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--amp", default="auto", choices=AMP_CHOICES, help="autocast dtype, as train.py")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--curve-every", type=int, default=None,
                   help="also kNN the checkpoint of every N-th step: a learning curve per method "
                        "(0: final only; default: the budget's)")
    p.add_argument("--train-args", default="", help="extra train.py flags for every method, one quoted string")
    p.add_argument("--runs", default=None, help="run directories go here, kept (default: a temporary folder)")
    p.add_argument("--out", default=None, help="results folder (default bench/results/<device>)")
    return p


# ----------------------------------------------------------------------------- training runs
def method_config(name: str, data: str):
    """train.py's resolved config of `name` on `data` (method yaml, small.yaml for small images)."""
    from pipelines.data import open_source
    cfg, explicit = resolve_config(["--method", name, "--data", data])
    src = open_source(data, "train", progress=False)
    apply_small_profile(cfg, explicit, float(np.median(np.minimum(src.widths, src.heights))))
    return cfg


def train_command(method: str, args, run_dir: Path, budget: dict, cfg) -> list:
    """The train.py command line of one method's budget run. Budget keys the
    method's config lacks (e.g. warmup_epochs) are left out with a note."""
    flags = dict(budget["train"])
    if args.steps is not None:
        flags["max_steps"] = args.steps
    if args.epochs is not None:
        flags["epochs"] = args.epochs
    if args.batch_size is not None:
        flags["batch_size"] = args.batch_size
    if flags.get("max_steps") and args.epochs is None:  # enough epochs for the steps, no more
        steps_per_epoch = max(1, args.train_size // flags.get("batch_size", 256))
        flags["epochs"] = max(1, math.ceil(flags["max_steps"] / steps_per_epoch))
    cmd = [sys.executable, str(ROOT / "train.py"), "--method", method, "--data", args.data,
           "--run-dir", str(run_dir), "--knn-every", "0", "--log-every", "10", "--amp", args.amp,
           "--seed", str(args.seed), "--workers", str(args.workers)]
    if args.pipeline:
        cmd += ["--pipeline", args.pipeline]
    if args.curve_every:
        cmd += ["--keep-every", str(args.curve_every)]
    if args.device:
        cmd += ["--device", args.device]
    global_flags = {"max_steps"}
    for key, value in flags.items():
        if key in global_flags or hasattr(cfg, key):
            cmd += ["--" + key.replace("_", "-"), str(value)]
        else:
            print(f"note: {method} has no '{key}' setting; the budget's {key}={value} is left out")
    return cmd + method_flags(method, shlex.split(args.train_args), cfg)


def method_flags(method: str, tokens: list, cfg) -> list:
    """The --train-args tokens that `method` understands: a '--flag [values]' whose
    setting the method's config lacks (e.g. --queue-size for BYOL) is dropped."""
    kept, i = [], 0
    while i < len(tokens):
        j = i + 1
        while j < len(tokens) and not tokens[j].startswith("--"):
            j += 1
        flag = tokens[i]
        key = flag[2:].split("=", 1)[0].replace("-", "_")
        if key.startswith("no_") and not hasattr(cfg, key):
            key = key[3:]
        if hasattr(cfg, key):
            kept += tokens[i:j]
        else:
            print(f"note: {method} has no '{key}' setting; {' '.join(tokens[i:j])} is left out")
        i = j
    return kept


def read_log(run_dir: Path) -> dict:
    """Last loss, steps and mean img/s from train.py's log.jsonl."""
    out = {}
    speeds = []
    try:
        for line in (run_dir / "log.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if "loss" in rec:
                out["final_loss"], out["steps"] = rec["loss"], rec["step"]
                speeds.append(rec.get("img_s", 0.0))
    except (OSError, ValueError):
        pass
    if speeds:
        out["mean_img_s"] = float(np.mean(speeds))
    return out


def load_checkpoint(path: Path) -> dict:
    """torch.load(weights_only=True), also accepting numpy scalars (an lr taken from
    a numpy schedule lands in the optimizer's param_groups)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            from numpy._core.multiarray import scalar
        except ImportError:  # numpy 1
            from numpy.core.multiarray import scalar
        allowed = [scalar, np.dtype] + [type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32)]
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)


def load_backbone(path: Path, fresh: bool = False, seed: int = 0):
    """(backbone, config, checkpoint) of the train.py checkpoint at `path`: the
    method rebuilt from the checkpoint's config, then its weights (or left at
    a fresh init)."""
    from model.methods import METHODS
    ckpt = load_checkpoint(path)
    config = ckpt["config"]
    torch.manual_seed(seed)
    model = METHODS[config["method"]](argparse.Namespace(**config))
    if not fresh:
        model.load_state_dict(ckpt["model"])
    return model.backbone, config, ckpt


def learning_curve(run_dir: Path, final_step: int, final_acc: float, knn) -> list:
    """[[step, kNN top-1], ...] over the checkpoints train.py kept (--keep-every)
    and the final one, in step order; `knn(backbone)` scores one backbone."""
    curve = {final_step: final_acc}
    for path in run_dir.glob("checkpoint-step*.pth"):
        step = int(path.stem.removeprefix("checkpoint-step"))
        if step not in curve:
            curve[step] = knn(load_backbone(path)[0])
    return [[step, curve[step]] for step in sorted(curve)]


def curve_text(curve: list) -> str:
    return ", ".join(f"{step}: {fmt_pct(acc)}" for step, acc in curve)


def fmt_time(seconds) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def fmt_pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def budget_text(row: dict) -> str:
    if row.get("max_steps"):
        return f"{row['max_steps']} steps x {row['batch_size']}"
    if row.get("epochs"):
        return f"{row['epochs']} epochs x {row['batch_size']}"
    return row.get("budget", "-")


def _training_line(rows: list) -> list:
    done = [r for r in rows if r.get("status") == "ok"]
    if not done:
        return []
    r = done[0]
    return [f"- training: {r.get('arch')}{' small stem' if r.get('small_stem') else ''}, {r.get('image_size')} px, "
            f"pipeline {r.get('pipeline')}, one train.py command per method (stored in the JSON)"]


def markdown(result: dict) -> str:
    env, s = result["environment"], result["settings"]
    lines = [f"# Learning quality: kNN top-1 on {s['data']} (budget {s['budget']})", "",
             f"- device: {env['device_name']} ({env['cpu_count']} CPUs), torch {env['versions']['torch']}, "
             f"DALI {env['versions']['dali']}, python {env['versions']['python']}, {env['date']}",
             f"- command: `{env['command']}`",
             f"- kNN: k={s['knn_k']}, T={s['knn_t']}, cosine; bank: {s['bank_text']}; queries: {s['queries_text']}",
             f"- anchors: random init = the method's backbone freshly initialised (seed {s['seed']}), its BatchNorm "
             f"statistics estimated on the bank images (BN as initialised: eval-mode BN left the identity), "
             f"raw pixels = the normalised {s['image_size']} px image as the vector; same kNN, bank and queries",
             *_training_line(result["rows"]),
             "- wall time: train.py's process (start to exit); the kNN evaluations after it are timed apart",
             f"- whole run: {fmt_time(result.get('total_seconds'))}", "",
             "| method | budget | kNN top-1 | random-init kNN | gain | random init, BN as initialised | raw-pixel kNN "
             "| train wall time | eval time | device |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        gain = (f"{100 * (r['knn_top1'] - r['random_init_knn']):+.1f}"
                if r.get("knn_top1") is not None and r.get("random_init_knn") is not None else "-")
        lines.append(f"| {r['method']} | {budget_text(r)} | {fmt_pct(r.get('knn_top1'))} | "
                     f"{fmt_pct(r.get('random_init_knn'))} | {gain} | "
                     f"{fmt_pct(r.get('random_init_bn_as_initialised_knn'))} | {fmt_pct(r.get('raw_pixel_knn'))} | "
                     f"{fmt_time(r.get('train_seconds'))} | {fmt_time(r.get('eval_seconds'))} | "
                     f"{r.get('device') or env['device']} |")
    curves = [r for r in result["rows"] if r.get("curve")]
    if curves:
        lines += ["", "kNN top-1 along the way (step: top-1; the last is the table's):", ""]
        lines += [f"- {r['method']}: {curve_text(r['curve'])}" for r in curves]
    notes = [r for r in result["rows"] if r.get("status") != "ok"]
    if notes:
        lines += [""] + [f"- {r['method']}: {r['status']}: {r.get('reason') or r.get('error')}" for r in notes]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- kNN
class Scorer:
    """kNN top-1 of a backbone's pooled features, queries against the bank, and
    the two anchors scored the same way: the random-init backbone, once per
    architecture and image size, and the raw pixels, once per image size."""

    def __init__(self, bank, queries, device: torch.device, args):
        self.bank, self.queries, self.device, self.args = bank, queries, device, args
        self.anchors, self.pixels = {}, {}

    def knn(self, net, size: int) -> float:
        a = self.args
        return evaluation.knn_top1(net.to(self.device, memory_format=torch.channels_last), self.bank, self.queries,
                                   size, self.device, a.amp, a.workers, a.knn_k, a.knn_t)

    def random_init(self, name: str, checkpoint: Path, arch: tuple, size: int) -> tuple:
        """(kNN with BatchNorm statistics estimated on the bank, kNN with BN as initialised)
        of the method's backbone freshly initialised (seed --seed)."""
        key = (*arch, size) if arch[0] else (name, size)
        if key not in self.anchors:
            a = self.args
            fresh, _, _ = load_backbone(checkpoint, fresh=True, seed=a.seed)
            print(f"[{name}] random-init anchor ({arch[0]}{' small stem' if arch[1] else ''}, {size} px)", flush=True)
            self.anchors[key] = (evaluation.random_init_anchor(fresh.to(self.device, memory_format=torch.channels_last),
                                                               self.bank, self.queries, size, self.device, a.amp,
                                                               a.workers, a.knn_k, a.knn_t),
                                 self.knn(fresh, size))
        return self.anchors[key]

    def raw_pixels(self, size: int) -> float:
        if size not in self.pixels:
            a = self.args
            self.pixels[size] = evaluation.knn_of_features(
                lambda src: evaluation.pixel_features(src, size, self.device, a.workers),
                self.bank, self.queries, a.knn_k, a.knn_t)
        return self.pixels[size]


# ----------------------------------------------------------------------------- one method
def pretrain(name: str, args, budget: dict, run_dir: Path, row: dict) -> None:
    """Runs train.py for `name`'s budget in a subprocess (its output in run_dir/train.out);
    the command, wall time and log figures go into `row`. Raises when it fails."""
    cfg = method_config(name, args.data)
    cmd = train_command(name, args, run_dir, budget, cfg)
    row["command"] = " ".join(shlex.quote(c) for c in cmd[1:]).replace(str(ROOT) + "/", "")
    print(f"\n[{name}] python {row['command']}", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(run_dir / "train.out", "w") as out:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)
    row["train_seconds"] = time.perf_counter() - t0
    row.update(read_log(run_dir))
    if proc.returncode != 0 or not (run_dir / "checkpoint.pth").exists():
        tail = (run_dir / "train.out").read_text(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"train.py exited with {proc.returncode}: " + " | ".join(tail)[-600:])


def evaluate(name: str, args, run_dir: Path, scorer: Scorer, row: dict) -> None:
    """The kNN of the trained backbone (and of the curve's checkpoints) and both anchors, into `row`."""
    t1 = time.perf_counter()
    backbone, config, ckpt = load_backbone(run_dir / "checkpoint.pth")
    size, arch = config["image_size"], (config.get("arch"), config.get("small_stem"))
    row.update(max_steps=config.get("max_steps"), epochs=config.get("epochs"),
               batch_size=config.get("batch_size"), arch=arch[0], small_stem=arch[1], image_size=size,
               pipeline=config.get("pipeline"), trained_steps=ckpt["step"])
    row["knn_top1"] = scorer.knn(backbone, size)
    if args.curve_every:
        row["curve"] = learning_curve(run_dir, ckpt["step"], row["knn_top1"], lambda net: scorer.knn(net, size))
        print(f"[{name}] kNN along the way: {curve_text(row['curve'])}", flush=True)
    row["eval_seconds"] = time.perf_counter() - t1
    row["random_init_knn"], row["random_init_bn_as_initialised_knn"] = scorer.random_init(
        name, run_dir / "checkpoint.pth", arch, size)
    row["raw_pixel_knn"] = scorer.raw_pixels(size)


def measure_method(name: str, methods, args, budget: dict, runs_root: Path, scorer: Scorer, device) -> dict:
    """One method's row: skipped, an error with its reason, or trained and scored."""
    row = {"method": name, "budget": args.budget, "device": str(device)}
    if name not in methods:
        row.update(status="skipped", reason=f"not in model.methods.METHODS (registered: {', '.join(sorted(methods))})")
        print(f"skipped {name}: {row['reason']}")
        return row
    try:
        run_dir = runs_root / f"{name}-{args.budget}"
        pretrain(name, args, budget, run_dir, row)
        evaluate(name, args, run_dir, scorer, row)
        row["status"] = "ok"
        print(f"[{name}] kNN top-1 {fmt_pct(row['knn_top1'])} (random init {fmt_pct(row['random_init_knn'])}, "
              f"raw pixels {fmt_pct(row['raw_pixel_knn'])}); trained {fmt_time(row['train_seconds'])}, "
              f"evaluated {fmt_time(row['eval_seconds'])}", flush=True)
    except Exception as e:
        row.update(status="error", error=short_error(e))
        print(f"[{name}] FAILED {row['error']}", flush=True)
    return row


# ----------------------------------------------------------------------------- main
def subset_text(part, whole, what: str, seed: int) -> str:
    return (f"{len(part):,} of {len(whole):,} {what} images"
            + (f" (fixed random subset, seed {seed})" if len(part) < len(whole) else ""))


def settings(args, budget: dict, splits: tuple, image_size) -> dict:
    train_src, test_src, bank_src, query_src = splits
    return {"budget": args.budget, "budget_flags": budget["train"], "data": args.data, "knn_k": args.knn_k,
            "knn_t": args.knn_t, "bank": len(bank_src), "queries": len(query_src),
            "bank_text": subset_text(bank_src, train_src, "train", SUBSET_SEED),
            "queries_text": subset_text(query_src, test_src, "test", SUBSET_SEED + 1),
            "seed": args.seed, "workers": args.workers, "amp": args.amp, "image_size": image_size,
            "curve_every": args.curve_every, "steps_override": args.steps, "epochs_override": args.epochs,
            "train_args": args.train_args}


def main(argv: list | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_args_parser().parse_args(argv)
    args.workers = args.workers if args.workers is not None else cpu_count()
    budget = BUDGETS[args.budget]
    args.device = args.device or budget.get("device")
    args.curve_every = budget["curve_every"] if args.curve_every is None else args.curve_every
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.amp, amp_reason = resolve_amp(args.amp, device)  # train.py's runs get the resolved value too
    print(f"amp {args.amp} ({amp_reason})", flush=True)
    env = environment(device, argv, "bench/quality.py")
    t_start = time.perf_counter()

    from pipelines.data import open_source
    print(f"preparing {args.data} (written once into the cache)", flush=True)
    train_src, test_src = open_source(args.data, "train"), open_source(args.data, "test")
    if test_src is None or not train_src.has_labels:
        print(f"error: {args.data} needs labels and a test split for kNN", file=sys.stderr)
        return 2
    args.train_size = len(train_src)
    bank_src = random_subset(train_src, budget["bank"] if args.bank is None else args.bank, SUBSET_SEED)
    query_src = random_subset(test_src, budget["queries"] if args.queries is None else args.queries, SUBSET_SEED + 1)
    try:
        from model.methods import METHODS
    except Exception as e:
        print(f"error: model.methods does not import ({short_error(e)})", file=sys.stderr)
        return 2
    names = list(METHODS) if args.methods == "all" else comma_list(args.methods)
    runs_root = Path(args.runs) if args.runs else Path(tempfile.mkdtemp(prefix="viewforge-quality-"))
    scorer = Scorer(bank_src, query_src, device, args)
    try:
        rows = [measure_method(name, METHODS, args, budget, runs_root, scorer, device) for name in names]
    finally:
        if not args.runs:
            shutil.rmtree(runs_root, ignore_errors=True)

    image_size = next((r["image_size"] for r in rows if "image_size" in r), None)
    result = {"environment": env, "settings": settings(args, budget, (train_src, test_src, bank_src, query_src),
                                                       image_size),
              "rows": rows, "total_seconds": time.perf_counter() - t_start}
    out_dir = Path(args.out) if args.out else ROOT / "bench" / "results" / env["slug"]
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"quality-{args.budget}"
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    table = markdown(result)
    (out_dir / f"{stem}.md").write_text(table)
    print("\n" + table)
    print(f"total {fmt_time(result['total_seconds'])}; wrote {out_dir / stem}.md and .json")
    return 0 if all(r.get("status") in ("ok", "skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Self-supervised pre-training: one readable loop.

One process (a GPU if there is one, else the CPU), on the built-in sample:
    python train.py --pipeline dali --method mocov2
One node, 8 GPUs:
    torchrun --standalone --nproc_per_node=8 train.py --pipeline dali --method mocov2 --data /data/imagenet
Several nodes: cluster/slurm.sh (srun + torchrun, c10d rendezvous), or torchrun --nnodes.
Re-running the same command resumes from its run directory, mid-epoch.
Afterwards, on the same run directory:
    python train.py --method mocov2 --eval linear         # linear probe on frozen features
    python train.py --method mocov2 --export backbone.pth # torchvision-loadable backbone

Defaults come from configs/<method>.yaml (each number with its source);
every key there is also a flag. Small images (the built-in sample,
Fashion-MNIST) add configs/small.yaml. Flags given on the command line win.

Every value is checked against rules.RULES before any work starts.
Exit codes: 0 done; 2 bad input (one line: a flag out of range, missing
data, no usable checkpoint, a full disk); 3 a NaN or inf loss (the last good
checkpoint stays); 75 stopped by SIGTERM/SIGINT after checkpointing (run the
same command again to resume). See model/checkpoints.py.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import time
from pathlib import Path

# A batch of views is tens of MB: with this, torch puts large CPU tensors on
# 2 MB pages, and filling fresh ones stops costing a page fault per 4 kB
# (4x faster on the 2-core machine; read once, so set before torch loads).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import yaml  # noqa: E402

from model import checkpoints  # noqa: E402
from configs import rules  # noqa: E402

ROOT = Path(__file__).resolve().parent
CONFIGS = ROOT / "configs"
# Flags that may differ between a run and its resumption.
RESUMABLE_CHANGES = {"epochs", "max_steps", "linear_epochs", "pipeline", "workers", "knn_every", "log_every",
                     "ckpt_every", "keep_every", "tensorboard", "log_samples", "stop_after", "eval", "export", "compile",
                     "cpu_graph", "device", "run_dir", "data_changed"}


class UserError(Exception):
    """Bad input: one clear line, exit code 2."""


class NonFiniteLoss(Exception):
    """A NaN or inf loss: one line, exit code 3, no checkpoint after it."""


# ----------------------------------------------------------------------------- config
def get_args_parser(method_defaults: dict | None = None) -> argparse.ArgumentParser:
    from model.methods import METHODS
    import pipelines
    p = argparse.ArgumentParser(description="Self-supervised pre-training (viewforge)", add_help=True)
    default_pipeline = "dali" if "dali" in pipelines.PIPELINES else "torchvision"
    p.add_argument("--method", default="mocov2", choices=sorted(METHODS), help="pre-training method")
    p.add_argument("--pipeline", default=default_pipeline, choices=sorted(pipelines.PIPELINES),
                   help="view pipeline (backends appear when their package is installed)")
    p.add_argument("--data", default=None, help="ImageFolder dir, file list .txt, 'fashion-mnist'; default: built-in sample")
    p.add_argument("--run-dir", default=None, help="default: runs/<method>-<data>")
    p.add_argument("--workers", type=int, default=2, help="pipeline worker threads/processes per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "fp32"], help="autocast dtype (fp16 uses a GradScaler)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across ranks")
    p.add_argument("--cpu-graph", action="store_true", help="DALI: run the graph on the CPU even with a GPU")
    p.add_argument("--knn-every", type=int, default=1, help="kNN monitor every N epochs (0: never)")
    p.add_argument("--knn-k", type=int, default=200)
    p.add_argument("--knn-t", type=float, default=0.1)
    p.add_argument("--log-every", type=int, default=10, help="steps between JSON log lines")
    p.add_argument("--ckpt-every", type=int, default=0, help="also checkpoint every N steps (0: at epoch ends)")
    p.add_argument("--keep-every", type=int, default=0,
                   help="also keep every N-th step's checkpoint as checkpoint-step<N>.pth (learning curves)")
    p.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard in the run dir")
    p.add_argument("--log-samples", action="store_true",
                   help="every rank logs its dataset indices of every step to samples-rank<r>.jsonl")
    p.add_argument("--max-steps", type=int, default=0, help="train N steps in all (schedules span them), even mid-epoch")
    p.add_argument("--stop-after", type=int, default=0, help="stop (as if killed) after N steps of this process")
    p.add_argument("--eval", choices=["linear"], default=None, help="evaluate the run's backbone instead of training")
    p.add_argument("--linear-epochs", type=int, default=100)
    p.add_argument("--export", default=None, metavar="PATH", help="write the run's backbone as a torchvision state_dict")
    p.add_argument("--data-changed", choices=["refuse", "ok"], default="refuse",
                   help="resuming over a dataset whose files changed since the checkpoint: refuse, or go on (ok)")
    for key, value in (method_defaults or {}).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            p.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
        elif isinstance(value, (list, tuple)):
            p.add_argument(flag, dest=key, type=type(value[0]) if value else float, nargs="+", default=argparse.SUPPRESS)
        else:
            p.add_argument(flag, dest=key, type=type(value) if value is not None else str, default=argparse.SUPPRESS)
    return p


def load_yaml(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f) or {}


def resolve_config(argv: list[str]) -> tuple[argparse.Namespace, dict]:
    """Method yaml < configs/small.yaml (small images) < command line."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default="mocov2")
    known, _ = pre.parse_known_args(argv)
    path = CONFIGS / f"{known.method}.yaml"
    method_defaults = load_yaml(path) if path.exists() else {}
    args = get_args_parser(method_defaults).parse_args(argv)
    explicit = {k: v for k, v in vars(args).items() if k in method_defaults}
    cfg = dict(method_defaults)
    cfg.update(vars(args))
    return argparse.Namespace(**cfg), explicit


def apply_small_profile(cfg: argparse.Namespace, explicit: dict, median_side: float) -> list[str]:
    """Images of at most 64 px (the sample, Fashion-MNIST) get configs/small.yaml
    for keys the method has and the command line did not set. A mapping
    there replaces the method's value by its entry (arch: resnet50 ->
    resnet18, rf_resnet50 -> rf_resnet18) and leaves other values alone."""
    if median_side > 64:
        return []
    changed = []
    for key, value in load_yaml(CONFIGS / "small.yaml").items():
        if isinstance(value, dict):
            value = value.get(getattr(cfg, key, None), getattr(cfg, key, None))
        if hasattr(cfg, key) and key not in explicit and getattr(cfg, key) != value:
            setattr(cfg, key, value)
            changed.append(f"{key}={value}")
    return changed


# ----------------------------------------------------------------------------- distributed
def init_distributed(device_arg: str | None):
    """torchrun variables, then SLURM's, else a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
        env.setdefault("MASTER_PORT", "29500")
        if "MASTER_ADDR" not in env:
            raise UserError("SLURM run without MASTER_ADDR: launch through cluster/slurm.sh or set it")
    else:
        rank, world, local = 0, 1, 0
    device = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        # plain Slurm may give a task every GPU of its node, or only its own
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if world > 1:
        # device_id binds NCCL's communicator to this GPU at once (no guess on the first collective)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
    return rank, world, device


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def log(*a):
    if is_main():
        print(*a, flush=True)


# ----------------------------------------------------------------------------- schedules
def cosine_schedule(base: float, total: int, warmup: int, final: float = 0.0) -> np.ndarray:
    """Per-step values: linear warm-up from 0, then half a cosine to `final`."""
    warm = np.linspace(0.0, base, warmup, endpoint=False) if warmup > 0 else np.array([])
    steps = np.arange(total - len(warm))
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(1, len(steps))))
    return np.concatenate([warm, cos])


def schedule_steps(epochs: int, steps_per_epoch: int, warmup_epochs: float, max_steps: int | None) -> tuple:
    """(total, warm-up) steps. A --max-steps budget shorter than the epochs
    compresses the whole schedule into it, warm-up included (same fraction
    of the run), so a short run is never all warm-up."""
    total, warmup = epochs * steps_per_epoch, int(round(warmup_epochs * steps_per_epoch))
    if max_steps and max_steps < total:
        warmup = int(round(warmup * max_steps / total))
        total = max_steps
    return total, warmup


# ----------------------------------------------------------------------------- checkpoints
# Writing (temporary file, fsync, rename, checkpoint.prev.pth kept) and reading
# (fall back to the previous good one) live in model/checkpoints.py.
def keep_checkpoint(path: Path, step: int) -> Path:
    """checkpoint-step<step>.pth beside `path`: a hard link to the checkpoint
    just written (a copy where links are not possible); the next os.replace
    of `path` leaves it untouched."""
    kept = path.with_name(f"checkpoint-step{step}.pth")
    if not kept.exists():
        try:
            os.link(path, kept)
        except OSError:
            shutil.copyfile(path, kept)
    return kept


def prepare_run_dir(cfg) -> Path:
    run_dir = Path(cfg.run_dir or ROOT / "runs" / f"{cfg.method}-{data_name(cfg.data)}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"run directory {run_dir} is not writable: {e.strerror or e}")
    return run_dir


def data_name(data: str | None) -> str:
    if data is None:
        return "sample"
    return Path(data.rstrip("/")).name.replace(".txt", "") or "data"


# ----------------------------------------------------------------------------- monitor
@torch.no_grad()
def extract_features(backbone, source, cfg, device, rank, world):
    """L2-normalised pooled features of every sample, gathered on all ranks, in dataset order."""
    from pipelines.evaluation import eval_batches
    backbone.eval()
    feats, idxs = [], []
    with torch.autocast(device.type, dtype=amp_dtype(cfg.amp), enabled=cfg.amp != "fp32"):
        for x, idx in eval_batches(source, cfg.image_size, 256, device, cfg.workers, rank, world):
            _, pooled = backbone(x.contiguous(memory_format=torch.channels_last))
            feats.append(torch.nn.functional.normalize(pooled.float(), dim=1).cpu())
            idxs.append(idx)
    backbone.train()
    feats, idxs = torch.cat(feats), torch.cat(idxs)
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, (feats, idxs))
        feats = torch.cat([p[0] for p in parts])
        idxs = torch.cat([p[1] for p in parts])
    order = torch.argsort(idxs)
    return feats[order], torch.as_tensor(source.labels)[idxs[order]]


def knn_monitor(backbone, train_src, test_src, cfg, device, rank, world) -> float:
    from model.knn import knn_accuracy
    bank, bank_labels = extract_features(backbone, train_src, cfg, device, rank, world)
    feats, labels = extract_features(backbone, test_src, cfg, device, rank, world)
    return knn_accuracy(feats, labels, bank, bank_labels, num_classes=len(train_src.classes),
                        k=cfg.knn_k, temperature=cfg.knn_t)


def parameter_digest(model: torch.nn.Module) -> float:
    """A float64 fingerprint of all parameters (position-weighted, so swaps show)."""
    total = 0.0
    for i, p in enumerate(model.parameters()):
        flat = p.detach().double().flatten()
        total += float((flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64).remainder(7).add(1)).sum()) * (i + 1)
    return total


def stop_requested(stop: "checkpoints.StopSignals") -> bool:
    """Whether a signal arrived here or, under DDP, on any rank (all ranks stop at the same step)."""
    if not dist.is_initialized():
        return stop.received is not None
    flag = torch.tensor([stop.received is not None], dtype=torch.int32,
                        device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def summed_over_ranks(count: int, device) -> int:
    if not dist.is_initialized():
        return count
    total = torch.tensor([count], dtype=torch.int64, device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(total)
    return int(total.item())


def amp_dtype(name: str):
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


# ----------------------------------------------------------------------------- commands
def linear_probe(backbone, train_src, test_src, cfg, device) -> float:
    """Logistic regression on frozen, unaugmented features (full batch, L-BFGS)."""
    xtr, ytr = extract_features(backbone, train_src, cfg, device, 0, 1)
    xte, yte = extract_features(backbone, test_src, cfg, device, 0, 1)
    head = torch.nn.Linear(xtr.shape[1], len(train_src.classes))
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=cfg.linear_epochs, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(xtr), ytr) + 1e-4 * head.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (head(xte).argmax(1) == yte).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return run(argv)
    except (UserError, rules.ConfigError, checkpoints.CheckpointError) as e:
        close_progress_bars()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        close_progress_bars()
        print(f"error: {e}", file=sys.stderr)
        return checkpoints.EXIT_NONFINITE
    finally:
        checkpoints.StopSignals.restore_all()
        if dist.is_initialized():
            dist.destroy_process_group()


def close_progress_bars():
    """Clear tqdm's bars (leave=False) so that an error is a line of its own."""
    from tqdm import tqdm
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def run(argv: list[str]) -> int:
    import pipelines
    from model.methods import METHODS
    from pipelines.data import DataError, open_source

    cfg, explicit = resolve_config(argv)
    rules.check(cfg)
    rank, world, device = init_distributed(cfg.device)
    torch.manual_seed(cfg.seed)

    # Rank 0 builds the index and materialises data first; the others then find it cached.
    if world > 1 and rank != 0:
        dist.barrier()
    try:
        train_src = open_source(cfg.data, "train", progress=is_main())
        test_src = open_source(cfg.data, "test", progress=is_main())
    except DataError as e:
        raise UserError(str(e))
    if world > 1 and rank == 0:
        dist.barrier()
    changed = apply_small_profile(cfg, explicit, float(np.median(np.minimum(train_src.widths, train_src.heights))))
    if changed:
        log(f"small images: configs/small.yaml sets {', '.join(changed)}")
        rules.check(cfg)
    run_dir = prepare_run_dir(cfg)
    ckpt, ckpt_path = checkpoints.load(run_dir, cfg.method, "cpu",
                                       warn=lambda m: is_main() and print(f"warning: {m}", file=sys.stderr, flush=True))

    method = METHODS[cfg.method]
    model = method(cfg).to(device, memory_format=torch.channels_last)
    if cfg.eval or cfg.export:
        if ckpt is None:
            raise UserError(f"no checkpoint in {run_dir} to evaluate or export; train first")
        model.load_state_dict(ckpt["model"])
        if cfg.export:
            from model.backbones import export_torchvision
            torch.save(export_torchvision(model.backbone), cfg.export)
            log(f"wrote {cfg.export}: {model.backbone.load_hint}")
        if cfg.eval == "linear":
            if test_src is None or not train_src.has_labels:
                raise UserError("linear evaluation needs a labelled train split and a test split")
            acc = linear_probe(model.backbone, train_src, test_src, cfg, device)
            log(f"linear probe top-1: {acc * 100:.2f}%")
            with open(run_dir / "eval.json", "w") as f:
                json.dump({"linear_top1": acc, "epoch": ckpt["epoch"]}, f)
        return 0

    if cfg.batch_size % world:
        raise UserError(f"batch size {cfg.batch_size} is not divisible by the {world} processes")
    try:
        loader = pipelines.build(cfg.pipeline, method.spec(cfg), train_src, batch_size=cfg.batch_size // world,
                                 seed=cfg.seed, rank=rank, world_size=world, device=device, workers=cfg.workers,
                                 **({"cpu": True} if cfg.cpu_graph and cfg.pipeline == "dali" else {}))
    except pipelines.PipelineError as e:
        raise UserError(str(e))

    if cfg.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    raw_model = model
    from model.optim import build_optimizer
    lr = cfg.lr * cfg.batch_size / 256  # linear scaling rule (Goyal et al. 2017)
    optimizer = build_optimizer(cfg, raw_model, lr)
    steps_per_epoch = len(loader)
    total_steps, warmup_steps = schedule_steps(cfg.epochs, steps_per_epoch, cfg.warmup_epochs, cfg.max_steps)
    lr_schedule = cosine_schedule(lr, total_steps, warmup_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")

    config = {k: v for k, v in vars(cfg).items()}
    global_step = 0
    if ckpt is not None:
        diff = {k: (ckpt["config"].get(k), v) for k, v in config.items()
                if k not in RESUMABLE_CHANGES and ckpt["config"].get(k) != v}
        if diff:
            raise UserError(f"{run_dir} holds a run with other settings "
                            f"({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in diff.items())}); "
                            "use another --run-dir")
        data_then = ckpt.get("data")
        if data_then and data_then["fingerprint"] != train_src.fingerprint:
            counts = (f"{data_then['images']:,} images then, {len(train_src):,} now"
                      if data_then["images"] != len(train_src) else f"{len(train_src):,} images, some modified")
            what = f"{cfg.data or 'the sample'} changed since {ckpt_path.name} was written ({counts})"
            if cfg.data_changed != "ok":
                raise UserError(f"{what}: the plan of every step depends on the dataset, so this run cannot resume "
                                "exactly; pass --data-changed ok to resume anyway, or use another --run-dir")
            log(f"warning: {what}; resuming anyway (--data-changed ok)")
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        loader.load_state_dict(ckpt["loader"])
        global_step = ckpt["step"]
        log(f"resumed from {ckpt_path} at epoch {loader.epoch} step {loader.step} (global step {global_step})")
    if global_step >= total_steps:
        log(f"{run_dir} is complete ({cfg.epochs} epochs); raise --epochs or pick another --run-dir")
        return 0
    if is_main():
        with open(run_dir / "config.yaml", "w") as f:
            yaml.safe_dump(config, f, sort_keys=True)

    if world > 1:
        ddp_kw = {"device_ids": [device.index]} if device.type == "cuda" else {}
        model = torch.nn.parallel.DistributedDataParallel(model, **ddp_kw)
    if cfg.compile:
        model = torch.compile(model)

    writer = None
    if cfg.tensorboard and is_main():
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(run_dir / "tb")
        if global_step == 0:  # the view sheet of step 0 (bench/show.py), rendered on a loader of its own
            from bench import show
            show.add_views_to_tensorboard(writer, cfg, method.spec(cfg), train_src, device)
    log_file = open(run_dir / "log.jsonl", "a") if is_main() else None
    samples_file = open(run_dir / f"samples-rank{rank}.jsonl", "a") if cfg.log_samples else None

    # A NaN or inf loss is noted on the device (no sync per step) and looked at
    # before every log line and checkpoint, so no checkpoint follows a bad step.
    first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)
    last_finite = torch.zeros((), dtype=torch.float32, device=device)

    def stop_if_nonfinite():
        bad = int(first_bad_step)
        if bad >= 0:
            raise NonFiniteLoss(f"loss is not finite (nan or inf) at step {bad}; last finite loss "
                                f"{float(last_finite):.6g} at step {bad - 1}; stopping without a checkpoint "
                                f"(the last one in {run_dir} is from before that step)")

    def checkpoint():
        stop_if_nonfinite()
        if world > 1:  # replicas must agree exactly; a divergence is a bug worth stopping for
            digests = [None] * world
            dist.all_gather_object(digests, parameter_digest(raw_model))
            write_log({"step": global_step, "replica_digests": digests})
            if len(set(digests)) > 1:
                raise RuntimeError(f"replicas diverged at step {global_step}: {digests}")
        if is_main():
            checkpoints.save(run_dir, {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                                       "scaler": scaler.state_dict(), "loader": loader.state_dict(),
                                       "step": global_step, "epoch": loader.epoch, "config": config,
                                       "data": {"fingerprint": train_src.fingerprint, "images": len(train_src)}})
            if cfg.keep_every and global_step % cfg.keep_every == 0:
                keep_checkpoint(run_dir / checkpoints.CURRENT, global_step)
        if world > 1:
            dist.barrier()

    def write_log(record):
        if log_file:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        if writer:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    writer.add_scalar(k, v, record["step"])

    log(f"{cfg.method} on {cfg.pipeline} ({device}, {world} process{'es' if world > 1 else ''}): "
        f"{len(train_src)} images, {steps_per_epoch} steps/epoch, {cfg.epochs} epochs, batch {cfg.batch_size}, "
        f"lr {lr:g}, {cfg.arch}{' small stem' if cfg.small_stem else ''}, {cfg.image_size} px, amp {cfg.amp}")
    from tqdm import tqdm
    autocast = torch.autocast(device.type, dtype=amp_dtype(cfg.amp), enabled=cfg.amp != "fp32")
    steps_this_process = 0
    model.train()
    def monitor(epoch):
        if cfg.knn_every and test_src is not None and train_src.has_labels:
            acc = knn_monitor(raw_model.backbone, train_src, test_src, cfg, device, rank, world)
            log(f"epoch {epoch}: kNN top-1 {acc * 100:.2f}% (k={cfg.knn_k}, T={cfg.knn_t})")
            write_log({"step": global_step, "epoch": epoch, "knn_top1": acc})

    stop = checkpoints.StopSignals().__enter__()  # SIGTERM / SIGINT: finish the step, checkpoint, exit 75 (main restores)
    while global_step < total_steps:
        epoch = loader.epoch
        if hasattr(raw_model, "neighbour_table"):  # CLIM: this epoch's plans fetch the neighbours it names
            loader.set_neighbours(raw_model.neighbour_table(epoch))
        bar = tqdm(total=steps_per_epoch, initial=loader.step, desc=f"epoch {epoch}", unit="step",
                   disable=not is_main(), dynamic_ncols=True, leave=False)
        t_last, seen = time.perf_counter(), 0
        for views in loader:
            for group in optimizer.param_groups:
                group["lr"] = float(lr_schedule[global_step]) * group.get("lr_scale", 1.0)
            with autocast:
                loss, metrics = model(views)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            finite = torch.isfinite(loss.detach()).all()
            first_bad_step.copy_(torch.where(finite | (first_bad_step >= 0), first_bad_step, global_step + 1))
            last_finite.copy_(torch.where(finite & (first_bad_step < 0), loss.detach().float(), last_finite))
            raw_model.step_end((global_step + 1) / total_steps)
            global_step += 1
            steps_this_process += 1
            seen += views.batch_size * world
            bar.update(1)
            if samples_file:
                samples_file.write(json.dumps({"step": global_step, "rank": rank, "world": world,
                                               "index": views.index.tolist()}) + "\n")
                samples_file.flush()
            if global_step % cfg.log_every == 0 or loader.step == steps_per_epoch or global_step == total_steps:
                now = time.perf_counter()
                loss_value = loss.detach().float()
                if world > 1:  # the global batch's loss (equal local batches), whatever the number of processes
                    dist.all_reduce(loss_value)
                    loss_value /= world
                record = {"step": global_step, "epoch": epoch, "loss": loss_value.item(),
                          "lr": float(lr_schedule[global_step - 1]), "img_s": seen / (now - t_last)}
                record.update({k: float(v) for k, v in metrics.items()})
                t_last, seen = now, 0
                bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_s']:.0f}")
                write_log(record)
                stop_if_nonfinite()
            stopping = stop_requested(stop)
            if stopping or any(every and global_step % every == 0 for every in (cfg.ckpt_every, cfg.keep_every)):
                checkpoint()
            if stopping:
                loader.close()
                log(f"stopped by {stop.received or 'a signal on another rank'} after step {global_step}; "
                    f"checkpoint written to {run_dir}; run the same command to resume")
                return checkpoints.EXIT_PREEMPTED
            if cfg.stop_after and steps_this_process >= cfg.stop_after:
                loader.close()
                log(f"stopped after {steps_this_process} steps (--stop-after)")
                return 0
            if global_step >= total_steps and loader.step < steps_per_epoch:
                break  # a step budget that ends mid-epoch
        bar.close()
        replaced = summed_over_ranks(len(loader.replaced), device)
        if replaced:
            example = f" (e.g. {train_src.paths[loader.replaced[0]]})" if loader.replaced else ""
            log(f"warning: epoch {epoch}: {replaced} unreadable image{'s' if replaced > 1 else ''} rendered as "
                f"flat replacements{example}; the epoch went on")
            write_log({"step": global_step, "epoch": epoch, "replaced": replaced})
            loader.replaced.clear()
        checkpoint()
        finished = global_step >= total_steps
        log(f"epoch {epoch} {'stopped at the step budget' if finished and loader.step else 'done'}: "
            f"loss {loss.item():.4f}")
        if finished or (cfg.knn_every and (epoch + 1) % cfg.knn_every == 0):
            monitor(epoch)
        if is_main():  # run_dir/curves.png redrawn from log.jsonl
            from bench import show
            show.write_curves(run_dir)
    loader.close()
    if writer:
        writer.close()
    log(f"done: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# A batch of views is tens of MB: with this, torch puts large CPU tensors on
# 2 MB pages, and filling fresh ones stops costing a page fault per 4 kB
# (4x faster on the 2-core machine; read once, so set before torch loads).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import yaml  # noqa: E402

from configs import apply_small_profile, resolve_config, rules  # noqa: E402,F401 (tests and bench import them here)
from model import checkpoints, curves, evaluation, faults, sheets  # noqa: E402
from model.distributed import (LaunchError, StopVote, init_distributed, is_main, log,  # noqa: E402,F401
                               parameter_digest, summed_over_ranks)
from model.optim import build_optimizer, cosine_schedule, schedule_steps  # noqa: E402
from model.precision import resolve_amp  # noqa: E402
from model.step import TrainStep, WaitClock  # noqa: E402

ROOT = Path(__file__).resolve().parent
# Flags that may differ between a run and its resumption.
RESUMABLE_CHANGES = {"epochs", "max_steps", "linear_epochs", "pipeline", "workers", "knn_every", "log_every",
                     "ckpt_every", "keep_every", "tensorboard", "log_samples", "stop_after", "eval", "export",
                     "compile", "cpu_graph", "device", "run_dir", "data_changed", "amp_reason"}


class UserError(Exception):
    """Bad input: one clear line, exit code 2."""


class NonFiniteLoss(Exception):
    """A NaN or inf loss: one line, exit code 3, no checkpoint after it."""


@dataclass
class RunState:
    """What the line of a run stopped by a signal says, and what every ending
    closes: loaders and their workers, log files, the run directory's lock."""
    phase: str = "starting"
    run_dir: Path | None = None
    saved_step: int = 0  # the global step of the newest checkpoint (0: none)
    resources: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def enter(self, phase: str, fault: str | None = None) -> None:
        self.phase = phase
        if fault:
            faults.at(fault)

    def stopped_line(self, signal_name: str) -> str:
        kept = (f"the checkpoint of step {self.saved_step} is in {self.run_dir}; run the same command to resume"
                if self.saved_step else "no training step to keep; run the same command to start again")
        return f"stopped by {signal_name} while {self.phase}; {kept}"


# ----------------------------------------------------------------------------- run directory, data, commands
def open_data(cfg, rank: int, world: int):
    """(train, test) sources; rank 0 builds the index and materialises data
    first, the others then find it cached."""
    from pipelines.data import DataError, open_source
    if world > 1 and rank != 0:
        dist.barrier()
    try:
        train_src = open_source(cfg.data, "train", progress=is_main())
        test_src = open_source(cfg.data, "test", progress=is_main())
    except DataError as e:
        raise UserError(str(e))
    if world > 1 and rank == 0:
        dist.barrier()
    return train_src, test_src


# ----------------------------------------------------------------------------- the loop
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    stop = checkpoints.StopSignals().__enter__()  # SIGTERM / SIGINT from here on (model/checkpoints.py)
    state = RunState()
    try:
        return run(argv, stop, state)
    except checkpoints.Stopped as e:
        close_progress_bars()
        log(state.stopped_line(str(e)))
        return checkpoints.EXIT_PREEMPTED
    except (UserError, LaunchError, rules.ConfigError, checkpoints.CheckpointError,
            evaluation.EvaluationError) as e:
        close_progress_bars()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        close_progress_bars()
        print(f"error: {e}", file=sys.stderr)
        return checkpoints.EXIT_NONFINITE
    finally:
        state.resources.close()  # however the run ended: loaders (and their workers), files, the lock
        checkpoints.StopSignals.restore_all()
        if dist.is_initialized():
            dist.destroy_process_group()


def close_progress_bars():
    """Clear tqdm's bars (leave=False) so that an error is a line of its own."""
    from tqdm import tqdm
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def run(argv: list[str], stop: checkpoints.StopSignals, state: RunState) -> int:
    import pipelines
    from model.methods import METHODS

    cfg, explicit = resolve_config(argv)
    rules.check(cfg)
    rank, world, device = init_distributed(cfg.device)
    cfg.amp, cfg.amp_reason = resolve_amp(cfg.amp, device)  # config.yaml keeps both
    torch.manual_seed(cfg.seed)
    state.enter("building the index", "index")
    train_src, test_src = open_data(cfg, rank, world)
    state.enter("starting")
    changed = apply_small_profile(cfg, explicit, float(np.median(np.minimum(train_src.widths, train_src.heights))),
                                  device.type)
    if changed:
        log(f"small images: configs/small.yaml{' and small_cpu.yaml' if device.type == 'cpu' else ''} set "
            f"{', '.join(changed)}")
        rules.check(cfg)
    run_dir = state.run_dir = checkpoints.prepare_run_dir(cfg, ROOT)
    if is_main() and not (cfg.export and not cfg.eval):  # an export only reads the (atomically replaced) checkpoint
        state.resources.callback(checkpoints.RunDirLock(run_dir).release)
    ckpt, ckpt_path = checkpoints.load(run_dir, cfg.method, "cpu",
                                       warn=lambda m: is_main() and print(f"warning: {m}", file=sys.stderr, flush=True))

    method = METHODS[cfg.method]
    model = method(cfg).to(device, memory_format=torch.channels_last)
    if cfg.eval or cfg.export:
        if ckpt is None:
            raise UserError(f"no checkpoint in {run_dir} to evaluate or export; train first")
        model.load_state_dict(ckpt["model"])
        state.saved_step = 0  # evaluating or exporting trains nothing: a stop keeps nothing new
        if cfg.export:
            from model.backbones import export_torchvision
            state.enter("exporting the backbone", "export")
            try:
                checkpoints.save_file(export_torchvision(model.backbone), Path(cfg.export))
            except OSError as e:
                raise UserError(f"cannot write {cfg.export}: {e.strerror or e}") from None
            log(f"wrote {cfg.export}: {model.backbone.load_hint}")
        if cfg.eval == "linear":
            state.enter("running the linear probe", "linear")
            evaluation.evaluate_checkpoint(cfg, model, ckpt, run_dir, train_src, test_src, device, log)
        return 0

    if cfg.batch_size % world:
        raise UserError(f"batch size {cfg.batch_size} is not divisible by the {world} processes")
    try:
        loader = pipelines.build(cfg.pipeline, method.spec(cfg), train_src, batch_size=cfg.batch_size // world,
                                 seed=cfg.seed, rank=rank, world_size=world, device=device, workers=cfg.workers,
                                 **pipelines.backend_options(cfg.pipeline, cfg))
    except pipelines.PipelineError as e:
        raise UserError(str(e))
    state.resources.callback(loader.close)

    if cfg.sync_bn and world > 1:
        if device.type != "cuda":  # torch's SyncBatchNorm raises in its first forward on the CPU
            raise UserError("--sync-bn needs CUDA devices (torch's SyncBatchNorm has no CPU kernel); "
                            "drop it on the CPU")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    raw_model = model
    lr = cfg.lr * cfg.batch_size / 256  # linear scaling rule (Goyal et al. 2017)
    optimizer = build_optimizer(cfg, raw_model, lr)
    steps_per_epoch = len(loader)
    total_steps, warmup_steps = schedule_steps(cfg.epochs, steps_per_epoch, cfg.warmup_epochs, cfg.max_steps)
    lr_schedule = cosine_schedule(lr, total_steps, warmup_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")

    config = dict(vars(cfg))
    global_step = 0
    if ckpt is not None:
        checkpoints.check_resumable(cfg, config, ckpt, ckpt_path, run_dir, train_src, RESUMABLE_CHANGES, log)
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        loader.load_state_dict(ckpt["loader"])
        global_step = state.saved_step = ckpt["step"]
        log(f"resumed from {ckpt_path} at epoch {loader.epoch} step {loader.step} (global step {global_step})")
    if global_step >= total_steps:
        log(f"{run_dir} is complete ({cfg.epochs} epochs); raise --epochs or pick another --run-dir")
        return 0
    if is_main():
        with open(run_dir / "config.yaml", "w") as f:
            yaml.safe_dump(config, f, sort_keys=True)

    writer = None
    if cfg.tensorboard and is_main():
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(run_dir / "tb")
        if global_step == 0:  # the view sheet of step 0 (model/sheets.py), rendered on a loader of its own
            sheets.add_views_to_tensorboard(writer, cfg, method.spec(cfg), train_src, device)
    if writer:
        state.resources.callback(writer.close)
    log_file = state.resources.enter_context(open(run_dir / "log.jsonl", "a")) if is_main() else None
    samples_file = (state.resources.enter_context(open(run_dir / f"samples-rank{rank}.jsonl", "a"))
                    if cfg.log_samples else None)

    def write_log(record):
        if log_file:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        if writer:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    writer.add_scalar(k, v, record["step"])

    # The random-init anchor (model/evaluation.py): measured once, before the
    # first step, on the network as initialised; a resumed run reads it back.
    monitoring = cfg.knn_every and test_src is not None and train_src.has_labels
    knn = dict(image_size=cfg.image_size, device=device, amp=cfg.amp, workers=cfg.workers, k=cfg.knn_k,
               temperature=cfg.knn_t, rank=rank, world=world)
    anchor = evaluation.anchor_from_log(run_dir / "log.jsonl") if monitoring else None
    if monitoring and anchor is None:
        state.enter("measuring the random-init anchor", "anchor")
        anchor = evaluation.random_init_anchor(raw_model.backbone, train_src, test_src, **knn)
        log(f"random init: kNN top-1 {anchor * 100:.2f}% (the untrained backbone, BN statistics estimated on "
            f"the train split: the anchor every later kNN line is measured against)")
        write_log({"step": global_step, "epoch": loader.epoch, "knn_random": anchor})

    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, **({"device_ids": [device.index]}
                                                                     if device.type == "cuda" else {}))
    if cfg.compile:
        model = torch.compile(model)
    train_step = TrainStep(raw_model, optimizer, scaler, evaluation.autocast(device, cfg.amp), lr_schedule,
                           forward=model)

    # A NaN or inf loss is noted on the device (no sync per step) and looked at
    # before every log line and checkpoint, so no checkpoint follows a bad step.
    def stop_if_nonfinite():
        bad = train_step.first_nonfinite()
        if bad is not None:
            raise NonFiniteLoss(f"loss is not finite (nan or inf) at step {bad[0]}; last finite loss "
                                f"{bad[1]:.6g} at step {bad[0] - 1}; stopping without a checkpoint "
                                f"(the last one in {run_dir} is from before that step)")

    def checkpoint():
        state.enter("writing a checkpoint", "checkpoint")
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
                checkpoints.keep_checkpoint(run_dir / checkpoints.CURRENT, global_step)
        if world > 1:
            dist.barrier()
        state.saved_step = global_step
        state.enter("training")

    log(f"{cfg.method} on {cfg.pipeline} ({device}, {world} process{'es' if world > 1 else ''}): "
        f"{len(train_src)} images, {steps_per_epoch} steps/epoch, {cfg.epochs} epochs, batch {cfg.batch_size}, "
        f"lr {lr:g}, {cfg.arch}{' small stem' if cfg.small_stem else ''}, {cfg.image_size} px, "
        f"amp {cfg.amp} ({cfg.amp_reason})")
    from tqdm import tqdm
    steps_this_process = 0
    model.train()
    stop_requested = StopVote(stop)  # under DDP all ranks agree, a step later, without a device sync
    clock = WaitClock()  # seconds blocked in next(loader): is the run input-bound?
    state.enter("training")
    with stop.deferred():  # a signal: the step finishes, a checkpoint, exit 75 (the kNN evaluation stops at once)
        while global_step < total_steps:
            epoch = loader.epoch
            raw_model.epoch_start(epoch, loader)  # the method's work before the epoch's first plan
            bar = tqdm(total=steps_per_epoch, initial=loader.step, desc=f"epoch {epoch}", unit="step",
                       disable=not is_main(), dynamic_ncols=True, leave=False)
            t_last, seen = time.perf_counter(), 0
            for views in clock.batches(loader):
                faults.at("step")
                loss, metrics = train_step(views, global_step)
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
                    if world > 1:  # the global batch's loss (equal local batches), whatever the world size
                        dist.all_reduce(loss_value)
                        loss_value /= world
                    record = {"step": global_step, "epoch": epoch, "loss": loss_value.item(),
                              "lr": float(lr_schedule[global_step - 1]), "img_s": seen / (now - t_last)}
                    record.update({k: float(v) for k, v in metrics.items()})
                    t_last, seen = now, 0
                    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_s']:.0f}",
                                    wait=f"{clock.share:.0%}")
                    write_log(record)
                    stop_if_nonfinite()
                stopping = stop_requested()
                if stopping or any(every and global_step % every == 0 for every in (cfg.ckpt_every, cfg.keep_every)):
                    checkpoint()
                if stopping:
                    close_progress_bars()
                    log(f"stopped by {stop.received or 'a signal on another rank'} after step {global_step}; "
                        f"checkpoint written to {run_dir}; run the same command to resume")
                    return checkpoints.EXIT_PREEMPTED
                if cfg.stop_after and steps_this_process >= cfg.stop_after:
                    close_progress_bars()
                    log(f"stopped after {steps_this_process} steps (--stop-after)")
                    return 0
                if global_step >= total_steps and loader.step < steps_per_epoch:
                    break  # a step budget that ends mid-epoch
            bar.close()
            write_log({"step": global_step, "epoch": epoch, **clock.reset()})  # this process's data wait
            replaced = summed_over_ranks(len(loader.replaced), device)
            if replaced:
                example = f" (e.g. {train_src.paths[loader.replaced[0]]})" if loader.replaced else ""
                log(f"warning: epoch {epoch}: {replaced} unreadable image{'s' if replaced > 1 else ''} rendered "
                    f"as flat replacements{example}; the epoch went on")
                write_log({"step": global_step, "epoch": epoch, "replaced": replaced})
                loader.replaced.clear()
            checkpoint()
            finished = global_step >= total_steps
            log(f"epoch {epoch} {'stopped at the step budget' if finished and loader.step else 'done'}: "
                f"loss {loss.item():.4f}")
            if stop.received:  # during the epoch's last step or its checkpoint: kept, so no kNN first
                log(f"stopped by {stop.received} after step {global_step}; checkpoint written to {run_dir}; "
                    f"run the same command to resume")
                return checkpoints.EXIT_PREEMPTED
            if monitoring and (finished or (epoch + 1) % cfg.knn_every == 0):
                with stop.abandon():  # the epoch's checkpoint is written: a signal ends the evaluation at once
                    state.enter("evaluating kNN", "knn")
                    acc = evaluation.knn_top1(raw_model.backbone, train_src, test_src, **knn)
                    state.enter("training")
                log(evaluation.knn_line(epoch, acc, anchor, cfg.knn_k, cfg.knn_t))
                write_log({"step": global_step, "epoch": epoch, "knn_top1": acc, "knn_random": anchor,
                           "knn_gain": acc - anchor})
            if is_main():  # run_dir/curves.png redrawn from log.jsonl
                curves.write_curves(run_dir)
    log(f"done: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

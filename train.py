"""Self-supervised pre-training: one readable loop.

One process (a GPU if there is one, else the CPU), on the built-in sample:
    python train.py --pipeline PIPELINE --method METHOD
One node, 8 GPUs:
    torchrun --standalone --nproc_per_node=8 train.py --pipeline PIPELINE --method METHOD --data /data/imagenet
Several nodes: cluster/slurm.sh (srun + torchrun, c10d rendezvous), or torchrun --nnodes.
Re-running the same command resumes from its run directory, mid-epoch.
Afterwards, on the same run directory:
    python train.py --method METHOD --eval linear          # linear probe on frozen features
    python train.py --method METHOD --export backbone.pth  # the backbone as a ResNet state_dict
`python train.py --help` lists the methods and the installed pipelines;
README.md, "Usage", has the commands with real names.

Defaults come from configs/<method>.yaml (each number with its source);
every key there is also a flag. Small images (the built-in sample,
Fashion-MNIST) add configs/small.yaml. Flags given on the command line win.

Every value is checked against rules.RULES before any work starts.
Exit codes: 0 done; 2 bad input (one line: a flag out of range, missing
data, no usable checkpoint, a full disk); 3 a NaN or inf loss (the last good
checkpoint stays); 75 stopped by SIGTERM/SIGINT after checkpointing (run the
same command again to resume). See model/checkpoints.py.

The loop names no method and no pipeline: the registries choose them, a
method's extra work goes through its hooks (model/common.py, Method) and a
pipeline's options through pipelines.backend_options.
"""
from __future__ import annotations

import argparse
import contextlib
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

import pipelines  # noqa: E402
from configs import apply_small_profile, resolve_config, rules  # noqa: E402
from model import checkpoints, curves, evaluation, faults, sheets  # noqa: E402
from model.distributed import (LaunchError, StopVote, init_distributed, is_main, log,  # noqa: E402
                               parameter_digest, summed_over_ranks)
from model.methods import METHODS  # noqa: E402
from model.optim import build_optimizer, cosine_schedule, scaled_lr, schedule_steps  # noqa: E402
from model.precision import resolve_amp  # noqa: E402
from model.runlog import RunLog  # noqa: E402
from model.step import TrainStep, WaitClock  # noqa: E402

ROOT = Path(__file__).resolve().parent
# Flags that may differ between a run and its resumption.
RESUMABLE_CHANGES = {"epochs", "max_steps", "linear_epochs", "pipeline", "workers", "knn_every", "log_every",
                     "ckpt_every", "keep_every", "tensorboard", "log_samples", "stop_after", "eval", "export",
                     "compile", "cpu_graph", "device", "run_dir", "data_changed", "recheck_data", "amp_reason"}


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


@dataclass
class RunSetup:
    """Where a training run stands: its resolved config, this process's rank
    among `world`, its device, the run directory and the data."""
    cfg: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    run_dir: Path
    train_src: object
    test_src: object

    @property
    def monitoring(self) -> bool:
        """kNN on a labelled test split every --knn-every epochs."""
        return bool(self.cfg.knn_every and self.test_src is not None and self.train_src.has_labels)

    def knn_settings(self) -> dict:
        cfg = self.cfg
        return dict(image_size=cfg.image_size, device=self.device, amp=cfg.amp, workers=cfg.workers, k=cfg.knn_k,
                    temperature=cfg.knn_t, rank=self.rank, world=self.world)


@dataclass
class Training:
    """What the loop steps and checkpoints."""
    model: torch.nn.Module  # the method (SyncBatchNorm converted); checkpoints hold its state
    loader: object
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    lr: float
    lr_schedule: np.ndarray
    total_steps: int
    config: dict  # the resolved config as config.yaml and every checkpoint hold it
    step: TrainStep | None = None  # made after the anchor and the DDP wrap (wrap_for_steps)


# ----------------------------------------------------------------------------- run directory, data, commands
def open_data(cfg, rank: int, world: int):
    """(train, test) sources; rank 0 builds the index and materialises data
    first, the others then find it cached."""
    from pipelines.data import DataError, open_source
    if world > 1 and rank != 0:
        dist.barrier()
    try:
        train_src = open_source(cfg.data, "train", progress=is_main(), recheck=cfg.recheck_data)
        test_src = open_source(cfg.data, "test", progress=is_main(), recheck=cfg.recheck_data)
    except DataError as e:
        raise UserError(str(e))
    if world > 1 and rank == 0:
        dist.barrier()
    return train_src, test_src


def fit_to_images(cfg, explicit: dict, train_src, device: torch.device) -> None:
    """Small images (median side <= 64 px) get configs/small.yaml (and small_cpu.yaml on the CPU)."""
    changed = apply_small_profile(cfg, explicit, float(np.median(np.minimum(train_src.widths, train_src.heights))),
                                  device.type)
    if changed:
        log(f"small images: configs/small.yaml{' and small_cpu.yaml' if device.type == 'cpu' else ''} set "
            f"{', '.join(changed)}")
        rules.check(cfg)


def evaluate_or_export(cfg, model, ckpt, run_dir: Path, train_src, test_src, device, state: RunState) -> int:
    """--export and --eval linear on the run's checkpoint (both may be given)."""
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


def close_progress_bars():
    """Clear tqdm's bars (leave=False) so that an error is a line of its own."""
    from tqdm import tqdm
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


# ----------------------------------------------------------------------------- setup
def build_loader(run: RunSetup, spec, state: RunState):
    """This rank's loader of the run's pipeline; it closes however the run ends."""
    cfg = run.cfg
    if cfg.batch_size % run.world:
        raise UserError(f"batch size {cfg.batch_size} is not divisible by the {run.world} processes")
    try:
        loader = pipelines.build(cfg.pipeline, spec, run.train_src, batch_size=cfg.batch_size // run.world,
                                 seed=cfg.seed, rank=run.rank, world_size=run.world, device=run.device,
                                 workers=cfg.workers, **pipelines.backend_options(cfg.pipeline, cfg))
    except pipelines.PipelineError as e:
        raise UserError(str(e))
    state.resources.callback(loader.close)
    return loader


def build_training(run: RunSetup, model: torch.nn.Module, loader) -> Training:
    """SyncBatchNorm if asked, the optimizer, the per-step schedule (computed up front), the scaler."""
    cfg = run.cfg
    if cfg.sync_bn and run.world > 1:
        if run.device.type != "cuda":  # torch's SyncBatchNorm raises in its first forward on the CPU
            raise UserError("--sync-bn needs CUDA devices (torch's SyncBatchNorm has no CPU kernel); "
                            "drop it on the CPU")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    lr = scaled_lr(cfg.lr, cfg.batch_size)
    optimizer = build_optimizer(cfg, model, lr)
    total_steps, warmup_steps = schedule_steps(cfg.epochs, len(loader), cfg.warmup_epochs, cfg.max_steps)
    scaler = torch.amp.GradScaler(run.device.type, enabled=cfg.amp == "fp16")
    return Training(model, loader, optimizer, scaler, lr, cosine_schedule(lr, total_steps, warmup_steps), total_steps,
                    dict(vars(cfg)))


def resume(run: RunSetup, t: Training, ckpt, ckpt_path) -> int:
    """The global step to start from: the checkpoint's (its states loaded), else 0."""
    if ckpt is None:
        return 0
    checkpoints.check_resumable(run.cfg, t.config, ckpt, ckpt_path, run.run_dir, run.train_src, RESUMABLE_CHANGES, log)
    t.model.load_state_dict(ckpt["model"])
    t.optimizer.load_state_dict(ckpt["optimizer"])
    t.scaler.load_state_dict(ckpt["scaler"])
    t.loader.load_state_dict(ckpt["loader"])
    log(f"resumed from {ckpt_path} at epoch {t.loader.epoch} step {t.loader.step} (global step {ckpt['step']})")
    return ckpt["step"]


def open_log(run: RunSetup, t: Training, spec, global_step: int, state: RunState) -> RunLog:
    """config.yaml, log.jsonl and TensorBoard (with the view sheet of step 0,
    model/sheets.py, rendered on a loader of its own) on rank 0."""
    writer = None
    if is_main():
        with open(run.run_dir / "config.yaml", "w") as f:
            yaml.safe_dump(t.config, f, sort_keys=True)
        if run.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(run.run_dir / "tb")
            if global_step == 0:
                sheets.add_views_to_tensorboard(writer, run.cfg, spec, run.train_src, run.device)
            state.resources.callback(writer.close)
    return RunLog(run.run_dir, run.rank, run.cfg.log_samples, state.resources, writer)


def knn_anchor(run: RunSetup, t: Training, runlog: RunLog, global_step: int, state: RunState) -> float | None:
    """The random-init anchor (model/evaluation.py): measured once, before the
    first step, on the network as initialised; a resumed run reads it back."""
    if not run.monitoring:
        return None
    anchor = evaluation.anchor_from_log(run.run_dir / "log.jsonl")
    if anchor is None:
        state.enter("measuring the random-init anchor", "anchor")
        anchor = evaluation.random_init_anchor(t.model.backbone, run.train_src, run.test_src, **run.knn_settings())
        log(f"random init: kNN top-1 {anchor * 100:.2f}% (the untrained backbone, BN statistics estimated on "
            f"the train split: the anchor every later kNN line is measured against)")
        runlog.write({"step": global_step, "epoch": t.loader.epoch, "knn_random": anchor})
    return anchor


def wrap_for_steps(run: RunSetup, t: Training) -> torch.nn.Module:
    """DDP over the ranks and torch.compile if asked; t.step runs what comes back."""
    model = t.model
    if run.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, **({"device_ids": [run.device.index]}
                                                                     if run.device.type == "cuda" else {}))
    if run.cfg.compile:
        model = torch.compile(model)
    t.step = TrainStep(t.model, t.optimizer, t.scaler, evaluation.autocast(run.device, run.cfg.amp), t.lr_schedule,
                       forward=model)
    return model


# ----------------------------------------------------------------------------- what the loop calls
def stop_if_nonfinite(t: Training, run_dir: Path) -> None:
    """A NaN or inf loss is noted on the device (no sync per step) and looked at
    before every log line and checkpoint, so no checkpoint follows a bad step."""
    bad = t.step.first_nonfinite()
    if bad is not None:
        raise NonFiniteLoss(f"loss is not finite (nan or inf) at step {bad[0]}; last finite loss "
                            f"{bad[1]:.6g} at step {bad[0] - 1}; stopping without a checkpoint "
                            f"(the last one in {run_dir} is from before that step)")


def checkpoint(run: RunSetup, t: Training, global_step: int, runlog: RunLog, state: RunState) -> None:
    state.enter("writing a checkpoint", "checkpoint")
    stop_if_nonfinite(t, run.run_dir)
    if run.world > 1:  # replicas must agree exactly; a divergence is a bug worth stopping for
        digests = [None] * run.world
        dist.all_gather_object(digests, parameter_digest(t.model))
        runlog.write({"step": global_step, "replica_digests": digests})
        if len(set(digests)) > 1:
            raise RuntimeError(f"replicas diverged at step {global_step}: {digests}")
    if is_main():
        checkpoints.save(run.run_dir, {"model": t.model.state_dict(), "optimizer": t.optimizer.state_dict(),
                                       "scaler": t.scaler.state_dict(), "loader": t.loader.state_dict(),
                                       "step": global_step, "epoch": t.loader.epoch, "config": t.config,
                                       "data": {"fingerprint": run.train_src.fingerprint,
                                                "images": len(run.train_src)}})
        if run.cfg.keep_every and global_step % run.cfg.keep_every == 0:
            checkpoints.keep_checkpoint(run.run_dir / checkpoints.CURRENT, global_step)
    if run.world > 1:
        dist.barrier()
    state.saved_step = global_step
    state.enter("training")


def loss_record(run: RunSetup, t: Training, loss, metrics: dict, global_step: int, epoch: int, img_s: float) -> dict:
    loss_value = loss.detach().float()
    if run.world > 1:  # the global batch's loss (equal local batches), whatever the world size
        dist.all_reduce(loss_value)
        loss_value /= run.world
    record = {"step": global_step, "epoch": epoch, "loss": loss_value.item(),
              "lr": float(t.lr_schedule[global_step - 1]), "img_s": img_s}
    record.update({k: float(v) for k, v in metrics.items()})
    return record


def note_replaced(run: RunSetup, loader, runlog: RunLog, epoch: int, global_step: int) -> None:
    """Unreadable images of the epoch, on every rank: one warning, one log record."""
    replaced = summed_over_ranks(len(loader.replaced), run.device)
    if replaced:
        example = f" (e.g. {run.train_src.paths[loader.replaced[0]]})" if loader.replaced else ""
        log(f"warning: epoch {epoch}: {replaced} unreadable image{'s' if replaced > 1 else ''} rendered "
            f"as flat replacements{example}; the epoch went on")
        runlog.write({"step": global_step, "epoch": epoch, "replaced": replaced})
        loader.replaced.clear()


def monitor_knn(run: RunSetup, t: Training, runlog: RunLog, epoch: int, global_step: int, anchor: float,
                stop: checkpoints.StopSignals, state: RunState) -> None:
    with stop.abandon():  # the epoch's checkpoint is written: a signal ends the evaluation at once
        state.enter("evaluating kNN", "knn")
        acc = evaluation.knn_top1(t.model.backbone, run.train_src, run.test_src, **run.knn_settings())
        state.enter("training")
    log(evaluation.knn_line(epoch, acc, anchor, run.cfg.knn_k, run.cfg.knn_t))
    runlog.write({"step": global_step, "epoch": epoch, "knn_top1": acc, "knn_random": anchor,
                  "knn_gain": acc - anchor})


def stopped_line(stop: checkpoints.StopSignals, global_step: int, run_dir: Path) -> str:
    return (f"stopped by {stop.received or 'a signal on another rank'} after step {global_step}; "
            f"checkpoint written to {run_dir}; run the same command to resume")


# ----------------------------------------------------------------------------- the run
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


def run(argv: list[str], stop: checkpoints.StopSignals, state: RunState) -> int:
    cfg, explicit = resolve_config(argv)
    rules.check(cfg)
    rank, world, device = init_distributed(cfg.device)
    cfg.amp, cfg.amp_reason = resolve_amp(cfg.amp, device)  # config.yaml keeps both
    torch.manual_seed(cfg.seed)
    state.enter("building the index", "index")
    train_src, test_src = open_data(cfg, rank, world)
    state.enter("starting")
    fit_to_images(cfg, explicit, train_src, device)
    run_dir = state.run_dir = checkpoints.prepare_run_dir(cfg, ROOT)
    if is_main() and not (cfg.export and not cfg.eval):  # an export only reads the (atomically replaced) checkpoint
        state.resources.callback(checkpoints.RunDirLock(run_dir).release)
    ckpt, ckpt_path = checkpoints.load(run_dir, cfg.method, "cpu",
                                       warn=lambda m: is_main() and print(f"warning: {m}", file=sys.stderr, flush=True))
    method = METHODS[cfg.method]
    model = method(cfg).to(device, memory_format=torch.channels_last)
    if cfg.eval or cfg.export:
        return evaluate_or_export(cfg, model, ckpt, run_dir, train_src, test_src, device, state)

    setup = RunSetup(cfg, rank, world, device, run_dir, train_src, test_src)
    t = build_training(setup, model, build_loader(setup, method.spec(cfg), state))
    global_step = state.saved_step = resume(setup, t, ckpt, ckpt_path)
    if global_step >= t.total_steps:
        log(f"{run_dir} is complete ({cfg.epochs} epochs); raise --epochs or pick another --run-dir")
        return 0
    runlog = open_log(setup, t, method.spec(cfg), global_step, state)
    anchor = knn_anchor(setup, t, runlog, global_step, state)
    model = wrap_for_steps(setup, t)
    log(f"{cfg.method} on {cfg.pipeline} ({device}, {world} process{'es' if world > 1 else ''}): "
        f"{len(train_src)} images, {len(t.loader)} steps/epoch, {cfg.epochs} epochs, batch {cfg.batch_size}, "
        f"lr {t.lr:g}, {cfg.arch}{' small stem' if cfg.small_stem else ''}, {cfg.image_size} px, "
        f"amp {cfg.amp} ({cfg.amp_reason})")
    model.train()
    return train(setup, t, runlog, global_step, anchor, stop, state)


def train(run: RunSetup, t: Training, runlog: RunLog, global_step: int, anchor: float | None,
          stop: checkpoints.StopSignals, state: RunState) -> int:
    """The loop: epochs of steps from `global_step` to the schedule's end; a checkpoint at every epoch end."""
    from tqdm import tqdm
    cfg, loader, world = run.cfg, t.loader, run.world
    total_steps, steps_per_epoch = t.total_steps, len(loader)
    steps_this_process = 0
    stop_requested = StopVote(stop)  # under DDP all ranks agree, a step later, without a device sync
    clock = WaitClock()  # seconds blocked in next(loader): is the run input-bound?
    state.enter("training")
    with stop.deferred():  # a signal: the step finishes, a checkpoint, exit 75 (the kNN evaluation stops at once)
        while global_step < total_steps:
            epoch = loader.epoch
            t.model.epoch_start(epoch, loader)  # the method's work before the epoch's first plan
            bar = tqdm(total=steps_per_epoch, initial=loader.step, desc=f"epoch {epoch}", unit="step",
                       disable=not is_main(), dynamic_ncols=True, leave=False)
            t_last, seen = time.perf_counter(), 0
            for views in clock.batches(loader):
                faults.at("step")
                loss, metrics = t.step(views, global_step)
                global_step += 1
                steps_this_process += 1
                seen += views.batch_size * world
                bar.update(1)
                runlog.write_samples(global_step, run.rank, world, views)
                if global_step % cfg.log_every == 0 or loader.step == steps_per_epoch or global_step == total_steps:
                    now = time.perf_counter()
                    record = loss_record(run, t, loss, metrics, global_step, epoch, seen / (now - t_last))
                    t_last, seen = now, 0
                    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_s']:.0f}",
                                    wait=f"{clock.share:.0%}")
                    runlog.write(record)
                    stop_if_nonfinite(t, run.run_dir)
                stopping = stop_requested()
                if stopping or any(every and global_step % every == 0 for every in (cfg.ckpt_every, cfg.keep_every)):
                    checkpoint(run, t, global_step, runlog, state)
                if stopping:
                    close_progress_bars()
                    log(stopped_line(stop, global_step, run.run_dir))
                    return checkpoints.EXIT_PREEMPTED
                if cfg.stop_after and steps_this_process >= cfg.stop_after:
                    close_progress_bars()
                    log(f"stopped after {steps_this_process} steps (--stop-after)")
                    return 0
                if global_step >= total_steps and loader.step < steps_per_epoch:
                    break  # a step budget that ends mid-epoch
            bar.close()
            runlog.write({"step": global_step, "epoch": epoch, **clock.reset()})  # this process's data wait
            note_replaced(run, loader, runlog, epoch, global_step)
            checkpoint(run, t, global_step, runlog, state)
            finished = global_step >= total_steps
            log(f"epoch {epoch} {'stopped at the step budget' if finished and loader.step else 'done'}: "
                f"loss {loss.item():.4f}")
            if stop.received:  # during the epoch's last step or its checkpoint: kept, so no kNN first
                log(stopped_line(stop, global_step, run.run_dir))
                return checkpoints.EXIT_PREEMPTED
            if run.monitoring and (finished or (epoch + 1) % cfg.knn_every == 0):
                monitor_knn(run, t, runlog, epoch, global_step, anchor, stop, state)
            if is_main():  # run_dir/curves.png redrawn from log.jsonl
                curves.write_curves(run.run_dir)
    log(f"done: {run.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Checkpoints that cannot be lost, and a stop on SIGTERM / SIGINT that writes one.

A run directory holds `checkpoint.pth` and the one before it,
`checkpoint.prev.pth`. `save` serialises the state in memory, writes it to
a temporary file in the run directory, flushes and fsyncs it, moves the
current checkpoint to `.prev`, renames the new file into place and fsyncs
the directory: a kill or a power cut at any point leaves at least one
complete checkpoint, and a full disk leaves the previous ones untouched.

`load` takes the newest checkpoint that reads back and belongs to the run
(its method, this trainer's format). A file that does not gets one warning
line with the reason, and the previous checkpoint is used, with a warning
that says how many steps will be trained again. If files exist but none is
usable, it raises: a run never starts over silently.

Exit codes of train.py: 0 done, 2 bad input (a flag, the data, no usable
checkpoint, a full disk, a run directory another process writes), 3 a NaN
or inf loss, 75 stopped by SIGTERM or SIGINT (EX_TEMPFAIL: run the same
command again; a checkpoint was written when there was training to keep).
"""
from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path

import torch

CURRENT, PREVIOUS = "checkpoint.pth", "checkpoint.prev.pth"
# Bumped when the layout of a checkpoint changes; files without the key are format 1.
FORMAT = 1
REQUIRED_KEYS = ("model", "optimizer", "scaler", "loader", "step", "epoch", "config")
EXIT_NONFINITE, EXIT_PREEMPTED = 3, 75


class CheckpointError(Exception):
    """No usable checkpoint, or one could not be written: one line, exit code 2."""


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(run_dir: Path, state: dict) -> Path:
    """Write `state` as run_dir/checkpoint.pth, keeping the last one as checkpoint.prev.pth."""
    run_dir = Path(run_dir)
    path = run_dir / CURRENT
    try:
        return save_file({**state, "format": FORMAT}, path, previous=run_dir / PREVIOUS)
    except OSError as e:
        kept = [p.name for p in (path, run_dir / PREVIOUS) if p.exists()]
        raise CheckpointError(f"could not write a checkpoint in {run_dir}: {e.strerror or e}; "
                              + (f"{' and '.join(kept)} there are intact" if kept else "no checkpoint was there yet"))


def save_file(obj, path: Path, previous: Path | None = None) -> Path:
    """torch.save `obj` as `path` atomically: a temporary file beside it,
    fsynced, renamed into place (the file there before moves to `previous`
    when given), the folder fsynced. Raises OSError, with its errno."""
    path = Path(path)
    # Serialised in memory first: torch.save streaming into a file turns a
    # failed write (ENOSPC) into an opaque RuntimeError; a plain write keeps the errno.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return path


def read(path: Path, method: str | None = None, device="cpu") -> tuple[dict | None, str | None]:
    """(state, None) for a usable checkpoint, else (None, the reason it is not)."""
    try:
        if path.stat().st_size == 0:
            return None, "empty file"
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # zipfile, pickle and OS errors all mean the same here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, f"unreadable, truncated or damaged ({first[:120]})"
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        return None, "not a viewforge checkpoint (keys missing)"
    if state.get("format", 1) != FORMAT:
        return None, f"checkpoint format {state.get('format')} (another version of viewforge); this one reads {FORMAT}"
    other = state["config"].get("method") if isinstance(state["config"], dict) else None
    if method is not None and other != method:
        return None, f"a {other} checkpoint; this run trains {method}"
    return state, None


def last_logged_step(run_dir: Path) -> int | None:
    """The largest step in run_dir/log.jsonl (what a lost checkpoint had reached), if any."""
    try:
        lines = (Path(run_dir) / "log.jsonl").read_text().splitlines()
    except OSError:
        return None
    steps = []
    for line in lines:
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a kill
    return max(steps, default=None)


def load(run_dir: Path, method: str | None = None, device="cpu", warn=_warn) -> tuple[dict | None, Path | None]:
    """(state, path) of the newest usable checkpoint in run_dir; (None, None) when there is none at all.
    Raises CheckpointError when checkpoints exist but none is usable."""
    run_dir = Path(run_dir)
    refused = []
    for name in (CURRENT, PREVIOUS):
        path = run_dir / name
        if not path.exists():
            continue
        state, reason = read(path, method, device)
        if reason is not None:
            warn(f"{path}: {reason}; not used")
            refused.append(f"{name}: {reason}")
            continue
        if refused:
            reached = last_logged_step(run_dir)
            step = int(state["step"])
            again = (f"{reached - step} steps ({step + 1} to {reached}) will be trained again"
                     if reached is not None and reached > step else f"steps after {step} will be trained again")
            warn(f"falling back to {path} (step {step}); {again}")
        return state, path
    if refused:
        raise CheckpointError(f"no usable checkpoint in {run_dir} ({'; '.join(refused)}); "
                              "move these files away to start the run over")
    return None, None


class Stopped(Exception):
    """A stop signal where nothing is left to finish: the run ends with one
    line and EXIT_PREEMPTED. args[0] is the signal's name."""


class StopSignals:
    """SIGTERM and SIGINT for a whole run (the handlers of every instance
    still active are put back by `restore_all`, train.main's cleanup).

    Outside a `deferred()` block, and inside an `abandon()` block within
    one, a signal raises Stopped at once, wherever the main thread is:
    building the index, the kNN evaluation, a linear probe, an export
    (there is no step to finish). Inside `deferred()`, the training loop,
    it only sets `received`: the loop finishes the step, writes a
    checkpoint and exits with EXIT_PREEMPTED. A second signal raises
    Stopped even there."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    active: list = []

    @classmethod
    def restore_all(cls) -> None:
        while cls.active:
            cls.active[-1].__exit__()

    def __init__(self):
        self.received: str | None = None
        self._defer = []  # innermost block last: True defers, False abandons
        self._old = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        first = self.received is None
        self.received = self.received or name
        if not (first and self._defer and self._defer[-1]):
            raise Stopped(name)

    @contextlib.contextmanager
    def _mode(self, defer: bool):
        self._defer.append(defer)
        try:
            yield self
        finally:
            self._defer.pop()

    def deferred(self):
        """A block where the first signal only sets `received`."""
        return self._mode(True)

    def abandon(self):
        """A block, inside a deferred one, that a signal ends at once (Stopped)."""
        if self.received is not None:
            raise Stopped(self.received)
        return self._mode(False)

    def __enter__(self):
        for s in self.SIGNALS:
            self._old[s] = signal.signal(s, self._handle)
        StopSignals.active.append(self)
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
        if self in StopSignals.active:
            StopSignals.active.remove(self)
        return False


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


# ----------------------------------------------------------------------------- run directories, resuming
def prepare_run_dir(cfg, root: Path) -> Path:
    """cfg.run_dir, or root/runs/<method>-<data>; made and checked writable."""
    run_dir = Path(cfg.run_dir or root / "runs" / f"{cfg.method}-{data_name(cfg.data)}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"run directory {run_dir} is not writable: {e.strerror or e}")
    return run_dir


class RunDirLock:
    """One writer per run directory: an exclusive flock on run_dir/.lock,
    holding the writer's pid and host for the message a second writer gets.
    The kernel drops the lock when its process ends, however it ends, so a
    lock left by a dead process never blocks. Where the file system has no
    locks (some network mounts), a warning, and no lock."""

    def __init__(self, run_dir: Path, warn=_warn):
        self.path, self.fd = Path(run_dir) / ".lock", None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise CheckpointError(f"cannot lock {run_dir}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise CheckpointError(f"{run_dir} is in use by {holder}: one run directory has one writer; wait for "
                                  f"it to end, or use another --run-dir") from None
        except OSError as e:  # ENOLCK, EOPNOTSUPP: no locks on this file system
            os.close(fd)
            warn(f"cannot lock {run_dir} ({e.strerror or e}): nothing stops a second run from writing into it")
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def data_name(data: str | None) -> str:
    if data is None:
        return "sample"
    name = Path(data.rstrip("/")).name.replace(".txt", "")
    if "{" in name:  # a shard pattern: train-{000000..000009}.tar -> train-000000-000009, no braces for a shell
        name = name.replace("..", "-").replace(",", "-").translate({ord(c): None for c in "{}"}).replace(".tar", "")
    return name or "data"


def check_resumable(cfg, config: dict, ckpt: dict, ckpt_path: Path, run_dir: Path, train_src, resumable: set,
                    log=print) -> None:
    """Refuse a checkpoint of other settings, or (unless --data-changed ok) of other data."""
    diff = {k: (ckpt["config"].get(k), v) for k, v in config.items()
            if k not in resumable and ckpt["config"].get(k) != v}
    if diff:
        raise CheckpointError(f"{run_dir} holds a run with other settings "
                        f"({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in diff.items())}); use another --run-dir")
    data_then = ckpt.get("data")
    if data_then and data_then["fingerprint"] != train_src.fingerprint:
        counts = (f"{data_then['images']:,} images then, {len(train_src):,} now"
                  if data_then["images"] != len(train_src) else f"{len(train_src):,} images, some modified")
        what = f"{cfg.data or 'the sample'} changed since {ckpt_path.name} was written ({counts})"
        if cfg.data_changed != "ok":
            raise CheckpointError(f"{what}: the plan of every step depends on the dataset, so this run cannot resume "
                            "exactly; pass --data-changed ok to resume anyway, or use another --run-dir")
        log(f"warning: {what}; resuming anyway (--data-changed ok)")

"""DataLoader workers that end with the process that started them, however
it ends (the project's rule for every process and thread it starts).

- A worker starts (`worker_init`) with one torch thread and ignores SIGTERM
  and SIGINT: a signal sent to the whole process group (Slurm, Kubernetes,
  `timeout`, Ctrl-C) is the main process's to handle, and a worker killed by
  it would make the DataLoader raise from its SIGCHLD handler in the middle
  of the step or the checkpoint being finished. It asks the kernel to kill
  it when its parent dies (PR_SET_PDEATHSIG), so no worker outlives a main
  process that was killed outright.
- A worker is stopped (`stop`) by torch's orderly shutdown, then SIGKILL for
  any still alive (they ignore SIGTERM, which is what torch and
  multiprocessing would send).
- Every iterator started through `track` is stopped by its owner's close,
  when its generator is closed or collected, and at interpreter exit,
  before multiprocessing's own exit handler would SIGTERM the workers and
  wait for them forever.
"""
from __future__ import annotations

import atexit
import ctypes
import functools
import os
import signal
import weakref

import torch

_PR_SET_PDEATHSIG = 1
_LIVE = weakref.WeakSet()  # iterators whose workers may be running
_EXIT_HOOK = []


def worker_init_fn():
    """A DataLoader's worker_init_fn: `worker_init` bound to this process's pid."""
    return functools.partial(worker_init, parent=os.getpid())


def worker_init(worker_id: int, parent: int) -> None:
    torch.set_num_threads(1)  # the workers share the cores; torch's threads would fight them
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: torch's watchdog still ends a worker whose parent is gone
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)


def track(iterator):
    """Register a DataLoader iterator so that interpreter exit stops its workers."""
    if not _EXIT_HOOK:  # registered after torch's and multiprocessing's handlers, so atexit runs it first
        atexit.register(stop_all)
        _EXIT_HOOK.append(True)
    _LIVE.add(iterator)
    return iterator


def batches(loader):
    """Iterate a DataLoader whose workers stop when the loop ends, breaks or
    raises (the generator is closed or collected), and at interpreter exit."""
    it = track(iter(loader))
    try:
        yield from it
    finally:
        stop(it)


def stop(iterator) -> None:
    """Stop an iterator's workers (idempotent; None and single-process iterators do nothing)."""
    if iterator is None:
        return
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()  # a no-op once torch's own exit flag is set: the kill below still happens
    if getattr(iterator, "_worker_pids_set", False):  # else their SIGKILL would raise from torch's SIGCHLD handler
        from torch.utils.data._utils.signal_handling import _remove_worker_pids
        _remove_worker_pids(id(iterator))
        iterator._worker_pids_set = False
    for w in getattr(iterator, "_workers", ()):
        if w.is_alive():
            w.kill()
            w.join(timeout=5)
    _LIVE.discard(iterator)


def stop_all() -> None:
    for it in list(_LIVE):
        stop(it)

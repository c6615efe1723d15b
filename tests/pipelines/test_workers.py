"""pipelines/workers.py and the loaders' lifetime: DataLoader workers leave
the group's signals to the main process, die with it however it dies, and
are gone after `with`, after close(), after the loader is collected."""
import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pipelines
from pipelines.data import open_source
from pipelines.views import CropSpec, ViewSpec

ROOT = Path(__file__).resolve().parents[2]
SPEC = ViewSpec(crops=(CropSpec("global", 2, 16),))


def children(parent: int | None = None) -> set:
    """Live (not zombie) child processes of `parent` (this process by default)."""
    parent = os.getpid() if parent is None else parent
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
            if int(ppid) == parent and state != "Z":
                out.add(int(entry))
    return out


def wait_until(condition, seconds=30.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not condition():
        time.sleep(0.05)
    return condition()


@pytest.fixture
def source(labelled_folder):
    return open_source(str(labelled_folder), "train")


def test_with_closes_the_workers_even_mid_epoch(source):
    before = children()
    with pipelines.build("torchvision", SPEC, source, batch_size=8, workers=2) as loader:
        next(iter(loader))
        started = children() - before
        assert len(started) == 2
    assert wait_until(lambda: not (children() & started))


def test_an_abandoned_loader_is_closed_when_collected(source):
    before = children()
    loader = pipelines.build("torchvision", SPEC, source, batch_size=8, workers=2)
    for _ in loader:
        break
    started = children() - before
    assert started
    del loader
    gc.collect()
    assert wait_until(lambda: not (children() & started))


def test_workers_ignore_the_groups_signals_and_die_with_their_parent(source, labelled_folder):
    """A worker outlives SIGTERM (the main process decides what a signal
    means) but not its parent's SIGKILL (PR_SET_PDEATHSIG)."""
    code = ("import sys, time, pipelines; from pipelines.data import open_source; "
            "from pipelines.views import CropSpec, ViewSpec; "
            "loader = pipelines.build('torchvision', ViewSpec(crops=(CropSpec('global', 2, 16),)), "
            "open_source(sys.argv[1], 'train'), batch_size=8, workers=2); next(iter(loader)); "
            "print('ready', flush=True); time.sleep(600)")
    parent = subprocess.Popen([sys.executable, "-c", code, str(labelled_folder)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        assert parent.stdout.readline().strip() == "ready"
        workers = sorted(children(parent.pid))
        assert len(workers) == 2
        for w in workers:
            os.kill(w, signal.SIGTERM)
        time.sleep(1)
        assert all(Path(f"/proc/{w}").exists() for w in workers)
        parent.kill()
        parent.wait()

        def gone(w):
            try:
                return Path(f"/proc/{w}/stat").read_text().split(")")[1].split()[0] == "Z"
            except OSError:
                return True
        assert wait_until(lambda: all(gone(w) for w in workers))
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()

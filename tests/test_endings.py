"""Every way a run can end, ends: on each installed pipeline, train.py ends
normally, at a step budget, at --stop-after, on a NaN loss, on an exception
in a step, on SIGTERM to its whole process group in each phase, and a
library loop that breaks after one batch exits; each with the README's exit
code and line, within 60 s of its last line, and with no process of its
group left behind.

Each run is a session of its own (its own process group), so a fault that
signals the group (model/faults.py, as Slurm or `timeout` would) reaches
the run and its workers and nothing of pytest's.
"""
from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import pipelines
from tests.conftest import make_image_folder

ROOT = Path(__file__).resolve().parents[1]
PIPES = [p for p in ("torchvision", "dali", "ffcv") if p in pipelines.PIPELINES]
GRACE = 60  # seconds a run may take to exit after its last line
TINY = ["--method", "mocov2", "--queue-size", "32", "--image-size", "16", "--batch-size", "8", "--arch", "resnet18",
        "--small-stem", "--workers", "2", "--log-every", "1", "--knn-k", "10"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("endings")
    make_image_folder(root / "train", classes=2, per_class=12, seed=0)  # 24 images: 3 steps of 8 an epoch
    make_image_folder(root / "val", classes=2, per_class=3, seed=1)
    return root


def group_members(pgid: int) -> list:
    """Processes alive in process group `pgid`. A zombie is dead already: it
    waits for PID 1 to reap it, which takes its time in some containers."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(f"{entry} {stat[stat.index('(') + 1:stat.rindex(')')]} {fields[0]}")
    return found


def run(argv: list, fault: str = "", timeout: float = 600, env: dict | None = None) -> dict:
    """Run a command in a session of its own; its exit code, output, the
    seconds from its last output line to its exit, and what of its group
    is still alive afterwards (killed then, so nothing leaks into the suite)."""
    env = {**os.environ, "VIEWFORGE_FAULT": fault, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    lines, last = {"out": [], "err": []}, [time.monotonic()]

    def pump(stream, name):
        for line in stream:
            lines[name].append(line)
            last[0] = time.monotonic()

    readers = [threading.Thread(target=pump, args=(s, n), daemon=True) for s, n in ((proc.stdout, "out"),
                                                                                    (proc.stderr, "err"))]
    for r in readers:
        r.start()
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline and time.monotonic() - last[0] < GRACE + 30:
        time.sleep(0.2)
    hung = proc.poll() is None
    ended = time.monotonic()
    if hung:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for r in readers:
        r.join(timeout=10)
    time.sleep(0.5)  # the kernel's SIGKILL of orphaned workers (PR_SET_PDEATHSIG) is asynchronous
    left = group_members(proc.pid)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    out, err = "".join(lines["out"]).replace("\r", "\n"), "".join(lines["err"]).replace("\r", "\n")
    return {"rc": None if hung else proc.returncode, "out": out, "err": err, "exit_after": ended - last[0],
            "left": left}


def assert_ended(result: dict, rc: int, *, traceback: bool = False):
    detail = result["out"][-3000:] + result["err"][-3000:]
    assert result["rc"] == rc, f"exit {result['rc']} (None: still running), expected {rc}:\n{detail}"
    assert result["exit_after"] <= GRACE, f"{result['exit_after']:.0f} s from the last line to the exit:\n{detail}"
    assert not result["left"], f"processes of the run's group left alive: {result['left']}"
    assert ("Traceback" in result["err"]) == traceback, detail


# What each ending must print (README, "What happens when things go wrong").
STOPPED_FRESH = "no training step to keep; run the same command to start again"
STOPPED_KEPT = "checkpoint written to {run}; run the same command to resume"
SIGTERM_LINES = {
    "index": f"stopped by SIGTERM while building the index; {STOPPED_FRESH}",
    "anchor": f"stopped by SIGTERM while measuring the random-init anchor; {STOPPED_FRESH}",
    "step#2": f"stopped by SIGTERM after step 2; {STOPPED_KEPT}",
    "checkpoint": f"stopped by SIGTERM after step 3; {STOPPED_KEPT}",
    "knn": "stopped by SIGTERM while evaluating kNN; the checkpoint of step 3 is in {run}; "
           "run the same command to resume",
}
LIBRARY_LOOP = """
import sys
import pipelines
from configs import resolve_config
from model.methods import METHODS
from pipelines.data import open_source
cfg, _ = resolve_config(["--method", "mocov2"])
cfg.image_size = 16
loader = pipelines.build(sys.argv[1], METHODS["mocov2"].spec(cfg), open_source(sys.argv[2], "train"),
                         batch_size=8, workers=2)
for views in loader:
    print("one batch of", views.batch_size, flush=True)
    break
"""


def cells(data: Path, runs: Path) -> dict:
    """(pipeline, ending) -> the commands of one cell, run in order: (argv, fault)."""
    def train(name, pipeline, *extra):
        return [sys.executable, str(ROOT / "train.py"), *TINY, "--pipeline", pipeline, "--data", str(data),
                "--run-dir", str(runs / name), *extra]
    out = {}
    for pipe in PIPES:
        def cell(name, *extra):
            return train(f"{pipe}-{name}", pipe, *extra)
        out[pipe, "end"] = [(cell("end", "--epochs", "1"), "")]
        out[pipe, "budget"] = [(cell("budget", "--epochs", "3", "--max-steps", "4", "--knn-every", "0"), "")]
        out[pipe, "stop-after"] = [(cell("cut", "--epochs", "3", "--stop-after", "2", "--knn-every", "0"), "")]
        out[pipe, "nan"] = [(cell("nan", "--epochs", "3", "--ckpt-every", "1", "--lr", "1e30", "--knn-every", "0"),
                             "")]
        out[pipe, "bug"] = [(cell("bug", "--epochs", "1", "--knn-every", "0"), "raise@step#2")]
        for phase in SIGTERM_LINES:
            steps = [(cell(phase, "--epochs", "2"), f"sigterm@{phase}")]
            if phase not in ("index", "anchor"):  # the checkpoint of the steps that ran: the same command resumes
                steps.append((cell(phase, "--epochs", "2", "--knn-every", "0"), ""))
            out[pipe, f"sigterm@{phase}"] = steps
        out[pipe, "library-break"] = [([sys.executable, "-c", LIBRARY_LOOP, pipe, str(data)], "")]
    trained = train("commands", "torchvision", "--epochs", "1", "--knn-every", "0")
    out["torchvision", "commands"] = [
        (trained, ""),
        (trained + ["--eval", "linear", "--linear-epochs", "5"], "sigterm@linear"),
        (trained + ["--export", str(runs / "backbone.pth")], "sigterm@export")]
    return out


@pytest.fixture(scope="module")
def endings(data, tmp_path_factory) -> dict:
    """Every cell's results, two cells at a time (each run is mostly one
    thread: OMP_NUM_THREADS=1)."""
    runs = tmp_path_factory.mktemp("runs")
    cache = str(tmp_path_factory.getbasetemp() / "cache")  # conftest's private cache, set before its fixture runs
    todo = cells(data, runs)

    def run_cell(steps):
        return [run(argv, fault, env={"VIEWFORGE_CACHE": cache}) for argv, fault in steps]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {key: pool.submit(run_cell, steps) for key, steps in todo.items()}
        results = {key: future.result() for key, future in futures.items()}
    results["runs"] = runs
    return results


def stopped_lines(result: dict) -> list:
    return [text for text in result["out"].splitlines() if text.startswith("stopped by")]


@pytest.mark.parametrize("pipeline", PIPES)
def test_normal_end_budget_and_stop_after(endings, pipeline):
    (whole,), (budget,), (cut,) = (endings[pipeline, k] for k in ("end", "budget", "stop-after"))
    for result in (whole, budget, cut):
        assert_ended(result, 0)
    assert "epoch 0: kNN top-1" in whole["out"] and f"done: {endings['runs'] / (pipeline + '-end')}" in whole["out"]
    assert "epoch 1 stopped at the step budget" in budget["out"]
    assert "stopped after 2 steps (--stop-after)" in cut["out"]


@pytest.mark.parametrize("pipeline", PIPES)
def test_nan_loss_and_a_bug_in_a_step(endings, pipeline):
    (nan,), (bug,) = endings[pipeline, "nan"], endings[pipeline, "bug"]
    assert_ended(nan, 3)
    errors = [line for line in nan["err"].splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "loss is not finite" in errors[0]
    assert_ended(bug, 1, traceback=True)  # a bug keeps its traceback, and still leaves nothing behind
    assert "RuntimeError: fault injected in step #2" in bug["err"]


@pytest.mark.parametrize("pipeline", PIPES)
@pytest.mark.parametrize("phase", list(SIGTERM_LINES), ids=[p.split("#")[0] for p in SIGTERM_LINES])
def test_sigterm_to_the_process_group(endings, pipeline, phase):
    stopped, *resumed = endings[pipeline, f"sigterm@{phase}"]
    assert_ended(stopped, 75)
    assert stopped_lines(stopped) == [SIGTERM_LINES[phase].format(run=endings["runs"] / f"{pipeline}-{phase}")]
    for again in resumed:
        assert_ended(again, 0)
        assert "resumed from" in again["out"]


@pytest.mark.parametrize("pipeline", PIPES)
def test_a_library_loop_that_breaks_after_one_batch_exits(endings, pipeline):
    (result,) = endings[pipeline, "library-break"]
    assert_ended(result, 0)
    assert "one batch of 8" in result["out"]


def test_sigterm_during_the_linear_probe_and_the_export(endings):
    """Commands on a trained run directory: nothing to keep, one line, and no
    half-written export."""
    trained, linear, export = endings["torchvision", "commands"]
    assert_ended(trained, 0)
    for result, doing in ((linear, "running the linear probe"), (export, "exporting the backbone")):
        assert_ended(result, 75)
        assert stopped_lines(result) == [f"stopped by SIGTERM while {doing}; {STOPPED_FRESH}"], result["out"]
    runs = endings["runs"]
    assert not (runs / "backbone.pth").exists() and not list(runs.glob(".backbone*"))


def test_a_run_directory_has_one_writer(data, tmp_path):
    """A second train.py on a run directory that a live run holds is refused
    with one line naming the holder; a lock file left by a process that is
    gone does not block."""
    run_dir = tmp_path / "run"
    command = [sys.executable, str(ROOT / "train.py"), *TINY, "--pipeline", "torchvision", "--data", str(data),
               "--run-dir", str(run_dir), "--knn-every", "0"]
    first = subprocess.Popen(command + ["--epochs", "50"], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "log.jsonl").exists() and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.2)
        second = run(command + ["--epochs", "50"])
        assert_ended(second, 2)
        errors = [line for line in second["err"].splitlines() if line.strip()]
        assert errors == [f"error: {run_dir} is in use by pid {first.pid} on {os.uname().nodename}: one run "
                          f"directory has one writer; wait for it to end, or use another --run-dir"], errors
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # the holder was killed outright: its lock went with it, though the file stays
    assert (run_dir / ".lock").read_text().startswith(f"pid {first.pid}")
    resumed = run(command + ["--epochs", "1"])
    assert resumed["rc"] == 0, resumed["out"] + resumed["err"]

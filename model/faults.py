"""Faults injected at the named phases of a run, so that tests can end a run
in each phase the way a cluster or a bug would (tests/test_endings.py).

    VIEWFORGE_FAULT=sigterm@knn train.py ...      # the process group gets SIGTERM as the kNN evaluation starts
    VIEWFORGE_FAULT=raise@step#3 train.py ...     # RuntimeError in the third step

<fault>@<phase>[#<n>]: the fault happens the n-th time (default 1) the run
enters the phase.
- faults: `sigterm`, `sigint` (sent to the whole process group, as Slurm,
  Kubernetes and `timeout` send them: start such a run in a session of its
  own), `raise` (a RuntimeError, standing for a bug).
- phases: `index` (opening the data), `anchor` (the random-init kNN),
  `step` (a training step), `checkpoint` (a checkpoint write), `knn` (the
  kNN evaluation after an epoch), `linear` (--eval linear), `export`.
Unset, `at` costs one comparison.
"""
from __future__ import annotations

import os
import signal

PHASES = ("index", "anchor", "step", "checkpoint", "knn", "linear", "export")
FAULTS = ("sigterm", "sigint", "raise")


def _parse(text: str | None):
    if not text:
        return None
    fault, _, where = text.partition("@")
    phase, _, nth = where.partition("#")
    if fault not in FAULTS or phase not in PHASES or (nth and not nth.isdigit()):
        raise ValueError(f"VIEWFORGE_FAULT={text!r}: expected <fault>@<phase>[#<n>] with fault in {FAULTS} "
                         f"and phase in {PHASES}")
    return fault, phase, int(nth or 1)


_FAULT = _parse(os.environ.get("VIEWFORGE_FAULT"))
_ENTERED = dict.fromkeys(PHASES, 0)


def at(phase: str) -> None:
    """The run enters `phase`: inject the configured fault if this is its time."""
    if _FAULT is None:
        return
    _ENTERED[phase] += 1
    fault, where, nth = _FAULT
    if where != phase or _ENTERED[phase] != nth:
        return
    if fault == "raise":
        raise RuntimeError(f"fault injected in {phase} #{nth} (VIEWFORGE_FAULT)")
    os.killpg(os.getpgrp(), signal.SIGTERM if fault == "sigterm" else signal.SIGINT)

"""What a run writes as it goes: rank 0's log.jsonl (one JSON record a line,
read back by model/curves.py and model/evaluation.py's anchor) and, with
--tensorboard, the same scalars; with --log-samples, every rank's dataset
indices of every step (samples-rank<r>.jsonl)."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

from .distributed import is_main


class RunLog:
    """The run's log files, closed by `resources` however the run ends."""

    def __init__(self, run_dir: Path, rank: int, log_samples: bool, resources: contextlib.ExitStack, writer=None):
        self.writer = writer
        self.file = resources.enter_context(open(run_dir / "log.jsonl", "a")) if is_main() else None
        self.samples = (resources.enter_context(open(run_dir / f"samples-rank{rank}.jsonl", "a"))
                        if log_samples else None)

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.writer:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.writer.add_scalar(k, v, record["step"])

    def write_samples(self, global_step: int, rank: int, world: int, views) -> None:
        if self.samples:  # the indices are read from the device only when asked for
            self.samples.write(json.dumps({"step": global_step, "rank": rank, "world": world,
                                           "index": views.index.tolist()}) + "\n")
            self.samples.flush()

"""Check a run's log.jsonl after restarts: every launch logs consecutive
steps, a launch that resumes goes back to just after a checkpoint (a step
logged before the stop is logged again; one stopped right after a checkpoint
goes on with the next step, and shows no repeat), and the run ends at its
last step with every step logged.

    python3 cluster/test/check_log.py RUN_DIR --steps 24 --ckpt-every 4 --restarts 2
"""
import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir", type=Path)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--ckpt-every", type=int, required=True)
    p.add_argument("--restarts", type=int, required=True, help="launches after the first, at most")
    a = p.parse_args()
    logged = [r["step"] for r in map(json.loads, (a.run_dir / "log.jsonl").read_text().splitlines()) if "loss" in r]
    restarts = [i for i in range(1, len(logged)) if logged[i] <= logged[i - 1]]
    problems = []
    if len(restarts) > a.restarts:
        problems.append(f"{len(restarts)} restarts, expected at most {a.restarts}")
    if any(b != a_ + 1 for a_, b in zip(logged, logged[1:]) if b > a_):
        problems.append("a gap in the logged steps")
    if any((logged[i] - 1) % a.ckpt_every for i in restarts):
        problems.append("a restart that does not continue from a checkpoint")
    if logged[0] != 1 or logged[-1] != a.steps or sorted(set(logged)) != list(range(1, a.steps + 1)):
        problems.append("not every step from 1 to the last")
    print(f"logged steps: {logged}")
    print(f"restarts continue at steps {[logged[i] for i in restarts]}")
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

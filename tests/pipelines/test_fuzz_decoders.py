"""The decoder fuzz test (tests/pipelines/fuzz_decoders.py) in a child process,
so that a crash or a hang fails this test instead of killing pytest.

A bounded number of cases runs by default; more with
    VIEWFORGE_FUZZ_CASES=5000 VIEWFORGE_FUZZ_SEED=1 python -m pytest -q -s tests/pipelines/test_fuzz_decoders.py
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CASES = int(os.environ.get("VIEWFORGE_FUZZ_CASES", "300"))
SEED = int(os.environ.get("VIEWFORGE_FUZZ_SEED", "0"))


def test_damaged_images_never_crash_hang_or_raise():
    proc = subprocess.run([sys.executable, "-m", "tests.pipelines.fuzz_decoders", "--cases", str(CASES),
                           "--seed", str(SEED)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60 + 10 * CASES, env={**os.environ, "OMP_NUM_THREADS": "1"})
    last_case = [line for line in proc.stderr.splitlines() if line.startswith("case ")][-1:]
    assert proc.returncode == 0, f"fuzzing died at {last_case} (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\ndecoder fuzz: {report['cases']} cases, seed {report['seed']}, {report['seconds']} s: {report['found']}")
    assert report["errors"] == []
    found = report["found"]
    assert report["cases"] == CASES
    assert found["probe: usable"] + found["probe: unusable"] == CASES
    assert found["check: passed"] + found["check: replaced"] == CASES
    assert found["check: replaced"] == found["probe: unusable"] + found.get("probe: usable at another size", 0)
    for name in ("torchvision", "dali"):
        if f"{name}: steps rendered" in found:
            assert found[f"{name}: steps rendered"] == CASES // 8

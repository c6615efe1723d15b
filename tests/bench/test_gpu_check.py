"""bench/gpu_check.sh's own logic, on the CPU (--dry-run): every step runs,
is recorded, and leaves its results in bench/results/<device>/'s layout."""
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def test_dry_run_writes_every_result(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    dest = tmp_path / "dry-run-cpu"
    summary = (dest / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in summary] == ["env", "kernels", "gpu-tests", "throughput"]
    assert all(line.split()[2] == "0" for line in summary)
    for name in ("env.txt", "kernels.txt", "gpu-tests.txt", "throughput.txt", "throughput.json", "throughput.png"):
        assert (dest / name).stat().st_size > 0, name
    assert " passed" in (dest / "kernels.txt").read_text()
    assert "skipped" in (dest / "gpu-tests.txt").read_text()  # no GPU here: the gpu tests skip, cleanly


def test_bad_arguments_get_one_line_and_exit_2(tmp_path):
    for args in (["--nonsense"], ["--dry-run", "--data", str(tmp_path / "missing")]):
        proc = subprocess.run(["bash", str(SCRIPT), *args, "--out", str(tmp_path)], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, args
    proc = subprocess.run(["bash", str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "sees no GPU" in proc.stderr  # without --dry-run on a machine with no GPU

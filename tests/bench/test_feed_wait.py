"""bench/feed_wait.py on a tiny JPEG folder: every step is timed, the files
are read by the feed's reader thread and not by the loop's, and the timing
wrappers come off again. Nothing here depends on how fast anything runs."""
import math

import pytest

pytest.importorskip("nvidia.dali")

from bench import feed_wait  # noqa: E402
from pipelines import dali  # noqa: E402
from pipelines.data import open_source  # noqa: E402
from tests.conftest import make_image_folder  # noqa: E402


def test_the_loop_thread_reads_nothing_and_the_wrappers_come_off(tmp_path):
    root = make_image_folder(tmp_path / "train", per_class=4, size=(40, 30))
    source = open_source(str(root), cache_dir=str(tmp_path / "cache"), progress=False)
    from nvidia.dali.pipeline import Pipeline
    originals = (dali._Feed.__call__, dali.read_checked, Pipeline.run)
    rows = feed_wait.measure(source, batch_size=4, size=16, workers=1, epochs=2)
    assert (dali._Feed.__call__, dali.read_checked, Pipeline.run) == originals
    steps = 2 * (len(source) // 4)
    assert all(len(rows[what]) == steps for what in ("callback", "run", "step"))
    assert all(math.isfinite(ms) and ms >= 0 for what in ("callback", "run", "step") for ms in rows[what])
    assert set(rows["read"]) == {"dali-feed"} and rows["read"]["dali-feed"] > 0

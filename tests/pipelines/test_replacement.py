"""Files that go bad after indexing: every pipeline renders them as flat
replacements, counts them, and finishes the epoch; the index notices changed
files; data.read_checked refuses what a decoder would fail on."""
import shutil

import numpy as np
import pytest

import pipelines
from pipelines.data import REPLACEMENT_RGB, open_source, read_checked, replacement_image
from pipelines.index import probe_bytes
from pipelines.views import AugSpec, CropSpec, ViewSpec
from tests.conftest import make_image_folder

PIPES = [p for p in ("torchvision", "dali") if p in pipelines.PIPELINES]
SPEC = ViewSpec(crops=(CropSpec("global", 2, 16, scale=(0.2, 1.0), augs=(AugSpec(),)),))


def bogus_huffman_table(data: bytes) -> bytes:
    """A JPEG whose headers, size and end marker are intact but whose first
    Huffman table counts more codes than exist: the header check passes it,
    a decoder refuses it."""
    at = data.index(b"\xff\xc4") + 5  # marker, 2 length bytes, class/id byte: then 16 code counts
    return data[:at] + b"\xff" * 16 + data[at + 16:]


SPOILERS = {
    "truncated": lambda d: d[: len(d) // 2],
    "garbage": lambda d: bytes(np.random.default_rng(0).integers(0, 256, len(d), dtype=np.uint8)),
    "empty": lambda d: b"",
    "bogus huffman table": bogus_huffman_table,
}


@pytest.fixture
def spoiled(tmp_path):
    """A 24-image folder indexed, then four files spoiled in four ways and one deleted."""
    root = make_image_folder(tmp_path / "data", classes=2, per_class=12)
    source = open_source(str(root), "train", progress=False)
    bad = {}
    for k, (how, spoil) in enumerate(SPOILERS.items()):
        i = 3 + 4 * k
        path = source.paths[i]
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(spoil(data))
        bad[i] = how
    source.paths[20] = str(tmp_path / "deleted.jpg")  # as if removed after indexing
    bad[20] = "deleted"
    return source, bad


def test_the_check_refuses_what_the_index_would_and_passes_good_files(spoiled):
    source, bad = spoiled
    data, replaced = read_checked(source, range(len(source)))
    header_ok = {"bogus huffman table"}
    assert sorted(replaced) == sorted(i for i, how in bad.items() if how not in header_ok)
    for i in replaced:
        assert probe_bytes(data[i]) == (source.widths[i], source.heights[i])


def test_a_replacement_is_flat_mean_colour_at_the_indexed_size():
    img = replacement_image(37, 21)
    assert probe_bytes(img) == (37, 21)
    from pipelines.render import decode
    pixels = np.asarray(decode(img))
    assert pixels.shape == (21, 37, 3) and np.abs(pixels.astype(int) - REPLACEMENT_RGB).max() <= 1


@pytest.mark.parametrize("pipeline", PIPES)
def test_spoiled_files_do_not_stop_an_epoch_and_are_counted(spoiled, pipeline):
    source, bad = spoiled
    loader = pipelines.build(pipeline, SPEC, source, batch_size=4, workers=0, seed=3)
    seen = []
    for views in loader:
        seen += views.index.tolist()
        crops = views.crops["global"]  # [2, B, C, H, W], normalised
        for b, i in enumerate(views.index.tolist()):
            if i in bad:  # a flat image stays flat through crop, flip and colour ops
                flat = crops[:, b].flatten(2).std(dim=2)
                assert float(flat.max()) < 0.02, (bad[i], flat)
    loader.close()
    assert loader.epoch == 1 and len(seen) == len(loader) * 4
    assert sorted(loader.replaced) == sorted(i for i in bad if i in seen)
    assert len(set(loader.replaced)) == len(loader.replaced)


@pytest.mark.parametrize("pipeline", PIPES)
def test_a_resumed_epoch_counts_each_replacement_once(spoiled, pipeline):
    source, bad = spoiled
    loader = pipelines.build(pipeline, SPEC, source, batch_size=4, workers=0, seed=3)
    it = iter(loader)
    first = [next(it).index.tolist() for _ in range(2)]
    state = loader.state_dict()
    loader.close()
    resumed = pipelines.build(pipeline, SPEC, source, batch_size=4, workers=0, seed=3)
    resumed.load_state_dict(state)
    rest = [v.index.tolist() for v in resumed]
    resumed.close()
    seen = [i for batch in first + rest for i in batch]
    assert sorted(loader.replaced + resumed.replaced) == sorted(i for i in bad if i in seen)


def test_the_index_notices_added_removed_and_modified_files(tmp_path, capfd):
    root = make_image_folder(tmp_path / "data", classes=2, per_class=6)
    first = open_source(str(root), "train", progress=False)
    assert "since it was built" not in capfd.readouterr().err
    again = open_source(str(root), "train", progress=False)
    assert again.fingerprint == first.fingerprint and "since it was built" not in capfd.readouterr().err
    shutil.copy(root / "class0" / "000.jpg", root / "class0" / "new.jpg")
    (root / "class1" / "002.jpg").unlink()
    make_image_folder(tmp_path / "other", classes=1, per_class=2, size=(30, 20), seed=5)
    # Rewritten in place: noticed here because class1 changed too (a removal), so the folder is walked again;
    # alone in an unchanged folder it takes recheck=True (tests/pipelines/test_index.py).
    shutil.copy(tmp_path / "other" / "class0" / "001.jpg", root / "class1" / "003.jpg")  # other bytes, other size
    changed = open_source(str(root), "train", progress=False)
    err = capfd.readouterr().err
    assert "1 files added, 1 removed, 1 modified since it was built; re-reading 2 headers" in err
    assert changed.fingerprint != first.fingerprint
    k = changed.paths.index(str(root / "class1" / "003.jpg"))
    assert (changed.widths[k], changed.heights[k]) == (30, 20)

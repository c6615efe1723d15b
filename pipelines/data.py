"""Data sources and the cached image index.

A `Source` is a fixed, ordered list of encoded image files with a label and
the decoded size of each. Every pipeline reads the same Source: the planner
draws crop windows from `widths`/`heights` (sizes after EXIF orientation,
as DALI decodes them), and a pipeline fetches the bytes with `read`.

Where a source comes from (`open_source(data)`):

- `None` or `'sample'`: the Fashion-MNIST sample shipped in
  `pipelines/sample/` (5,000 train / 1,000 test), written once as a JPEG
  ImageFolder under the cache so that every pipeline runs its real decode.
- `'fashion-mnist'`: the full set from Debian's `dataset-fashion-mnist`,
  written the same way. (These two names win over a directory of the same
  name; write `./sample` to mean the directory.)
- a directory: an ImageFolder (class subfolders; images directly in it make
  it unlabelled), optionally holding `train/` and `val/` (or `test/`).
- a `.txt` file list: `path [label]` per line.
- tar shards: `train-{000000..000099}.tar`, a `.txt` list of `.tar` files,
  or a directory of them (pipelines/shards.py).

The index (path, size, mtime, width, height, usable) of every source is
built once from image headers and cached under `cache_root()/index/`,
with every directory the walk visited and its mtime. Reopening a folder
stats those directories only (about 1,000 for ImageNet): when none
changed, no entry was added, removed or renamed, and the cached list is
taken with no walk and no stat of any file; else the folder is walked
again and only files whose size or mtime changed are re-read. A file
rewritten in place under the same name leaves its directory alone, so
only `recheck=True` (train.py's `--recheck-data`: stat every file)
notices it at open; either way it cannot stop a run, since every
pipeline checks each file as it reads it (`read_checked`) and replaces
and counts one that no longer matches. A .txt file list keeps one stat
per file at every open. Files that would stop a DALI pipeline (empty,
not an image, truncated JPEG, corrupt PNG) are left out with one warning
line (walk, probe and cache file: pipelines/index.py).
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import os
import pathlib
import shutil
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from .index import (EXIF_ORIENTATION, IMAGE_EXTENSIONS, TRANSPOSED_ORIENTATIONS, folder_unchanged, join_paths,
                    load_index, probe_all, probe_bytes, save_index, split_paths, stat_listed, walk_folder)


class DataError(ValueError):
    """Bad input: the message is shown to the user as-is (exit code 2)."""


FILE_LIST_EXTENSIONS = frozenset({".txt", ".lst"})

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Label order of Fashion-MNIST's README; '/' and ' ' replaced for file names.
FASHION_MNIST_CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"]
SAMPLE_FILE = pathlib.Path(__file__).resolve().parent / "sample" / "fashion_mnist_sample.npz"
MATERIALISED_JPEG_QUALITY = 95


@dataclass
class Source:
    """An ordered list of usable image files with labels and decoded sizes."""
    name: str
    split: str
    paths: list = field(repr=False)
    labels: np.ndarray = field(repr=False)
    widths: np.ndarray = field(repr=False)
    heights: np.ndarray = field(repr=False)
    classes: list = field(repr=False)
    skipped: int = 0
    # Changes when any listed file is added, removed, resized or touched (a checkpoint records it).
    fingerprint: str = ""
    # Tar shards (pipelines/shards.py): where each image lies (Members); None for files.
    members: Optional[object] = field(default=None, repr=False)

    def __post_init__(self):
        n = len(self.paths)
        if not (len(self.labels) == len(self.widths) == len(self.heights) == n):
            raise ValueError(f"source {self.name!r}: paths, labels, widths and heights differ in length")

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> np.ndarray:
        """The encoded file of image `i` as a 1-D uint8 array."""
        if self.members is not None:
            return self.members.read(i)
        return np.fromfile(self.paths[i], dtype=np.uint8)

    def read_many(self, indices: Iterable[int]) -> list:
        return [self.read(i) for i in indices]

    @property
    def has_labels(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels >= 0).any())


def read_checked(source: Source, indices: Iterable[int], known_bad=frozenset()) -> tuple:
    """(encoded files, dataset indices replaced): each file as `Source.read`,
    checked as the index checked it (`probe_bytes`: headers, the JPEG end
    marker, the indexed size). A file that no longer passes (truncated,
    deleted or replaced since indexing), or whose index is in `known_bad`, is
    replaced by `replacement_image` of its indexed size, so the plan's
    windows still fit."""
    out, replaced = [], []
    for i in indices:
        w, h = int(source.widths[i]), int(source.heights[i])
        try:
            data = None if i in known_bad else source.read(i)
        except OSError:
            data = None
        if data is None or probe_bytes(data) != (w, h):
            data = replacement_image(w, h)
            replaced.append(int(i))
        out.append(data)
    return out, replaced


def decodes(source: Source, i: int) -> bool:
    """Whether file i decodes in full (PIL) to its indexed size: the slow,
    sure check, for the rare file that passes `probe_bytes` but not a decoder."""
    try:
        with Image.open(source.paths[i] if source.members is None else io.BytesIO(source.read(i))) as im:
            im.load()
            size = im.size
            if im.getexif().get(EXIF_ORIENTATION) in TRANSPOSED_ORIENTATIONS:
                size = size[::-1]
        return size == (int(source.widths[i]), int(source.heights[i]))
    except Exception:
        return False


# The normalisation mean (pipelines/views.py MEAN): a replacement is all zeros once normalised.
REPLACEMENT_RGB = (124, 116, 104)


@functools.lru_cache(maxsize=64)
def replacement_image(width: int, height: int) -> np.ndarray:
    """A flat JPEG of REPLACEMENT_RGB, width x height, as a read-only uint8 array."""
    buf = io.BytesIO()
    Image.new("RGB", (int(width), int(height)), REPLACEMENT_RGB).save(buf, format="JPEG", quality=95)
    data = np.frombuffer(buf.getvalue(), dtype=np.uint8)
    data.flags.writeable = False
    return data


def cache_root(cache_dir: Optional[str] = None) -> pathlib.Path:
    """`cache_dir`, else $VIEWFORGE_CACHE, else ~/.cache/viewforge ($XDG_CACHE_HOME honoured)."""
    if cache_dir:
        return pathlib.Path(cache_dir).expanduser()
    if os.environ.get("VIEWFORGE_CACHE"):
        return pathlib.Path(os.environ["VIEWFORGE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache"
    return base / "viewforge"


def open_source(data: Optional[str], split: str = "train", cache_dir: Optional[str] = None,
                progress: bool = True, recheck: bool = False) -> Optional[Source]:
    """The `split` ('train' or 'test') of `data`, or None when `data` has no such split.
    `recheck`: stat every file of a folder even when no directory changed (see above)."""
    split = {"val": "test"}.get(split, split)
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}: use 'train' or 'test'")
    if data is None or data == "sample":
        return _open_sample(split, cache_dir, progress, recheck)
    if data == "fashion-mnist":
        return _open_fashion_mnist(split, cache_dir, progress, recheck)
    from .shards import open_shards, shard_paths  # tar shards
    if (shards := shard_paths(str(data), split)) is not None:
        return open_shards(str(data), shards, cache_dir, progress, split) if shards else None
    path = os.path.abspath(os.path.expanduser(str(data)))
    if os.path.isdir(path):
        return _open_image_folder(str(data), path, split, cache_dir, progress, recheck)
    if os.path.isfile(path):
        if os.path.splitext(path)[1].lower() not in FILE_LIST_EXTENSIONS:
            raise DataError(f"{data}: expected a directory of images or a .txt file list "
                            f"(one 'path [label]' per line), not a {os.path.splitext(path)[1] or 'extensionless'} file")
        return None if split == "test" else _open_file_list(str(data), path, cache_dir, progress)
    raise DataError(f"{data}: no such file or directory; expected a directory of images (ImageFolder), "
                    f"a .txt file list, 'fashion-mnist', or nothing for the built-in sample")


# ---------------------------------------------------------------- directories

def _open_image_folder(name: str, root: str, split: str, cache_dir, progress, recheck) -> Optional[Source]:
    """An ImageFolder, or a folder holding train/ and val/ (or test/) ImageFolders."""
    train_dir = os.path.join(root, "train")
    test_dir = next((os.path.join(root, d) for d in ("val", "test") if os.path.isdir(os.path.join(root, d))), None)
    if os.path.isdir(train_dir) and test_dir is not None:
        split_dirs = {"train": train_dir, "test": test_dir}
    elif split == "test":
        return None
    elif os.path.isdir(train_dir) and not _has_top_level_images(root) and _class_dirs(root) == ["train"]:
        split_dirs = {"train": train_dir}  # only train/ so far: it is the split, not a class named 'train'
    else:
        split_dirs = {"train": root}

    # Both splits share one class list so that a label means the same class in each.
    labelled = {s: not _has_top_level_images(d) for s, d in split_dirs.items()}
    classes = sorted(set().union(*(_class_dirs(d) for s, d in split_dirs.items() if labelled[s])))
    split_dir = split_dirs[split]
    if labelled[split]:
        label_of = {c: k for k, c in enumerate(classes)}
        groups = _class_dirs(split_dir)
        group_labels = [label_of[c] for c in groups]
    else:
        classes, groups, group_labels = [], ["."], [-1]
    return _index_folder(name, split, _shown(name, split_dir, root), split_dir, groups, group_labels, classes,
                         cache_dir, progress, recheck)


def _index_folder(name: str, split: str, shown: str, split_dir: str, groups: list, group_labels: list,
                  classes: list, cache_dir, progress, recheck: bool) -> Source:
    """The Source of the image files under split_dir/<group> for each group
    (label group_labels[k]): the cached list when no directory of the last
    walk changed (and not `recheck`), else a walk and `index_source`."""
    group_labels = np.asarray(group_labels, dtype=np.int64)
    cache_file = _cache_file(cache_dir, ("dir", split_dir))
    cached = load_index(cache_file)
    if (not recheck and cached is not None and cached["group_names"].tobytes() == join_paths(groups)
            and folder_unchanged(cached)):
        return _source(name, split, shown, cached["paths"], group_labels[cached["groups"]], classes,
                       {k: cached[k] for k in ("sizes", "mtimes", "widths", "heights")})
    walked = walk_folder(split_dir, groups)
    if not walked["paths"]:
        raise DataError(f"{shown}: no images found; expected class subfolders of images "
                        f"or images directly in it ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    walked["group_names"], walked["dirs"] = join_paths(groups), join_paths(walked["dirs"])
    return index_source(name, split, shown, ("dir", split_dir), walked.pop("paths"),
                        group_labels[walked["groups"]], classes, cache_dir, progress, walked=walked, cached=cached)


def _shown(name: str, split_dir: str, root: str) -> str:
    """The path as the user wrote it, with the split folder appended when one was chosen."""
    return name if split_dir == root else os.path.join(name, os.path.basename(split_dir))


def _visible(entry: os.DirEntry) -> bool:  # as walk_folder: no .ipynb_checkpoints, .DS_Store, our temporaries
    return not entry.name.startswith(".")


def _is_image_file(entry: os.DirEntry) -> bool:
    return os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and entry.is_file()


def _has_top_level_images(directory: str) -> bool:
    with os.scandir(directory) as entries:
        return any(_visible(e) and _is_image_file(e) for e in entries)


def _class_dirs(directory: str) -> list:
    with os.scandir(directory) as entries:
        return sorted(e.name for e in entries if _visible(e) and e.is_dir())


# ---------------------------------------------------------------- file lists

def _open_file_list(name: str, list_path: str, cache_dir, progress) -> Source:
    """`path [label]` per line; paths relative to the list's folder unless absolute."""
    base = os.path.dirname(list_path)
    paths, labels = [], []
    with open(list_path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            label = -1
            parts = line.rsplit(None, 1)
            if len(parts) == 2 and parts[1].lstrip("-").isdigit():
                line, label = parts[0], int(parts[1])
                if label < -1:
                    raise DataError(f"{name}:{line_no}: label {label} is negative (use -1 or leave it out for unknown)")
            paths.append(os.path.abspath(os.path.join(base, os.path.expanduser(line))))
            labels.append(label)
    if not paths:
        raise DataError(f"{name}: the file list names no images; expected one 'path [label]' per line")
    labels = np.asarray(labels, dtype=np.int64)
    classes = [str(k) for k in range(int(labels.max()) + 1)] if (labels >= 0).any() else []
    return index_source(name, "train", name, ("list", list_path), paths, labels, classes, cache_dir, progress)


# ---------------------------------------------------------------- Fashion-MNIST

def read_idx(path) -> np.ndarray:
    """A gzipped (or plain) idx file, the MNIST format: magic, big-endian dims, uint8 data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path}: not a uint8 idx file")
    shape = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _open_sample(split: str, cache_dir, progress, recheck) -> Source:
    tag = "sample sha1 " + hashlib.sha1(SAMPLE_FILE.read_bytes()).hexdigest()

    def load():
        with np.load(SAMPLE_FILE) as z:
            return {s: (z[f"{s}_images"], z[f"{s}_labels"]) for s in ("train", "test")}

    dest = cache_root(cache_dir) / "sample"
    _materialise(dest, tag, load, FASHION_MNIST_CLASSES, progress, "writing sample JPEGs")
    return _open_materialised("sample", dest, split, cache_dir, progress, recheck)


def _open_fashion_mnist(split: str, cache_dir, progress, recheck) -> Source:
    source_dir = pathlib.Path(FASHION_MNIST_DIR)
    files = [source_dir / f for pair in FASHION_MNIST_FILES.values() for f in pair]
    dest = cache_root(cache_dir) / "fashion-mnist"
    if not all(f.is_file() for f in files):
        if (dest / _MANIFEST).is_file():  # written earlier, package since removed: still usable
            return _open_materialised("fashion-mnist", dest, split, cache_dir, progress, recheck)
        raise DataError(f"Fashion-MNIST not found under {source_dir}: install it with "
                        f"`apt-get install {FASHION_MNIST_PACKAGE}`")
    tag = "fashion-mnist " + " ".join(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)

    def load():
        return {s: (read_idx(source_dir / images), read_idx(source_dir / labels).astype(np.int64))
                for s, (images, labels) in FASHION_MNIST_FILES.items()}

    _materialise(dest, tag, load, FASHION_MNIST_CLASSES, progress, "writing Fashion-MNIST JPEGs")
    return _open_materialised("fashion-mnist", dest, split, cache_dir, progress, recheck)


def _open_materialised(name: str, dest: pathlib.Path, split: str, cache_dir, progress, recheck) -> Source:
    """Index a tree written by `_materialise`, keeping Fashion-MNIST's own label numbers."""
    return _index_folder(name, split, name, str(dest / split), list(FASHION_MNIST_CLASSES),
                         list(range(len(FASHION_MNIST_CLASSES))), list(FASHION_MNIST_CLASSES), cache_dir, progress,
                         recheck)


_MANIFEST = "MANIFEST.json"


def _read_manifest(directory: pathlib.Path) -> Optional[dict]:
    try:
        return json.loads((directory / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _materialise(dest: pathlib.Path, tag: str, load_splits: Callable[[], dict], classes: Sequence[str],
                 progress: bool, desc: str) -> None:
    """Write arrays as dest/{split}/{class}/{i:05d}.jpg once; a complete tree is reused.

    The tree is built in a temporary sibling and moved into place with one
    rename, so a killed run leaves either nothing or a complete tree, and of
    two processes racing, the loser finds the winner's tree and drops its own.
    """
    manifest = _read_manifest(dest)
    if manifest is not None and manifest.get("source") == tag:
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    for leftover in dest.parent.glob(f".{dest.name}.*-*"):  # from runs killed a day or more ago
        try:
            if time.time() - leftover.stat().st_mtime > 86400:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass
    splits = load_splits()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        total = sum(len(labels) for _, labels in splits.values())
        with tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False, file=sys.stderr) as bar:
            for split, (images, labels) in splits.items():
                for class_name in classes:
                    (tmp / split / class_name).mkdir(parents=True)
                for i, (image, label) in enumerate(zip(images, labels)):
                    Image.fromarray(image).save(tmp / split / classes[label] / f"{i:05d}.jpg",
                                                quality=MATERIALISED_JPEG_QUALITY)
                    bar.update()
        counts = {split: int(len(labels)) for split, (_, labels) in splits.items()}
        (tmp / _MANIFEST).write_text(json.dumps({"source": tag, "classes": list(classes), "counts": counts}))
        if dest.exists():  # stale tree from another source version: move aside, then delete
            stale = pathlib.Path(tempfile.mkdtemp(prefix=f".{dest.name}.stale-", dir=dest.parent))
            os.replace(dest, stale / dest.name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, dest)
        except OSError:
            winner = _read_manifest(dest)
            if winner is None or winner.get("source") != tag:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- the index

def index_source(name: str, split: str, shown: str, identity: tuple, paths: list, labels: np.ndarray,
                 classes: list, cache_dir, progress, walked: Optional[dict] = None,
                 cached: Optional[dict] = None) -> Source:
    """Sizes of `paths` from the cache or their headers; unusable files dropped with one warning.
    `walked`: what `walk_folder` found besides the paths, recorded with the index; without it (file
    lists) each path is stat-ed here. `cached`: the cache file's arrays when the caller loaded them."""
    n_listed = len(paths)
    if walked is None:
        walked = stat_listed(paths)
    sizes, mtimes = walked["sizes"], walked["mtimes"]
    widths = np.full(n_listed, -1, dtype=np.int32)
    heights = np.full(n_listed, -1, dtype=np.int32)
    cache_file = _cache_file(cache_dir, identity)
    blob = join_paths(paths)
    cached = cached if cached is not None else load_index(cache_file)
    if (cached is not None and cached["paths"].data == blob  # memoryview == bytes: compared in place
            and np.array_equal(cached["sizes"], sizes) and np.array_equal(cached["mtimes"], mtimes)):
        widths[:], heights[:] = cached["widths"], cached["heights"]
        record_changed = not (cached["dirs"].tobytes() == walked["dirs"]
                              and np.array_equal(cached["dir_mtimes"], walked["dir_mtimes"]))
    else:
        _probe_changed(paths, blob, sizes, mtimes, widths, heights, cached, shown, progress)
        record_changed = True
    if record_changed:
        save_index(cache_file, {"paths": blob, "widths": widths, "heights": heights, **walked})
    return _source(name, split, shown, blob, labels, classes,
                   {"sizes": sizes, "mtimes": mtimes, "widths": widths, "heights": heights}, paths)


def _cache_file(cache_dir, identity: tuple) -> pathlib.Path:
    return cache_root(cache_dir) / "index" / (hashlib.sha1(repr(identity).encode()).hexdigest() + ".npz")


def _probe_changed(paths, blob, sizes, mtimes, widths, heights, cached, shown, progress) -> None:
    """Fill widths/heights: reuse every cached entry (usable or not) whose file is unchanged, read the rest."""
    keep = np.zeros(len(paths), dtype=bool)
    if cached is not None and len(cached["sizes"]):
        if cached["paths"].data == blob:  # the same list (e.g. a recheck): no lookup by name
            at, n_known = np.arange(len(paths)), len(paths)
        else:
            known = {p: k for k, p in enumerate(split_paths(cached["paths"]))}
            at, n_known = np.fromiter((known.get(p, -1) for p in paths), np.int64, len(paths)), len(known)
            del known
        old = np.maximum(at, 0)
        keep = (at >= 0) & (sizes >= 0) & (cached["sizes"][old] == sizes) & (cached["mtimes"][old] == mtimes)
        widths[keep], heights[keep] = cached["widths"][old[keep]], cached["heights"][old[keep]]
        added, modified = int((at < 0).sum()), int(((at >= 0) & ~keep).sum())
        print(f"index of {shown}: {added:,} files added, {n_known - (len(paths) - added):,} removed, {modified:,} "
              f"modified since it was built; re-reading {int((~keep & (sizes >= 0)).sum()):,} headers",
              file=sys.stderr)
    to_probe = np.flatnonzero(~keep & (sizes >= 0))
    widths[to_probe], heights[to_probe] = probe_all([paths[i] for i in to_probe], sizes[to_probe], progress, shown)


def _source(name: str, split: str, shown: str, blob: bytes, labels: np.ndarray, classes: list, arrays: dict,
            paths: Optional[list] = None) -> Source:
    """The usable files of an index, with one warning for the rest. The
    fingerprint covers every listed path, size and mtime, usable or not."""
    paths = split_paths(blob) if paths is None else paths
    widths, heights = arrays["widths"], arrays["heights"]
    usable = widths >= 0
    n_listed = len(paths)
    skipped = n_listed - int(usable.sum())
    if not usable.any():
        raise DataError(f"{shown}: none of the {n_listed:,} image files could be read "
                        f"(e.g. {paths[0]}); expected JPEG, PNG, BMP, WebP or TIFF images")
    if skipped:
        first_bad = paths[int(np.flatnonzero(~usable)[0])]
        noun = "file" if skipped == 1 else "files"
        print(f"warning: skipped {skipped:,} unreadable {noun} of {n_listed:,} in {shown} (e.g. {first_bad})",
              file=sys.stderr)
    keep = np.flatnonzero(usable)
    sizes, mtimes = np.asarray(arrays["sizes"], dtype=np.int64), np.asarray(arrays["mtimes"], dtype=np.int64)
    h = hashlib.sha1(blob)  # = sha1(blob + sizes + mtimes), without the copy
    h.update(sizes.tobytes())
    h.update(mtimes.tobytes())
    fingerprint = h.hexdigest()[:16]
    return Source(name=name, split=split, paths=[paths[i] for i in keep], labels=labels[keep].astype(np.int64),
                  widths=widths[keep].astype(np.int32), heights=heights[keep].astype(np.int32),
                  classes=list(classes), skipped=skipped, fingerprint=fingerprint)


if __name__ == "__main__":  # `python -m pipelines.data shards ...`: the converter, in the imported module
    from pipelines.shard_writer import main
    sys.exit(main())

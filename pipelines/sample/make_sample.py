"""Cut the embedded sample (fashion_mnist_sample.npz) from Debian's Fashion-MNIST.

The sample is what `viewforge` trains on when no data is given: 500 training
and 100 test images per class (5,000 + 1,000), drawn per class without
replacement with a fixed seed, kept in the original order of the idx files.

    apt-get install dataset-fashion-mnist
    python pipelines/sample/make_sample.py            # rewrites the .npz next to this file

The output holds uint8 images [N, 28, 28], int64 labels [N], the int64 index
of each image in the original split (provenance), and the class names.
Running it again with the same seed and source gives identical arrays.
"""
from __future__ import annotations

import argparse
import gzip
import pathlib
import struct
import sys

import numpy as np

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
SAMPLE_FILE = pathlib.Path(__file__).with_name("fashion_mnist_sample.npz")
# Label order of Fashion-MNIST's README, made safe for file names ('/' and ' ').
CLASS_NAMES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"]
SEED = 0
TRAIN_PER_CLASS = 500
TEST_PER_CLASS = 100


def read_idx(path: pathlib.Path) -> np.ndarray:
    """One gzipped idx file (the MNIST format: magic, dims, big-endian uint8 data)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not a uint8 idx file")
    shape = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def stratified_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """`per_class` indices of each class, without replacement, in ascending order."""
    chosen = [rng.choice(np.flatnonzero(labels == c), size=per_class, replace=False)
              for c in range(len(CLASS_NAMES))]
    return np.sort(np.concatenate(chosen))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default=DEBIAN_FASHION_MNIST_DIR, help="folder with the four *-idx*-ubyte.gz files")
    parser.add_argument("--out", default=str(SAMPLE_FILE))
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)

    src = pathlib.Path(args.src)
    rng = np.random.default_rng(args.seed)
    arrays = {}
    for split, prefix, per_class in (("train", "train", TRAIN_PER_CLASS), ("test", "t10k", TEST_PER_CLASS)):
        images = read_idx(src / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(src / f"{prefix}-labels-idx1-ubyte.gz")
        keep = stratified_indices(labels, per_class, rng)
        arrays[f"{split}_images"] = np.ascontiguousarray(images[keep])
        arrays[f"{split}_labels"] = labels[keep].astype(np.int64)
        arrays[f"{split}_index"] = keep.astype(np.int64)
    arrays["classes"] = np.array(CLASS_NAMES)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out}: {len(arrays['train_labels'])} train, {len(arrays['test_labels'])} test images "
          f"({pathlib.Path(args.out).stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

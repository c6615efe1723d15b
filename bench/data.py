"""The images every timing reads: real photographs cut once into the
viewforge cache (ImageNet's most common size, 500x375, JPEG quality 90),
random-noise JPEGs (--synthetic-jpegs, warned: they decode slower), or the
user's own folder (--data); and fixed subsets of a source."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import numpy as np

PHOTO_QUALITY = 90


def data_arguments(p: argparse.ArgumentParser, photos, photos_default_text: str = "") -> None:
    """The options `prepare_data` reads (every bench script that times photos takes them)."""
    p.add_argument("--photos", type=int, default=photos,
                   help=f"ImageNet-sized photos to cut ({photos_default_text or photos})")
    p.add_argument("--photo-size", default="500x375", help="WxH of the prepared JPEGs")
    p.add_argument("--synthetic-jpegs", action="store_true", help="random-noise JPEGs instead of photos (warned)")
    p.add_argument("--data", default=None, help="time on this ImageFolder / file list instead of prepared photos")
    p.add_argument("--seed", type=int, default=0)


def prepare_data(args) -> tuple:
    """The source every measurement reads, and a description of it."""
    from bench.photos import make_photo_folder
    from pipelines.data import cache_root, open_source
    w, h = (int(v) for v in args.photo_size.lower().split("x"))
    if args.data:
        source = open_source(args.data, "train")
        return source, {"kind": "data", "path": args.data, "count": len(source)}
    if args.synthetic_jpegs:
        print("WARNING: --synthetic-jpegs: random-noise JPEGs are larger and slower to decode than photos; "
              "these numbers do not compare with photo runs", file=sys.stderr)
        folder = cache_root() / f"bench-noise-{w}x{h}-q{PHOTO_QUALITY}"
        source = noise_folder(folder, args.photos, (w, h), args.seed)
        return source, {"kind": "synthetic-jpegs", "path": str(folder), "count": len(source), "size": [w, h]}
    folder = cache_root() / f"bench-photos-{w}x{h}-q{PHOTO_QUALITY}"
    source = make_photo_folder(folder, args.photos, size=(w, h), quality=PHOTO_QUALITY, seed=args.seed)
    return source, {"kind": "photos", "path": str(folder), "count": len(source), "size": [w, h],
                    "quality": PHOTO_QUALITY}


def noise_folder(folder: Path, count: int, size: tuple, seed: int):
    """`count` uniform-noise JPEGs (q90) of `size`, written once and reused."""
    from PIL import Image

    from pipelines.data import open_source
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        path = folder / f"noise_{i:06d}.jpg"
        if not path.exists():
            pixels = np.random.default_rng([seed, i]).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            tmp = folder / f".{path.name}.tmp"
            Image.fromarray(pixels).save(tmp, format="JPEG", quality=PHOTO_QUALITY)
            os.replace(tmp, path)
    source = open_source(str(folder), "train", progress=False)
    keep = [k for k, p in enumerate(source.paths) if int(Path(p).stem.split("_")[1]) < count]
    return subset(source, keep)


def subset(source, keep):
    """The images of `source` at the indices `keep`, in that order."""
    keep = np.asarray(keep, dtype=np.int64)
    return dataclasses.replace(source, paths=[source.paths[k] for k in keep], labels=source.labels[keep],
                               widths=source.widths[keep], heights=source.heights[keep],
                               members=None if source.members is None else source.members.take(keep))


def random_subset(source, count: int, seed: int):
    """A fixed random `count` of `source` (in dataset order); all of it when count is 0 or too large."""
    if not count or count >= len(source):
        return source
    return subset(source, np.sort(np.random.default_rng(seed).choice(len(source), count, replace=False)))

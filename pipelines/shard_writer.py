"""Write any source as WebDataset-style tar shards (read by pipelines/shards.py).

    python -m pipelines.data shards --data DIR --out shards/train --per-shard 1000
    python train.py --data 'shards/train-{000000..000009}.tar' ...

Each image becomes `{class}/{position:08d}.{ext}` (its own bytes and
extension) plus `{class}/{position:08d}.cls` (its label as text), in the
source's order; the key's prefix keeps the class name, the .cls member the
label number (so a class left without images keeps the numbering).
"""
from __future__ import annotations

import argparse
import io
import os
import re
import sys
import tarfile
import tempfile

from tqdm import tqdm

from .data import DataError, Source, open_source


# ---------------------------------------------------------------- the converter
def write_shards(source: Source, prefix: str, per_shard: int, progress: bool = True) -> list:
    """Write `source` in order as PREFIX-000000.tar, ...: each image as
    `{class}/{position:08d}.{ext}` (its bytes, its extension lower-cased) and,
    when labelled, `{class}/{position:08d}.cls` (the label); keys of
    unlabelled images are `{position:08d}`. Each shard is written to a
    temporary file and renamed into place. Returns the shard paths."""
    if per_shard < 1:
        raise DataError(f"--per-shard must be positive, not {per_shard}")
    prefix = os.path.abspath(os.path.expanduser(prefix))
    folder = os.path.dirname(prefix)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot write shards in {folder}: {e.strerror or e}") from None
    count = -(-len(source) // per_shard)
    written = []
    with tqdm(total=len(source), desc=f"writing {count} shards", unit="img", disable=not progress,
              file=sys.stderr) as bar:
        for s in range(count):
            out = f"{prefix}-{s:06d}.tar"
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.", suffix=".tmp", dir=folder)
            try:
                with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    for i in range(s * per_shard, min(len(source), (s + 1) * per_shard)):
                        _add_sample(tar, source, i)
                        bar.update()
                os.replace(tmp, out)
            except OSError as e:
                raise DataError(f"cannot write {out}: {e.strerror or e}") from None
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            written.append(out)
    stale = _left_from_before(prefix, count)
    if stale:
        print(f"warning: {len(stale)} shard(s) of an earlier write are still there ({stale[0]}, ...): the pattern "
              f"printed leaves them out, but --data {folder} would read them; delete them", file=sys.stderr)
    return written


def _left_from_before(prefix: str, count: int) -> list:
    """PREFIX-NNNNNN.tar files numbered `count` or more: not written now."""
    folder, base = os.path.split(prefix)
    name = re.compile(re.escape(base) + r"-(\d{6})\.tar")
    with os.scandir(folder) as it:
        return sorted(e.path for e in it if (m := name.fullmatch(e.name)) and int(m.group(1)) >= count)


def _add_sample(tar: tarfile.TarFile, source: Source, i: int) -> None:
    label = int(source.labels[i])
    named = label >= 0 and label < len(source.classes)
    key = f"{source.classes[label]}/{i:08d}" if named else f"{i:08d}"
    ext = os.path.splitext(source.paths[i])[1].lower()
    members = [(f"{key}{ext}", source.read(i).tobytes())]
    if label >= 0:
        members.append((f"{key}.cls", str(label).encode()))
    for name, payload in members:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(payload), 0o644, 0
        tar.addfile(info, io.BytesIO(payload))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.data", description="Data tools.")
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("shards", help="write a source as WebDataset-style tar shards",
                       description="Write a source in its order as PREFIX-000000.tar, ... (WebDataset "
                       "style: {class}/{position}.{ext} and .cls per image), and print the --data pattern to read them.")
    w.add_argument("--data", default=None, help="ImageFolder, .txt file list, shards, fashion-mnist, or the sample")
    w.add_argument("--split", default="train", choices=["train", "test"])
    w.add_argument("--out", required=True, help="PREFIX: shards are written as PREFIX-000000.tar, ...")
    w.add_argument("--per-shard", type=int, default=1000, help="images per shard (default 1000)")
    args = p.parse_args(argv)
    try:
        source = open_source(args.data, args.split)
        if source is None:
            raise DataError(f"{args.data}: has no {args.split} split")
        written = write_shards(source, args.out, args.per_shard)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pattern = f"{os.path.expanduser(args.out)}-{{000000..{len(written) - 1:06d}}}.tar"
    print(f"wrote {len(written)} shards of {len(source):,} images; train with --data '{pattern}'")
    return 0

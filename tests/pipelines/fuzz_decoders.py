"""Decoder fuzzing: random bytes, truncations and bit flips of real JPEG, PNG
and WebP files fed to the index probe and to every pipeline's decode.

    python -m tests.pipelines.fuzz_decoders --cases 2000 --seed 1

Each case is one damaged file. The index probe (`data.probe_image` on the
file, `data.probe_bytes` on its bytes) must return a size or (-1, -1); the
torchvision pipeline's decode (`pipelines.torchvision._open`) an image or
None; `data.read_checked` must pass the bytes or replace them. Every file is
then rendered by each installed training pipeline as a dataset indexed with
the seed image's size: every epoch must complete; DALI must replace at
least every file the byte check refuses, torchvision exactly the files its
decode refuses; no file is counted twice. A hang trips a per-case time limit
(faulthandler exits the process with a traceback), a crash kills the process:
run as a child process, both show as a non-zero exit with the last case
printed. The summary is one JSON line on stdout.
"""
from __future__ import annotations

import argparse
import faulthandler
import io
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines import PIPELINES, build
from pipelines.data import Source, read_checked
from pipelines.index import probe_bytes, probe_image
from pipelines.torchvision import _open
from pipelines.views import AugSpec, CropSpec, ViewSpec

SEED_SIZE = (40, 30)
KINDS = ("random", "magic+random", "truncate", "bitflip", "overwrite")


def seed_files() -> dict:
    """Real encodings of one noisy photo-like image: baseline and progressive JPEG, PNG, lossy WebP."""
    rng = np.random.default_rng(0)
    w, h = SEED_SIZE
    ramp = np.linspace(0, 200, w)[None, :, None] + np.linspace(0, 50, h)[:, None, None]
    pixels = np.clip(ramp + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    out = {}
    for name, fmt, kw in (("jpeg", "JPEG", {"quality": 90}), ("jpeg-progressive", "JPEG",
                          {"quality": 80, "progressive": True}), ("png", "PNG", {}), ("webp", "WEBP", {"quality": 80})):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        out[name] = buf.getvalue()
    return out


def damage(rng: np.random.Generator, seeds: dict) -> tuple:
    """(kind, seed name, damaged bytes)."""
    name = list(seeds)[int(rng.integers(len(seeds)))]
    data = bytearray(seeds[name])
    kind = KINDS[int(rng.integers(len(KINDS)))]
    if kind == "random":
        data = bytearray(rng.integers(0, 256, int(rng.integers(0, 3000)), dtype=np.uint8).tobytes())
    elif kind == "magic+random":  # a real header start, then noise
        cut = int(rng.integers(2, 40))
        data = data[:cut] + bytearray(rng.integers(0, 256, int(rng.integers(0, 3000)), dtype=np.uint8).tobytes())
    elif kind == "truncate":
        data = data[: int(rng.integers(0, len(data)))]
    elif kind == "bitflip":
        for _ in range(int(rng.integers(1, 9))):
            at = int(rng.integers(len(data)))
            data[at] ^= 1 << int(rng.integers(8))
    else:  # a run of bytes overwritten
        at, n = int(rng.integers(len(data))), int(rng.integers(1, 64))
        data[at:at + n] = rng.integers(0, 256, len(data[at:at + n]), dtype=np.uint8).tobytes()
    return kind, name, bytes(data)


def run(cases: int, seed: int, per_case_s: float, batch: int = 8) -> dict:
    seeds = seed_files()
    rng = np.random.default_rng(seed)
    root = Path(tempfile.mkdtemp(prefix="viewforge-fuzz-"))
    found, errors, paths = Counter(), [], []
    w, h = SEED_SIZE
    started = time.time()
    for case in range(cases):
        kind, name, data = damage(rng, seeds)
        path = root / f"{case:06d}.img"
        path.write_bytes(data)
        paths.append(str(path))
        print(f"case {case} {kind} {name}", file=sys.stderr, flush=True)
        faulthandler.dump_traceback_later(per_case_s, exit=True)
        try:
            size = probe_image(str(path))
            assert size == probe_bytes(np.frombuffer(data, np.uint8)), "probe of file and bytes disagree"
            assert isinstance(size, tuple) and len(size) == 2
            found["probe: usable" if size[0] >= 0 else "probe: unusable"] += 1
            found["probe: usable at another size" if size[0] >= 0 and size != SEED_SIZE else "-"] += 1
            one = Source("fuzz", "train", [str(path)], np.zeros(1, np.int64), np.array([w], np.int32),
                         np.array([h], np.int32), [])
            img = _open(one, 0)
            found["torchvision decode: an image" if img is not None else "torchvision decode: none (replaced)"] += 1
            _, replaced = read_checked(one, [0])
            found["check: replaced" if replaced else "check: passed"] += 1
        except Exception as e:  # any exception is a finding
            errors.append(f"case {case} ({kind} of {name}): {type(e).__name__}: {e}")
    faulthandler.cancel_dump_traceback_later()
    found.pop("-", None)

    # Every training pipeline renders all damaged files as one dataset, indexed at the seed's size.
    source = Source("fuzz", "train", paths, np.zeros(len(paths), np.int64), np.full(len(paths), w, np.int32),
                    np.full(len(paths), h, np.int32), [])
    # What each pipeline must replace at least: DALI what the byte check refuses (its decoder may
    # refuse more); torchvision exactly what its own decode refuses (a PNG damaged after its image
    # data fails the check's CRC verify but decodes).
    refused = {"dali": {i for i in range(len(paths)) if read_checked(source, [i])[1]},
               "torchvision": {i for i in range(len(paths)) if _open(source, i) is None}}
    spec = ViewSpec(crops=(CropSpec("global", 2, 16, scale=(0.2, 1.0), augs=(AugSpec(),)),))
    for name in [p for p in ("torchvision", "dali") if p in PIPELINES]:
        steps = len(paths) // batch
        faulthandler.dump_traceback_later(per_case_s * batch * max(1, steps), exit=True)
        try:
            loader = build(name, spec, source, batch_size=batch, workers=0)
            seen = set()
            for views in loader:
                seen.update(views.index.tolist())
                assert all(torch_finite(v) for v in views.crops.values())
            loader.close()
            replaced = set(loader.replaced)
            assert len(replaced) == len(loader.replaced), "a file was counted twice in one epoch"
            must = refused[name] & seen
            assert must <= replaced, f"{name} rendered files it should have replaced: {sorted(must - replaced)}"
            if name == "torchvision":
                assert replaced == must, f"torchvision replaced files that decode: {sorted(replaced - must)}"
            found[f"{name}: steps rendered"] += steps
            found[f"{name}: files replaced"] += len(replaced)
            # DALI: what the byte check let through and DALI's decoder refused (found by rebuilding)
            found[f"{name}: replaced beyond the byte check"] += len(replaced - refused["dali"])
        except Exception as e:
            errors.append(f"{name} pipeline: {type(e).__name__}: {e}")
        faulthandler.cancel_dump_traceback_later()
    shutil.rmtree(root, ignore_errors=True)
    return {"cases": cases, "seed": seed, "found": dict(sorted(found.items())), "errors": errors,
            "seconds": round(time.time() - started, 1)}


def torch_finite(x) -> bool:
    import torch
    return bool(torch.isfinite(x).all())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-case-s", type=float, default=20.0, help="time limit of one case (a hang exits)")
    args = p.parse_args(argv)
    print(json.dumps(run(args.cases, args.seed, args.per_case_s)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

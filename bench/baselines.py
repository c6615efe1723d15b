"""What users would otherwise run: two stock view pipelines, timed beside ours.

Both make the same views as a recipe's ViewSpec (sizes, scales, ratios, the
AugSpec's probabilities and strengths; a mosaic's M small crops as M plain
crops, as MosRep's official code hands them to its model) from the same
files, with the same batch and workers, and hand out normalised float32
[B, 3, H, W] tensors per view, as a training loop would get them. Neither
draws its randomness from our plan: they are speed baselines, not
references.

- `stock-torchvision`: a `transforms.Compose` per view on PIL images, in
  DataLoader workers, as solo-learn's and MosRep's official pipelines build
  it (RandomResizedCrop, RandomApply(ColorJitter), RandomGrayscale,
  RandomApply(PIL's GaussianBlur), RandomApply(solarize), RandomHorizontalFlip,
  ToTensor, Normalize).
- `stock-dali`: a DALI CPU graph as DALI's examples write one: a file reader,
  one decode per image, DALI's random ops (random_resized_crop, color_twist
  and gaussian_blur under conditionals, crop_mirror_normalize) and DALI's
  PyTorch iterator.
"""
from __future__ import annotations

import random

import torch
from PIL import Image, ImageFilter, ImageOps

from pipelines.views import MEAN, STD, ViewSpec

BASELINES = ("stock-torchvision", "stock-dali")


def view_list(spec: ViewSpec) -> list:
    """(size, scale, ratio, AugSpec) of every view a sample gets."""
    out = [(c.size, c.scale, c.ratio, c.aug(v)) for c in spec.crops for v in range(c.count)]
    if spec.original is not None:
        out.append((spec.original.size, (1.0, 1.0), (1.0, 1.0), spec.original.aug))
    if spec.mosaic is not None:
        m = spec.mosaic
        out += [(m.crop_size, m.scale, m.ratio, m.aug)] * m.crops_per_image
    return out


# ---------------------------------------------------------------- stock torchvision
class _PILBlur:
    """solo-learn's GaussianBlur: PIL's filter, sigma uniform in the range."""

    def __init__(self, sigma):
        self.sigma = sigma

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class _Solarize:
    def __call__(self, img):
        return ImageOps.solarize(img)


def compose(size, scale, ratio, aug):
    from torchvision import transforms as T
    steps = [T.RandomResizedCrop(size, scale=scale, ratio=ratio)]
    if aug.jitter_p > 0:
        steps.append(T.RandomApply([T.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue)],
                                   p=aug.jitter_p))
    if aug.grayscale_p > 0:
        steps.append(T.RandomGrayscale(p=aug.grayscale_p))
    if aug.blur_p > 0:
        steps.append(T.RandomApply([_PILBlur(aug.blur_sigma)], p=aug.blur_p))
    if aug.solarize_p > 0:
        steps.append(T.RandomApply([_Solarize()], p=aug.solarize_p))
    steps += [T.RandomHorizontalFlip(p=aug.flip_p), T.ToTensor(), T.Normalize(MEAN, STD)]
    return T.Compose(steps)


class _Files(torch.utils.data.Dataset):
    def __init__(self, paths, transforms):
        self.paths, self.transforms = paths, transforms

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        img = Image.open(self.paths[i]).convert("RGB")
        return [t(img) for t in self.transforms]


def stock_torchvision(spec: ViewSpec, paths: list, batch: int, workers: int):
    """An endless iterator of batches (a list of [B, 3, H, W] per view) and its closer."""
    data = _Files(list(paths), [compose(*v) for v in view_list(spec)])
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                         persistent_workers=workers > 0, worker_init_fn=_one_thread)

    def endless():
        while True:
            yield from loader

    def close():
        it = getattr(loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
    return endless(), close


def _one_thread(_):
    torch.set_num_threads(1)


# ---------------------------------------------------------------- stock DALI
def stock_dali(spec: ViewSpec, paths: list, batch: int, workers: int):
    """An endless iterator of batches from a stock DALI CPU graph, and its closer."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    views = view_list(spec)
    solarize = [i if i < 128 else 255 - i for i in range(256)]

    @pipeline_def(enable_conditionals=True)
    def graph():
        jpegs, _ = fn.readers.file(files=list(paths), random_shuffle=True, name="reader")
        image = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        outs = []
        for size, scale, ratio, aug in views:
            v = fn.random_resized_crop(image, size=[size, size], random_area=list(scale),
                                       random_aspect_ratio=list(ratio), antialias=True)
            if aug.jitter_p > 0:
                if fn.random.coin_flip(probability=aug.jitter_p, dtype=types.BOOL):
                    v = fn.color_twist(
                        v, brightness=fn.random.uniform(range=[1 - aug.brightness, 1 + aug.brightness]),
                        contrast=fn.random.uniform(range=[1 - aug.contrast, 1 + aug.contrast]),
                        saturation=fn.random.uniform(range=[1 - aug.saturation, 1 + aug.saturation]),
                        hue=fn.random.uniform(range=[-360 * aug.hue, 360 * aug.hue]))
            if aug.grayscale_p > 0:
                if fn.random.coin_flip(probability=aug.grayscale_p, dtype=types.BOOL):
                    v = fn.color_twist(v, saturation=0.0)
            if aug.blur_p > 0:
                if fn.random.coin_flip(probability=aug.blur_p, dtype=types.BOOL):
                    v = fn.gaussian_blur(v, window_size=aug.blur_kernel(size),
                                         sigma=fn.random.uniform(range=list(aug.blur_sigma)))
            if aug.solarize_p > 0:
                if fn.random.coin_flip(probability=aug.solarize_p, dtype=types.BOOL):
                    v = fn.lookup_table(v, keys=list(range(256)), values=solarize, dtype=types.UINT8)
            outs.append(fn.crop_mirror_normalize(v, mirror=fn.random.coin_flip(probability=aug.flip_p),
                                                 mean=[m * 255 for m in MEAN], std=[s * 255 for s in STD],
                                                 output_layout="CHW", dtype=types.FLOAT))
        return tuple(outs)

    pipe = graph(batch_size=batch, num_threads=max(1, workers), device_id=None, prefetch_queue_depth=2)
    pipe.build()
    names = [f"view{i}" for i in range(len(views))]
    it = DALIGenericIterator(pipe, names, reader_name="reader", auto_reset=True,
                             last_batch_policy=LastBatchPolicy.DROP)

    def endless():
        while True:
            for out in it:
                yield [out[0][n] for n in names]
    return endless(), lambda: None  # the graph goes with the iterator


BUILDERS = {"stock-torchvision": stock_torchvision, "stock-dali": stock_dali}

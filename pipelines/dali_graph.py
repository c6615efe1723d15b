"""The DALI graph of pipelines/dali.py: its typed inputs, its operators, the CPU operator.

Every input enters through one batch-mode `fn.external_source`; `Input`
says what each one is, for which view, and the DALI type and sample ndim
it is fed as (DALI is strict about both: `roi_start` wants FLOAT32 [2],
conditionals a 0-d BOOL, `multi_paste` INT32). `View.inputs(mode)` lists a
view's inputs for the way its graph renders colour; `graph_arrays` builds
their values from a plan, and `graph` the pipeline that consumes them.

`mode`, how a graph renders colour (DaliLoader.mode): 'numba' (CPU graph,
the Numba operator in the graph: pipelines/colour.py's `render`), 'dali'
(CPU graph, DALI's own colour operators: the fallback without DALI's Numba
plugin), 'cuda' (GPU graph: decode and resize only; pipelines/colour.py's
CUDA kernels render every view after it).
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from nvidia.dali import fn, pipeline_def, types

from . import colour
from .plan import BatchPlan, CropPlan
from .views import AugSpec

# Subtracted before DALI's round-to-nearest conversion to uint8 so that it
# truncates like PIL's Image.blend.
_TRUNC = 0.499
_SOLARIZE = [i if i < 128 else 255 - i for i in range(256)]
# nvJPEG on H100/H200 (DALI's ImageNet examples): the hardware decoder takes
# nearly every image, and buffers sized for ImageNet-scale photos are
# allocated once, up front, instead of growing during the first steps.
_GPU_DECODER = dict(hw_decoder_load=0.99, preallocate_width_hint=5980, preallocate_height_hint=6430,
                    device_memory_padding=211025920, host_memory_padding=140544512)


# ---------------------------------------------------------------- the inputs
@dataclass(frozen=True)
class Input:
    """One input of the graph: `name` says what it is, (family, view) whose
    it is (-1, -1 for the batch's own: the files, the mosaic's tables)."""
    name: str
    dtype: types.DALIDataType = types.FLOAT
    ndim: int = 0  # of each sample
    family: int = -1
    view: int = -1


BYTES = Input("bytes", types.UINT8, 1)
# multi_paste's tables (the CPU graph's mosaic): int32 [M] ids, [M, 2] the rest
MOSAIC_INPUTS = (Input("in_ids", types.INT32, 1), Input("in_anchors", types.INT32, 2),
                 Input("shapes", types.INT32, 2), Input("out_anchors", types.INT32, 2))
# The per-view inputs that are not float scalars (the DALI-operator path's
# jitter values a0..h3, grayscale g and sigma are): the crop window's
# (y, x) ends, the Numba operator's colour.view_params vector, and the
# conditionals' flags.
_VIEW_INPUT_TYPES = {"start": (types.FLOAT, 1), "end": (types.FLOAT, 1), "params": (types.FLOAT, 1),
                     "blur": (types.BOOL, 0), "solarize": (types.BOOL, 0)}


def _how_often(p: float) -> str:
    """How an operation of probability p enters the graph."""
    return "never" if p <= 0 else "always" if p >= 1 else "sometimes"


@dataclass(frozen=True)
class View:
    """View v of family g, and the graph inputs its AugSpec needs."""
    g: int
    v: int
    aug: AugSpec

    def inputs(self, mode: str) -> dict:
        """name -> Input of this view's inputs when the graph renders colour by `mode`."""
        a = self.aug
        names = ["start", "end"]
        if mode == "numba":  # the CPU operator runs on every view: it also normalises
            names.append("params")
        elif mode == "dali":
            if a.jitter_p > 0:
                names += [f"{p}{i}" for i in range(4) for p in "abdh"]
            if a.grayscale_p > 0:
                names.append("g")
            if _how_often(a.blur_p) == "sometimes":
                names.append("blur")
            if a.blur_p > 0:
                names.append("sigma")
            if _how_often(a.solarize_p) == "sometimes":
                names.append("solarize")
        # mode 'cuda': the graph only decodes and resizes
        return {n: Input(n, *_VIEW_INPUT_TYPES.get(n, (types.FLOAT, 0)), family=self.g, view=self.v) for n in names}


def graph_inputs(views: list, mode: str, mosaic: bool) -> list:
    """Every input of the graph, in external_source's output order."""
    inputs = [BYTES] + [i for family in views for view in family for i in view.inputs(mode).values()]
    return inputs + list(MOSAIC_INPUTS) if mosaic and mode != "cuda" else inputs


def graph_arrays(plan: BatchPlan, data: list, planner, groups, views, mode) -> dict:
    """Every input's value for `plan` by Input; numpy, batch first, vectorised over views."""
    out = {BYTES: data}
    width = planner.widths[plan.index].astype(np.float64)
    height = planner.heights[plan.index].astype(np.float64)
    for g, group in enumerate(groups):
        cp = group.plan(plan)
        arr = window_arrays(cp, width, height)
        if mode == "numba":
            arr["params"] = colour.view_params(cp, group.augs, group.size)
        elif mode == "dali":
            arr.update(native_arrays(cp))
        for view in views[g]:
            for name, key in view.inputs(mode).items():
                out[key] = arr[name][view.v]
        if group.kind == "mosaic" and mode != "cuda":
            out.update(zip(MOSAIC_INPUTS, paste_arrays(plan.mosaic, group.size)))
    return out


def window_arrays(cp: CropPlan, width, height) -> dict:
    """roi_start / roi_end float32 [count, B, 2]: (y, x) as fractions of the
    decoded image; a flipped view has its x ends swapped."""
    top, left, h, w = (cp.window[..., i].astype(np.float64) for i in range(4))
    x0 = np.where(cp.flip, left + w, left)
    x1 = np.where(cp.flip, left, left + w)
    start = np.stack([top / height, x0 / width], axis=-1)
    end = np.stack([(top + h) / height, x1 / width], axis=-1)
    return {"start": np.clip(start, 0, 1).astype(np.float32), "end": np.clip(end, 0, 1).astype(np.float32)}


def native_arrays(cp: CropPlan) -> dict:
    """Scalars of the DALI-operator path, float32 [count, B] (bool for the
    conditionals): jitter slot i maps x to a*x + b*L + d*mean(L) (L: the 'L'
    image), then rotates hue by h degrees; the slot's operation sets its
    values, the rest stay identity (all four slots are identity without jitter)."""
    f = cp.factors
    op = np.where(cp.jitter[..., None], cp.order, -1)  # [count, B, 4]
    fb, fc, fs, fh = (f[..., i:i + 1] for i in range(4))
    a = np.select([op == 0, op == 1, op == 2], [fb, fc, fs], 1)
    b = np.where(op == 2, 1 - fs, 0)
    d = np.where(op == 1, 1 - fc, 0)
    h = np.where(op == 3, fh * 360, 0)
    out = {"g": cp.gray, "blur": cp.sigma > 0, "solarize": cp.solarize,
           "sigma": np.maximum(cp.sigma, 1e-3)}  # sigma 0 is refused; unused then
    for i in range(4):
        out.update({f"a{i}": a[..., i], f"b{i}": b[..., i], f"d{i}": d[..., i], f"h{i}": h[..., i]})
    return {k: np.ascontiguousarray(v, np.bool_ if v.dtype == np.bool_ and k != "g" else np.float32)
            for k, v in out.items()}


def paste_arrays(mosaic, crop: int) -> tuple:
    """multi_paste's tables in MOSAIC_INPUTS' order, int32 [B, M, ...]: tile t of canvas c is rows
    [tile_crop * crop + src_y, + h) and columns [src_x, + w) of image
    tile_src's strip of M tiles, pasted at (dst_y, dst_x)."""
    p = mosaic.paste
    in_anchors = np.stack([mosaic.tile_crop * crop + p[..., 0], p[..., 1]], axis=-1)
    return (np.ascontiguousarray(mosaic.tile_src, np.int32), np.ascontiguousarray(in_anchors, np.int32),
            np.ascontiguousarray(p[..., 2:4], np.int32), np.ascontiguousarray(p[..., 4:6], np.int32))


# ---------------------------------------------------------------- the graph
@pipeline_def(enable_conditionals=True)
def graph(feed, cpu_op):
    """The pipeline over `feed` (pipelines/dali.py's _Feed: its inputs
    `keys`, view families `groups`, their `views` and `mode`)."""
    nodes = dict(zip(feed.keys, fn.external_source(source=feed, num_outputs=len(feed.keys), batch=True,
                                                    dtype=[k.dtype for k in feed.keys],
                                                    ndim=[k.ndim for k in feed.keys])))
    # fancy upsampling: nvJPEG's chroma upsampling as libjpeg-turbo's (the CPU graph's and PIL's)
    image = (fn.decoders.image(nodes[BYTES], device="mixed", output_type=types.RGB, jpeg_fancy_upsampling=True,
                               **_GPU_DECODER)
             if feed.mode == "cuda" else fn.decoders.image(nodes[BYTES], device="cpu", output_type=types.RGB))
    outputs = []
    for g, group in enumerate(feed.groups):
        views = [_view(image, {n: nodes[k] for n, k in view.inputs(feed.mode).items()}, view, group.size, feed.mode,
                       cpu_op) for view in feed.views[g]]
        if group.kind != "mosaic" or feed.mode == "cuda":  # the kernel pastes the GPU graph's tiles
            outputs.extend(views)
            continue
        strip = fn.cat(*views, axis=0) if len(views) > 1 else views[0]  # [M * s, s, 3]
        ids, in_anchors, shapes, out_anchors = (nodes[k] for k in MOSAIC_INPUTS)
        outputs.append(fn.multi_paste(strip, in_ids=ids, in_anchors=in_anchors, shapes=shapes,
                                      out_anchors=out_anchors, output_size=[group.out_size] * 2))
    return tuple(outputs)


def _view(image, inputs: dict, view: View, size: int, mode: str, cpu_op):
    """One view of every sample from its `inputs` (name -> graph node): [s,
    s, 3] HWC, uint8 (float32, normalised, from the Numba operator)."""
    x = fn.resize(image, size=[size, size], roi_start=inputs["start"], roi_end=inputs["end"],
                  roi_relative=True, interp_type=types.INTERP_LINEAR, antialias=True)
    if mode == "cuda":
        return x
    if mode == "numba":  # the operator's output has no layout; later operators need HWC
        return fn.reshape(cpu_op(x, inputs["params"]), layout="HWC")
    x = _native_colour(x, inputs)
    if "sigma" in inputs:
        window = view.aug.blur_kernel(size)
        if "blur" in inputs:
            blurred = inputs["blur"]
            if blurred:  # a DALI conditional: only the blurred samples are computed
                x = fn.gaussian_blur(x, window_size=window, sigma=inputs["sigma"])
        else:
            x = fn.gaussian_blur(x, window_size=window, sigma=inputs["sigma"])
    if view.aug.solarize_p > 0:
        if "solarize" in inputs:
            solarized = inputs["solarize"]
            if solarized:
                x = fn.lookup_table(x, keys=list(range(256)), values=_SOLARIZE, dtype=types.UINT8)
        else:
            x = fn.lookup_table(x, keys=list(range(256)), values=_SOLARIZE, dtype=types.UINT8)
    return x


def _native_colour(x, inputs: dict):
    """The four jitter slots, then grayscale, with DALI's CPU operators (when
    the AugSpec has them). Hue is `color_twist`'s YIQ rotation, not
    torchvision's HSV shift: this path is the fallback for a DALI without its
    Numba plugin, not the definition of the views."""
    from nvidia.dali import math as dmath

    if "a0" in inputs:
        for i in range(4):
            luma = fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY)
            centre = dmath.floor(fn.reductions.mean(luma) + 0.5)
            mixed = inputs[f"a{i}"] * x + inputs[f"b{i}"] * luma + inputs[f"d{i}"] * centre - _TRUNC
            x = fn.color_twist(fn.cast(mixed, dtype=types.UINT8), hue=inputs[f"h{i}"])
    if "g" in inputs:
        luma = fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY)
        g = inputs["g"]  # 0 or 1: exact either way
        x = fn.cast(g * luma + (1.0 - g) * x, dtype=types.UINT8)
    return x


# ---------------------------------------------------------------- the CPU operator
# DALI's numba_function operator calls C functions of the signatures below
# (see nvidia/dali/plugin/numba); its Python wrapper compiles new ones for
# every operator it makes (seconds each), so ours are compiled once, cached
# on disk, and their addresses handed to the operator.
def _run(out_ptr, out_shapes_ptr, out_ndims_ptr, num_outs, in_ptr, in_shapes_ptr, in_ndims_ptr, num_ins):
    """One sample: inputs (image HWC uint8, p float32[13]), output image HWC float32, normalised."""
    outs = numba.carray(colour.void_ptr(out_ptr), 1, dtype=np.int64)
    ins = numba.carray(colour.void_ptr(in_ptr), 2, dtype=np.int64)
    shapes = numba.carray(colour.void_ptr(in_shapes_ptr), 2, dtype=np.int64)  # per input: its shape's address
    shape = numba.carray(colour.void_ptr(shapes[0]), 3, dtype=np.int64)
    image = numba.carray(colour.void_ptr(ins[0]), (shape[0], shape[1], shape[2]), dtype=np.uint8)
    out = numba.carray(colour.void_ptr(outs[0]), (shape[0], shape[1], shape[2]), dtype=np.float32)
    colour.render(out, image, numba.carray(colour.void_ptr(ins[1]), colour.PARAM_LEN, dtype=np.float32))


def _setup(out_shapes_ptr, out_ndims_ptr, num_outs, in_shapes_ptr, in_ndims_ptr, num_ins, num_samples):
    """Every sample's output shape is its image's."""
    outs = numba.carray(colour.void_ptr(out_shapes_ptr), num_samples, dtype=np.int64)
    ins = numba.carray(colour.void_ptr(in_shapes_ptr), num_samples, dtype=np.int64)  # input 0's come first
    for i in range(num_samples):
        src = numba.carray(colour.void_ptr(ins[i]), 3, dtype=np.int64)
        dst = numba.carray(colour.void_ptr(outs[i]), 3, dtype=np.int64)
        for d in range(3):
            dst[d] = src[d]


_CPU_OPERATOR = []


def cpu_operator():
    """A new instance of the CPU operator (ops API), or None without DALI's
    Numba plugin. The C functions are compiled on the first call."""
    if not _CPU_OPERATOR:
        try:
            from nvidia.dali.plugin.numba import NumbaFunction
        except ImportError:
            NumbaFunction = None
        if not (hasattr(NumbaFunction, "_get_run_fn_cpu") and hasattr(NumbaFunction, "_get_setup_fn_cpu")):
            _CPU_OPERATOR.append(None)  # no plugin, or one whose internals changed: DALI's own operators
            return None
        u64, i32 = numba.types.uint64, numba.types.int32
        run = numba.cfunc(numba.types.void(u64, u64, u64, i32, u64, u64, u64, i32), nopython=True, cache=True)(_run)
        setup = numba.cfunc(numba.types.void(u64, u64, i32, u64, u64, i32, i32), nopython=True, cache=True)(_setup)

        class Precompiled(NumbaFunction):
            # DALI compiles run_fn / setup_fn here; ours arrive as addresses
            def _get_run_fn_cpu(self, run_fn, *args):
                return run_fn

            def _get_setup_fn_cpu(self, setup_fn):
                return setup_fn

        _CPU_OPERATOR.append((Precompiled, run.address, setup.address))
    if _CPU_OPERATOR[0] is None:
        return None
    cls, run, setup = _CPU_OPERATOR[0]
    return cls(run_fn=run, setup_fn=setup, out_types=[types.FLOAT], in_types=[types.UINT8, types.FLOAT],
               outs_ndim=[3], ins_ndim=[3, 1], batch_processing=False)

"""What every flag and config value may be: one table, checked before any work starts.

`RULES` holds one `Rule` per key of the resolved config (train.py's flags
and every key of configs/*.yaml). `check(cfg)` walks it and raises
`ConfigError` for the first value out of range, with one line naming the
flag, the value and what is allowed; train.py prints it and exits 2. A key
the method does not have is skipped. A new flag or yaml key gets its line
here; tests/test_config_rules.py feeds every rule the value `bad` and
checks that each method's own defaults pass.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


class ConfigError(ValueError):
    """A value out of its rule's range: one line, exit code 2."""


@dataclass(frozen=True)
class Rule:
    key: str                    # the config key; its flag is --key-with-dashes
    allowed: str                # what the user is told is allowed
    ok: Callable[[Any], bool]   # True when a value is allowed
    bad: Any                    # a value the rule refuses (the table's test feeds it)
    problem: str = "out of range"  # what is wrong with a refused value, in a few words

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def count(key: str, low: int = 1) -> Rule:
    """An integer >= low."""
    return Rule(key, f"an integer >= {low}", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low,
                low - 1)


def number(key: str, low: float = 0.0, high: float = math.inf, low_open: bool = False,
           high_open: bool = False) -> Rule:
    """A finite number in the interval [low, high] (either end open)."""
    def ok(v):
        return (_number(v) and (v > low if low_open else v >= low)
                and (v < high if high_open or high == math.inf else v <= high))
    if high == math.inf:
        allowed = f"a number {'>' if low_open else '>='} {low:g}"
    else:
        allowed = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return Rule(key, allowed, ok, low - 1 if not low_open else low)


def fraction_pair(key: str) -> Rule:
    """Two numbers lo <= hi in (0, 1] (a scale range)."""
    def ok(v):
        return (isinstance(v, (list, tuple)) and len(v) == 2 and all(_number(x) for x in v)
                and 0 < v[0] <= v[1] <= 1)
    return Rule(key, "two numbers lo hi with 0 < lo <= hi <= 1", ok, [0.6, 0.1])


def counts(key: str, low: int = 1) -> Rule:
    """One or more integers >= low."""
    def ok(v):
        return (isinstance(v, (list, tuple)) and len(v) >= 1
                and all(isinstance(x, int) and not isinstance(x, bool) and x >= low for x in v))
    return Rule(key, f"one or more integers >= {low}", ok, [low - 1])


def one_of(key: str, choices) -> Rule:
    choices = sorted(choices)
    return Rule(key, "one of " + ", ".join(choices), lambda v: v in choices, "nope", "not a choice")


def _square(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1 and math.isqrt(v) ** 2 == v


def _data_path(v) -> bool:
    """A brace pattern of shards passes here; opening it names the first missing shard."""
    return (v is None or v in ("sample", "fashion-mnist") or os.path.exists(os.path.expanduser(str(v)))
            or re.search(r"\{[^{}]*\}[^{}]*\.tar$", str(v)) is not None)


def _run_dir(v) -> bool:
    """Absent or a directory, below a directory (so that it can be made)."""
    if v is None:
        return True
    p = Path(v).expanduser().absolute()
    while not p.exists():
        p = p.parent
    return p.is_dir() and os.access(p, os.W_OK)


def _export_path(v) -> bool:
    return v is None or (Path(v).expanduser().absolute().parent.is_dir() and not Path(v).expanduser().is_dir())


def _device(v) -> bool:
    return v is None or re.fullmatch(r"cpu|cuda(:\d+)?", str(v)) is not None


def _arches():
    from model.backbones import BACKBONES
    return BACKBONES


RULES = [
    # ---- what to train on, where, with what (train.py's own flags)
    Rule("data", "an existing directory, .txt file list or .tar shard, a pattern of shards such as "
         "'train-{000..099}.tar', 'sample' or 'fashion-mnist'", _data_path,
         "/nonexistent/viewforge-data", "not found"),
    Rule("run_dir", "a directory that exists or can be made (not below a file)", _run_dir, "/dev/null/run",
         "not writable"),
    Rule("export", "a file path in an existing directory", _export_path, "/nonexistent/viewforge/backbone.pth",
         "not writable"),
    Rule("device", "cpu, cuda or cuda:N", _device, "tpu", "unknown device"),
    count("workers", 0),
    count("seed", 0),
    count("knn_every", 0),
    count("knn_k", 1),
    number("knn_t", 0, low_open=True),
    count("log_every", 1),
    count("ckpt_every", 0),
    count("keep_every", 0),
    count("max_steps", 0),
    count("stop_after", 0),
    count("linear_epochs", 1),
    # ---- the schedule and optimiser (configs/<method>.yaml)
    count("epochs", 1),
    count("batch_size", 1),
    number("lr", 0, low_open=True),
    number("weight_decay", 0),
    number("warmup_epochs", 0),
    number("momentum", 0, 1, high_open=True),
    number("trust_coefficient", 0, low_open=True),
    one_of("optimizer", ["sgd", "lars"]),
    # ---- the network
    Rule("arch", "a backbone name (model/backbones.py BACKBONES)", lambda v: v in _arches(), "resnet7",
         "unknown backbone"),
    count("proj_dim", 1),
    count("proj_hidden", 0),  # 0: the backbone's width (MoCo's dim_mlp)
    count("bn_splits", 1),
    count("pred_hidden", 1),
    count("local_hidden", 1),
    count("roi_size", 1),
    one_of("base", ["mocov2", "byol"]),
    one_of("local_reduction", ["pairs", "added"]),
    # ---- the losses
    number("temperature", 0, low_open=True),
    count("queue_size", 0),
    number("ema", 0, 1),
    number("byol_ema", 0, 1),
    number("global_weight", 0),
    number("local_weight", 0),
    number("mix_weight", 0),
    number("mix_alpha", 0, low_open=True),
    count("knn", 1),
    count("num_clusters", 1),
    count("kmeans_iters", 1),
    number("neighbour_memory_gb", 0, low_open=True),
    # ---- the views
    count("image_size", 8),
    number("crop_min_scale", 0, 1, low_open=True),
    count("local_crops", 0),
    count("local_size", 1),
    fraction_pair("local_scale"),
    Rule("mosaic_crops", "a square integer (1, 4, 9, 16, ...)", _square, 3, "not a square"),
    fraction_pair("mosaic_scale"),
    count("mosaic_jitter", 0),
    count("boxes_per_image", 1),
    count("box_min_size", 1),
    number("box_max_iou", 0, 1),
    count("box_tries", 1),
    counts("multires_sizes", 1),
]
RULE_OF = {rule.key: rule for rule in RULES}
assert len(RULE_OF) == len(RULES), "one rule per key"


def shown(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(shown(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) < 1e15 else repr(value)
    return str(value)


def check(cfg) -> None:
    """Raise ConfigError naming the first value of `cfg` (a Namespace or dict) that its rule refuses."""
    values = cfg if isinstance(cfg, dict) else vars(cfg)
    for rule in RULES:
        if rule.key in values and not rule.ok(values[rule.key]):
            raise ConfigError(f"{rule.flag} {shown(values[rule.key])}: {rule.problem}; allowed: {rule.allowed}")

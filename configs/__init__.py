"""Per-method defaults (the yaml files beside this one), the small-image
profile (small.yaml), the command line that overrides them, and the allowed
range of every value (rules.py).

    cfg, explicit = resolve_config(["--method", "byol", "--lr", "0.5"])   # yaml < command line
    apply_small_profile(cfg, explicit, median_side=28)                      # < small.yaml for <= 64 px images
"""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

CONFIGS = Path(__file__).resolve().parent


def get_args_parser(method_defaults: dict | None = None) -> argparse.ArgumentParser:
    from model.methods import METHODS
    from model.precision import AMP_CHOICES
    import pipelines
    p = argparse.ArgumentParser(description="Self-supervised pre-training (viewforge)", add_help=True)
    default_pipeline = "dali" if "dali" in pipelines.PIPELINES else "torchvision"
    p.add_argument("--method", default="mocov2", choices=sorted(METHODS), help="pre-training method")
    p.add_argument("--pipeline", default=default_pipeline, choices=sorted(pipelines.PIPELINES),
                   help="view pipeline (backends appear when their package is installed)")
    p.add_argument("--data", default=None, help="ImageFolder dir, file list .txt, tar shards ('train-{000000..000099}.tar', "
                   "a .txt of .tar paths, a folder of .tar; python -m pipelines.data shards writes them), "
                   "'fashion-mnist'; default: built-in sample")
    p.add_argument("--recheck-data", action="store_true",
                   help="stat every file of a --data folder, not only its directories, and re-read changed headers: "
                        "notices files rewritten in place under the same name")
    p.add_argument("--run-dir", default=None, help="default: runs/<method>-<data>")
    p.add_argument("--workers", type=int, default=2, help="pipeline worker threads/processes per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                   help="autocast dtype (fp16 uses a GradScaler); auto: bf16 where the GPU or CPU computes it "
                        "natively, fp16 on older GPUs, else fp32 (model/precision.py)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across ranks (CUDA devices only)")
    p.add_argument("--cpu-graph", action="store_true", help="DALI: run the graph on the CPU even with a GPU")
    p.add_argument("--knn-every", type=int, default=1, help="kNN monitor every N epochs (0: never)")
    p.add_argument("--knn-k", type=int, default=200)
    p.add_argument("--knn-t", type=float, default=0.1)
    p.add_argument("--log-every", type=int, default=10, help="steps between JSON log lines")
    p.add_argument("--ckpt-every", type=int, default=0, help="also checkpoint every N steps (0: at epoch ends)")
    p.add_argument("--keep-every", type=int, default=0,
                   help="also keep every N-th step's checkpoint as checkpoint-step<N>.pth (learning curves)")
    p.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard in the run dir")
    p.add_argument("--log-samples", action="store_true",
                   help="every rank logs its dataset indices of every step to samples-rank<r>.jsonl")
    p.add_argument("--max-steps", type=int, default=0, help="train N steps in all (schedules span them), even mid-epoch")
    p.add_argument("--stop-after", type=int, default=0, help="stop (as if killed) after N steps of this process")
    p.add_argument("--eval", choices=["linear"], default=None, help="evaluate the run's backbone instead of training")
    p.add_argument("--linear-epochs", type=int, default=100)
    p.add_argument("--export", default=None, metavar="PATH", help="write the run's backbone as a torchvision state_dict")
    p.add_argument("--data-changed", choices=["refuse", "ok"], default="refuse",
                   help="resuming over a dataset whose files changed since the checkpoint: refuse, or go on (ok)")
    for key, value in (method_defaults or {}).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            p.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
        elif isinstance(value, (list, tuple)):
            p.add_argument(flag, dest=key, type=type(value[0]) if value else float, nargs="+", default=argparse.SUPPRESS)
        else:
            p.add_argument(flag, dest=key, type=type(value) if value is not None else str, default=argparse.SUPPRESS)
    return p


def load_yaml(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f) or {}


def resolve_config(argv: list[str]) -> tuple[argparse.Namespace, dict]:
    """Method yaml < configs/small.yaml (small images) < command line."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default="mocov2")
    known, _ = pre.parse_known_args(argv)
    path = CONFIGS / f"{known.method}.yaml"
    method_defaults = load_yaml(path) if path.exists() else {}
    args = get_args_parser(method_defaults).parse_args(argv)
    explicit = {k: v for k, v in vars(args).items() if k in method_defaults}
    cfg = dict(method_defaults)
    cfg.update(vars(args))
    return argparse.Namespace(**cfg), explicit


def apply_small_profile(cfg: argparse.Namespace, explicit: dict, median_side: float, device_type: str = "cuda") -> list[str]:
    """Images of at most 64 px (the sample, Fashion-MNIST) get configs/small.yaml
    for keys the method has and the command line did not set; on the CPU,
    configs/small_cpu.yaml after it (its `all` section, then the section of
    the method's family). A mapping there replaces the method's value by its
    entry (arch: resnet50 -> resnet18, rf_resnet50 -> rf_resnet18) and leaves
    other values alone. Returns the 'key=value' changes."""
    if median_side > 64:
        return []
    layers = [load_yaml(CONFIGS / "small.yaml")]
    if device_type == "cpu":
        cpu = load_yaml(CONFIGS / "small_cpu.yaml")
        family = next((name for name, methods in cpu["families"].items() if cfg.method in methods), None)
        layers += [cpu.get("all") or {}, cpu.get(family) or {}]
    changed = {}
    for settings in layers:  # in order: a later layer's mapping sees the earlier layer's value
        for key, value in settings.items():
            if isinstance(value, dict):
                value = value.get(getattr(cfg, key, None), getattr(cfg, key, None))
            if hasattr(cfg, key) and key not in explicit and getattr(cfg, key) != value:
                setattr(cfg, key, value)
                changed[key] = value
    return [f"{key}={value}" for key, value in changed.items()]

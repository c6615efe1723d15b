"""rules.RULES: every rule refuses its bad value with one line and exit 2,
every method's own defaults pass, and the five inputs of issue 15 are caught."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from configs import apply_small_profile, resolve_config, rules
import train as train_module

ROOT = Path(__file__).resolve().parents[1]
METHOD_KEYS = {m.stem: set(yaml.safe_load(m.read_text())) for m in (ROOT / "configs").glob("*.yaml")
               if m.stem not in ("small", "small_cpu")}  # profiles, not methods


def method_with(key: str) -> str:
    """A method whose config has `key` (mocov2 for train.py's own flags)."""
    if key in METHOD_KEYS["mocov2"] or key not in set().union(*METHOD_KEYS.values()):
        return "mocov2"
    return sorted(m for m, keys in METHOD_KEYS.items() if key in keys)[0]


def as_argv(value) -> list:
    values = value if isinstance(value, (list, tuple)) else [value]
    return [str(v) for v in values]


def test_every_config_key_and_flag_has_a_rule():
    cfg, _ = resolve_config(["--method", "mocov2"])
    flags = set(vars(cfg)) - set(METHOD_KEYS["mocov2"])
    # choices and on/off switches are settled by argparse itself
    settled = {"method", "pipeline", "amp", "eval", "compile", "sync_bn", "cpu_graph", "tensorboard", "data_changed",
               "log_samples", "recheck_data"}
    bools = {k for keys in METHOD_KEYS.values() for k in keys
             if isinstance(yaml.safe_load((ROOT / "configs" / f"{method_with(k)}.yaml").read_text())[k], bool)}
    missing = (flags | set().union(*METHOD_KEYS.values())) - settled - bools - set(rules.RULE_OF)
    assert not missing, f"no rule for {sorted(missing)}"


@pytest.mark.parametrize("method", sorted(METHOD_KEYS))
def test_every_methods_defaults_pass(method):
    cfg, explicit = resolve_config(["--method", method])
    rules.check(cfg)
    apply_small_profile(cfg, explicit, median_side=28)
    rules.check(cfg)


@pytest.mark.parametrize("rule", rules.RULES, ids=lambda r: r.key)
def test_every_rule_refuses_its_bad_value_with_one_line_and_exit_2(rule, tmp_path, capsys):
    assert not rule.ok(rule.bad)
    argv = ["--method", method_with(rule.key), "--run-dir", str(tmp_path / "run"), rule.flag, *as_argv(rule.bad)]
    if rule.key == "run_dir":
        argv = argv[:2] + argv[4:]
    rc = train_module.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err == f"error: {rule.flag} {rules.shown(rule.bad)}: {rule.problem}; allowed: {rule.allowed}"
    assert not (tmp_path / "run").exists(), "nothing may be written before the values are checked"


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_numbers_are_refused(value):
    with pytest.raises(rules.ConfigError, match="--lr"):
        rules.check({"lr": value})
    with pytest.raises(rules.ConfigError, match="--temperature"):
        rules.check({"temperature": value})


@pytest.mark.parametrize("args, allowed", [
    (["--batch-size", "0"], "--batch-size 0: out of range; allowed: an integer >= 1"),
    (["--epochs", "-1"], "--epochs -1: out of range; allowed: an integer >= 1"),
    (["--image-size", "0"], "--image-size 0: out of range; allowed: an integer >= 8"),
    (["--lr", "-1"], "--lr -1: out of range; allowed: a number > 0"),
    (["--max-steps", "-5"], "--max-steps -5: out of range; allowed: an integer >= 0"),
])
def test_the_five_inputs_of_issue_15_exit_2_with_one_line(args, allowed, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--run-dir", str(tmp_path / "r")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == f"error: {allowed}"
    assert proc.stdout == ""

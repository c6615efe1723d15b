"""Behaviour a refactor must keep, bit for bit: every pipeline's Views and
every method's first 8 losses against the records committed under
tests/data/golden/ (made by tests/golden.py; see its docstring for how the
numerics are made independent of the CPU). A change that means to alter
them rewrites the record with `python -m tests.golden KIND --write` and says
why in its commit."""
import pytest

from tests import golden


def _differences(committed: dict, now: dict, path: str = "") -> list[str]:
    if isinstance(committed, dict) and isinstance(now, dict):
        out = []
        for key in sorted(set(committed) | set(now)):
            if key not in now:
                out.append(f"{path}{key}: missing now")
            elif key not in committed:
                out.append(f"{path}{key}: not in the record")
            else:
                out += _differences(committed[key], now[key], f"{path}{key}.")
        return out
    return [] if committed == now else [f"{path.rstrip('.')}: recorded {committed!r}, now {now!r}"]


@pytest.mark.parametrize("kind", ["views", "losses"])
def test_matches_the_committed_record(kind):
    now = golden.record(kind)
    record = golden.committed(kind)
    if kind == "views":  # a pipeline whose package is not installed here is not compared
        record = {name: steps for name, steps in record.items() if name in now}
    diffs = _differences(record, now)
    assert not diffs, f"{len(diffs)} differences from tests/data/golden/{kind}.json:\n" + "\n".join(diffs[:40])


def test_differences_name_what_changed():
    record = {"a": {"0": {"crops": "x"}}, "b": [1.0, 2.0]}
    assert _differences(record, record) == []
    assert _differences(record, {"a": {"0": {"crops": "y"}}, "b": [1.0, 2.0]}) == \
        ["a.0.crops: recorded 'x', now 'y'"]
    assert _differences(record, {"a": {}, "c": 1}) == ["a.0: missing now", "b: missing now", "c: not in the record"]

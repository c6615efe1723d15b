"""checkpoints.py: two generations kept, fall back past a bad file, refuse when
none is usable, a full disk leaves the previous checkpoints readable, signals
only set a flag."""
import errno
import json
import os
import signal

import pytest
import torch

from model import checkpoints


def state(step: int, method: str = "mocov2") -> dict:
    return {"model": {"w": torch.full((4,), float(step))}, "optimizer": {}, "scaler": {}, "loader": {"step": step},
            "step": step, "epoch": 0, "config": {"method": method}}


def log_steps(run_dir, last: int):
    with open(run_dir / "log.jsonl", "w") as f:
        for s in range(1, last + 1):
            f.write(json.dumps({"step": s, "loss": 1.0}) + "\n")


def test_save_keeps_the_previous_checkpoint_and_no_temporaries(tmp_path):
    checkpoints.save(tmp_path, state(1))
    checkpoints.save(tmp_path, state(2))
    checkpoints.save(tmp_path, state(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pth", "checkpoint.pth"]
    assert checkpoints.read(tmp_path / "checkpoint.pth")[0]["step"] == 3
    assert checkpoints.read(tmp_path / "checkpoint.prev.pth")[0]["step"] == 2
    loaded, path = checkpoints.load(tmp_path, "mocov2")
    assert path.name == "checkpoint.pth" and loaded["format"] == checkpoints.FORMAT
    assert torch.equal(loaded["model"]["w"], torch.full((4,), 3.0))


def test_an_empty_run_dir_has_no_checkpoint(tmp_path):
    assert checkpoints.load(tmp_path, "mocov2") == (None, None)


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage(path):
    path.write_bytes(os.urandom(5000))


def empty(path):
    path.write_bytes(b"")


def other_method(path):
    torch.save({**state(9, method="byol"), "format": checkpoints.FORMAT}, path)


def other_format(path):
    torch.save({**state(9), "format": checkpoints.FORMAT + 1}, path)


def not_ours(path):
    torch.save({"weights": torch.zeros(3)}, path)


@pytest.mark.parametrize("damage, reason", [
    (truncate, "unreadable, truncated or damaged"), (garbage, "unreadable, truncated or damaged"),
    (empty, "empty file"), (other_method, "a byol checkpoint; this run trains mocov2"),
    (other_format, f"checkpoint format {checkpoints.FORMAT + 1}"), (not_ours, "not a viewforge checkpoint")])
def test_a_bad_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, reason):
    checkpoints.save(tmp_path, state(4))
    checkpoints.save(tmp_path, state(6))
    log_steps(tmp_path, 7)  # the lost run had trained to step 7
    damage(tmp_path / "checkpoint.pth")
    warnings = []
    loaded, path = checkpoints.load(tmp_path, "mocov2", warn=warnings.append)
    assert path.name == "checkpoint.prev.pth" and loaded["step"] == 4
    assert len(warnings) == 2
    assert warnings[0].startswith(f"{tmp_path / 'checkpoint.pth'}: ") and reason in warnings[0]
    assert warnings[1] == (f"falling back to {tmp_path / 'checkpoint.prev.pth'} (step 4); "
                           "3 steps (5 to 7) will be trained again")


def test_no_usable_checkpoint_is_an_error_never_a_fresh_start(tmp_path):
    checkpoints.save(tmp_path, state(4))
    checkpoints.save(tmp_path, state(6))
    truncate(tmp_path / "checkpoint.pth")
    garbage(tmp_path / "checkpoint.prev.pth")
    with pytest.raises(checkpoints.CheckpointError) as e:
        checkpoints.load(tmp_path, "mocov2", warn=lambda m: None)
    message = str(e.value)
    assert f"no usable checkpoint in {tmp_path}" in message and "\n" not in message
    assert "checkpoint.pth: unreadable" in message and "checkpoint.prev.pth: unreadable" in message


def test_a_kill_between_the_two_renames_leaves_the_previous_one(tmp_path):
    checkpoints.save(tmp_path, state(4))
    checkpoints.save(tmp_path, state(6))
    (tmp_path / "checkpoint.pth").unlink()  # as if killed after moving it to .prev and before the new rename
    loaded, path = checkpoints.load(tmp_path, "mocov2", warn=pytest.fail)
    assert path.name == "checkpoint.prev.pth" and loaded["step"] == 4


class DiskFull:
    """A disk that fills up: writes beyond `room` bytes fail with ENOSPC, as a
    real full file system reports them from write() or fsync()."""

    def __init__(self, monkeypatch, at: str):
        self.at = at
        real_fdopen, real_fsync = os.fdopen, os.fsync
        full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        class Writer:
            def __init__(self, f):
                self.f = f

            def write(self, data):
                if at == "write":
                    self.f.write(bytes(data)[: len(data) // 3])  # part lands, then the disk is full
                    raise full
                return self.f.write(data)

            def __getattr__(self, name):
                return getattr(self.f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

        def fsync(fd):
            if at == "fsync":
                raise full
            return real_fsync(fd)

        monkeypatch.setattr(checkpoints.os, "fdopen", lambda *a, **k: Writer(real_fdopen(*a, **k)))
        monkeypatch.setattr(checkpoints.os, "fsync", fsync)


@pytest.mark.parametrize("at", ["write", "fsync"])
def test_a_full_disk_leaves_the_previous_checkpoints_readable(tmp_path, monkeypatch, at):
    checkpoints.save(tmp_path, state(4))
    checkpoints.save(tmp_path, state(6))
    with monkeypatch.context() as m:
        DiskFull(m, at)
        with pytest.raises(checkpoints.CheckpointError) as e:
            checkpoints.save(tmp_path, state(8))
    message = str(e.value)
    assert message.startswith(f"could not write a checkpoint in {tmp_path}: No space left on device")
    assert "checkpoint.pth and checkpoint.prev.pth there are intact" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pth", "checkpoint.pth"]
    assert checkpoints.read(tmp_path / "checkpoint.pth", "mocov2")[0]["step"] == 6
    assert checkpoints.read(tmp_path / "checkpoint.prev.pth", "mocov2")[0]["step"] == 4
    checkpoints.save(tmp_path, state(8))  # room again: the next save works
    assert checkpoints.load(tmp_path, "mocov2")[0]["step"] == 8


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_in_training_a_signal_sets_a_flag_and_a_second_one_stops(signum):
    """Inside deferred() (the training loop) the first signal only sets
    `received`; a second one, or a signal inside abandon() (the kNN
    evaluation), or any signal outside (the index, an export) raises Stopped."""
    before = signal.getsignal(signum)
    name = signal.Signals(signum).name
    with checkpoints.StopSignals() as stop:
        with stop.deferred():
            os.kill(os.getpid(), signum)
            assert stop.received == name
            with pytest.raises(checkpoints.Stopped, match=name):
                with stop.abandon():  # a signal already received: the evaluation does not start
                    pass
            with pytest.raises(checkpoints.Stopped, match=name):
                os.kill(os.getpid(), signum)
    assert signal.getsignal(signum) is before and not checkpoints.StopSignals.active
    with checkpoints.StopSignals() as stop:
        with pytest.raises(checkpoints.Stopped, match=name):
            os.kill(os.getpid(), signum)  # no step to finish
        stop.received = None
        with stop.deferred(), stop.abandon():
            with pytest.raises(checkpoints.Stopped, match=name):
                os.kill(os.getpid(), signum)
    assert signal.getsignal(signum) is before

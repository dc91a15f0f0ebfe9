"""Checkpoint files: atomic writes, weights_only loads, clear errors, exact RNG round trips."""
import os
import random

import numpy as np
import pytest
import torch

from aigc_fast.training import checkpoint
from aigc_fast.training.checkpoint import (checkpoint_bytes, load_checkpoint, load_state_checked,
                                           rng_states, set_rng_states, write_bytes_atomic)
from aigc_fast.training.cli import UsageError
from aigc_fast.models import Generator


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "f.bin"
    write_bytes_atomic(path, b"old contents")
    write_bytes_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["f.bin"]  # no temporary file left behind


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    write_bytes_atomic(path, b"good checkpoint")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_bytes_atomic(path, b"half a checkpo")
    assert path.read_bytes() == b"good checkpoint"
    assert os.listdir(tmp_path) == ["last.pt"]


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    write_bytes_atomic(path, checkpoint_bytes({"G": {"w": torch.ones(2)}, "config": {}}))
    before = path.read_bytes()

    def ctrl_c(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.os, "replace", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        write_bytes_atomic(path, checkpoint_bytes({"G": {"w": torch.zeros(2)}, "config": {}}))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.pt"]


def test_checkpoint_bytes_load_weights_only(tmp_path):
    state = {"G": {"w": torch.randn(3, 4)}, "config": {"nz": 5, "data": "shapes"}, "step": 7,
             "rng": rng_states()}
    write_bytes_atomic(tmp_path / "a.pt", checkpoint_bytes(state))
    loaded = torch.load(tmp_path / "a.pt", weights_only=True)
    assert torch.equal(loaded["G"]["w"], state["G"]["w"]) and loaded["step"] == 7
    assert load_checkpoint(tmp_path / "a.pt")["config"] == state["config"]


def test_rng_states_round_trip_exactly_through_a_file(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    write_bytes_atomic(tmp_path / "rng.pt", checkpoint_bytes({"rng": rng_states()}))
    expected = (torch.rand(5), np.random.standard_normal(5), [random.random() for _ in range(5)])
    set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    got = (torch.rand(5), np.random.standard_normal(5), [random.random() for _ in range(5)])
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1]) and got[2] == expected[2]


class _Pickled:  # not a tensor or plain value: weights_only refuses it
    pass


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    (b"", "cannot be read"),
    (b"PK\x03\x04garbage", "cannot be read"),
    ("foreign", "cannot be read"),
    ("no_keys", "lacks G, config"),
    ("truncated", "cannot be read"),
])
def test_load_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "ckpt.pt"
    if content == "foreign":
        torch.save({"G": _Pickled(), "config": {}}, path)
    elif content == "no_keys":
        torch.save({"weights": torch.ones(1)}, path)
    elif content == "truncated":
        torch.save({"G": {"w": torch.randn(1000)}, "config": {}}, path)
        path.write_bytes(path.read_bytes()[:-100])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(UsageError, match=message) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_state_dict_mismatch_is_one_clear_line():
    small, big = Generator(32, nz=10, ngf=4), Generator(32, nz=10, ngf=8)
    with pytest.raises(UsageError,
                       match=r"main\.0\.weight has shape \(10, 16, 4, 4\), but the flags "
                                         r"build \(10, 32, 4, 4\)"):
        load_state_checked(big, small.state_dict(), "checkpoint x.pt")
    with pytest.raises(UsageError, match="keys do not match"):
        load_state_checked(Generator(64, nz=10, ngf=4), small.state_dict(), "checkpoint x.pt")
    other = Generator(32, nz=10, ngf=4)
    load_state_checked(other, small.state_dict(), "checkpoint x.pt")
    assert all(torch.equal(a, b) for a,
               b in zip(other.state_dict().values(), small.state_dict().values()))

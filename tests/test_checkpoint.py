"""Checkpoint files: safetensors + JSON, atomic replacement, optimiser state, damage detection."""

from __future__ import annotations

import json

import pytest
import torch

from asd_engine.runs import checkpoint as ckpt
from asd_engine.errors import UserInputError


def test_round_trip_and_replacement(tmp_path):
    folder = tmp_path / "checkpoint"
    ckpt.save_checkpoint(folder, {"a": torch.arange(4.0)}, {"step": 1})
    ckpt.save_checkpoint(folder, {"a": torch.arange(5.0), "b": torch.ones(2, dtype=torch.uint8)}, {"step": 2})
    tensors, meta = ckpt.load_checkpoint(folder)
    assert meta["step"] == 2 and meta["format"] == ckpt.FORMAT
    assert torch.equal(tensors["a"], torch.arange(5.0)) and tensors["b"].dtype == torch.uint8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no temporary folders left behind
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in folder.iterdir())


def test_a_crash_between_the_renames_falls_back_to_the_previous_checkpoint(tmp_path):
    folder = tmp_path / "checkpoint"
    ckpt.save_checkpoint(folder, {"a": torch.zeros(1)}, {"step": 7})
    folder.rename(tmp_path / ".checkpoint.old")  # the state right after save_checkpoint's first rename
    _, meta = ckpt.load_checkpoint(folder)
    assert meta["step"] == 7


@pytest.mark.parametrize("damage", ["missing", "truncated", "foreign", "no_tensors"])
def test_damaged_checkpoints_are_refused(tmp_path, damage):
    folder = tmp_path / "checkpoint"
    if damage != "missing":
        ckpt.save_checkpoint(folder, {"a": torch.zeros(100)}, {"step": 1})
        tensors_file = folder / ckpt.TENSORS_FILE
        if damage == "truncated":
            tensors_file.write_bytes(tensors_file.read_bytes()[:50])
        elif damage == "foreign":
            (folder / ckpt.META_FILE).write_text(json.dumps({"format": "something-else"}))
        elif damage == "no_tensors":
            tensors_file.unlink()
    with pytest.raises(UserInputError) as info:
        ckpt.load_checkpoint(folder)
    assert info.value.input_name == "resume"


@pytest.mark.parametrize("make", [lambda p: torch.optim.Adam(p, lr=0.1),
                                  lambda p: torch.optim.AdamW(p, lr=0.1, betas=(0.9, 0.99), eps=1e-15)])
def test_optimizer_state_round_trip_continues_identically(tmp_path, make):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5))
    opt = make([w])
    for _ in range(3):
        opt.zero_grad()
        (w.square().sum()).backward()
        opt.step()
    tensors, meta = ckpt.optimizer_state(opt, "opt")
    ckpt.save_checkpoint(tmp_path / "c", {**tensors, "w": w}, {"opt": meta})
    loaded, loaded_meta = ckpt.load_checkpoint(tmp_path / "c")
    w2 = torch.nn.Parameter(loaded["w"].clone())
    opt2 = make([w2])
    ckpt.load_optimizer_state(opt2, loaded, loaded_meta["opt"], "opt")
    for param, optimizer in ((w, opt), (w2, opt2)):
        optimizer.zero_grad()
        (param.square().sum()).backward()
        optimizer.step()
    assert torch.equal(w, w2)

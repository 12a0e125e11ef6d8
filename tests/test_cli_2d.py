"""The ``distill-2d`` CLI contract: outputs, determinism, exact resume, interrupts, one-line errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from asd_engine.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> int:
    return main([str(a) for a in args])


def distill(model, out, *extra, steps=20, size=32, seed=0, method="asd") -> int:
    return run_cli("distill-2d", "--model", model, "--prompt", "a red cube", "--method", method, "--steps", steps,
                   "--size", size, "--seed", seed, "--out", out, *extra)


@pytest.mark.parametrize("method", ["asd", "vsd", "sds"])
def test_20_step_run_writes_every_output(pipeline_dir, tmp_path, method):
    out = tmp_path / "out"
    assert distill(pipeline_dir, out, method=method) == 0
    with Image.open(out / "final.png") as img:
        assert img.size == (32, 32) and img.mode == "RGB"
    assert len(list((out / "previews").glob("step_*.png"))) == 9  # every 2 steps, the final one is final.png
    assert (out / "checkpoint" / "state.safetensors").is_file() and (out / "checkpoint" / "checkpoint.json").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert all(math.isfinite(r["generator_loss"]) for r in rows)
    assert all((r["phi_loss"] is None) == (method == "sds") for r in rows)
    assert all(r["phi_loss"] is None or math.isfinite(r["phi_loss"]) for r in rows)
    meta = json.loads((out / "checkpoint" / "checkpoint.json").read_text())
    assert meta["step"] == 20 and meta["config"]["distill"]["method"] == method
    assert meta["config"]["distill"]["gamma"] == (-0.75 if method == "asd" else 0.0)  # official recipe; VSD/SDS: 0


@pytest.mark.parametrize("extra", [["--phi", "ti", "--ti-tokens", "2"], ["--phi-noise", "shared"],
                                   ["--param", "pixel"], ["--weighting", "sigma_over_alpha", "--t-anneal-step", "3"]],
                         ids=["ti", "shared-noise", "pixel-param", "weighting+anneal"])
def test_options_run(tiny_eps_dir, tmp_path, extra):
    assert distill(tiny_eps_dir, tmp_path / "out", *extra, steps=5) == 0
    assert (tmp_path / "out" / "final.png").is_file()


def test_reference_images_enable_the_full_discriminator_loss(tiny_eps_dir, tmp_path):
    ref = tmp_path / "ref.png"
    Image.new("RGB", (48, 40), (200, 30, 30)).save(ref)
    assert distill(tiny_eps_dir, tmp_path / "out", "--reference", ref, "--eta", "0.5", steps=4) == 0
    meta = json.loads((tmp_path / "out" / "checkpoint" / "checkpoint.json").read_text())
    assert meta["config"]["references"] == [str(ref.resolve())]


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tiny_eps_dir, tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert distill(tiny_eps_dir, tmp_path / name, steps=6, seed=seed) == 0
    final = {n: (tmp_path / n / "final.png").read_bytes() for n in "abc"}
    state = {n: (tmp_path / n / "checkpoint" / "state.safetensors").read_bytes() for n in "abc"}
    assert final["a"] == final["b"] and state["a"] == state["b"]
    assert final["a"] != final["c"]


@pytest.mark.parametrize("model,extra", [("eps", []), ("v", ["--phi", "ti"]), ("eps", ["--param", "pixel"]),
                                         ("eps", ["--lora-targets", "all"]), ("eps", ["--jitter", "2"])],
                         ids=["eps-lora", "v-ti", "eps-pixel", "eps-lora-all-layers", "eps-jitter"])
def test_resume_from_step_3_to_6_equals_a_straight_6_step_run(tiny_eps_dir, tiny_v_dir, tmp_path, model, extra):
    # extending a finished run: exact only with a constant learning rate (a decaying one follows the new total's
    # cosine); stopping and resuming to the same total is exact with any schedule (test below)
    extra = [*extra, "--lr-decay-to", "1"]
    path = {"eps": tiny_eps_dir, "v": tiny_v_dir}[model]
    assert distill(path, tmp_path / "straight", *extra, steps=6) == 0
    assert distill(path, tmp_path / "first", *extra, steps=3) == 0
    assert run_cli("distill-2d", "--resume", tmp_path / "first" / "checkpoint", "--steps", 6,
                   "--out", tmp_path / "resumed") == 0
    assert (tmp_path / "resumed" / "final.png").read_bytes() == (tmp_path / "straight" / "final.png").read_bytes()
    straight = (tmp_path / "straight" / "checkpoint" / "state.safetensors").read_bytes()
    assert (tmp_path / "resumed" / "checkpoint" / "state.safetensors").read_bytes() == straight
    if "--jitter" in extra:  # the flag reached the run and its checkpoint (the shifts come from the saved generator)
        meta = json.loads((tmp_path / "resumed" / "checkpoint" / "checkpoint.json").read_text())
        assert meta["config"]["jitter"] == 2 and "jitter" not in meta["config"]["from_recipe"]


def test_a_stopped_run_resumed_to_its_total_equals_the_straight_run(tiny_eps_dir, tmp_path):
    """The image's learning rate falls along a cosine over the run's total (default lr_decay_to 0.05), a function of
    the step alone: a run stopped at step 3 of 6 and resumed ends bit-identical to one that never stopped."""
    import torch

    from asd_engine.runs.base import lr_factor
    from asd_engine.runs.distill_2d import Distill2D
    from asd_engine.runs.configs import Distill2DConfig

    assert lr_factor(0, 6, 0.05) == 1.0 and lr_factor(6, 6, 0.05) == pytest.approx(0.05)
    assert lr_factor(3, 6, 0.05) == pytest.approx(0.525) and lr_factor(4, 6, 1.0) == 1.0
    config = dict(prompt="a red cube", model=str(tiny_eps_dir), steps=6, size=32)
    straight = Distill2D(Distill2DConfig(**config))
    straight.run()
    assert straight.config.lr_decay_to == 0.05
    assert straight.optimizer.param_groups[0]["lr"] == pytest.approx(straight.base_lr * lr_factor(5, 6, 0.05))
    stopped = Distill2D(Distill2DConfig(**config))
    stopped.run(should_stop=lambda: stopped.step == 3)
    stopped.save_checkpoint(tmp_path / "checkpoint")
    resumed = Distill2D.from_checkpoint(tmp_path / "checkpoint")
    resumed.run()
    assert resumed.step == 6 and torch.equal(resumed.image.param, straight.image.param)
    for run in (straight, stopped, resumed):
        run.phi.remove()


def test_resume_refuses_contradicting_flags_and_a_smaller_total(tiny_eps_dir, tmp_path, capsys):
    assert distill(tiny_eps_dir, tmp_path / "first", steps=4) == 0
    ckpt = tmp_path / "first" / "checkpoint"
    assert run_cli("distill-2d", "--resume", ckpt, "--steps", 6, "--out", tmp_path / "r", "--prompt", "x") == 2
    assert "--prompt" in capsys.readouterr().err
    assert run_cli("distill-2d", "--resume", ckpt, "--steps", 3, "--out", tmp_path / "r") == 2
    assert "--steps" in capsys.readouterr().err
    # flags equal to the stored ones are fine
    assert run_cli("distill-2d", "--resume", ckpt, "--steps", 5, "--out", tmp_path / "r", "--method", "asd",
                   "--model", tiny_eps_dir) == 0


def _bad_inputs(tiny_eps_dir: Path, tmp_path: Path) -> dict[str, tuple[list, str]]:
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("x")
    common = ["--prompt", "a red cube", "--steps", "3", "--out", str(tmp_path / "o")]
    model = ["--model", str(tiny_eps_dir)]
    return {
        "missing model dir": (["--model", str(tmp_path / "nope"), *common], "--model"),
        "not a pipeline": (["--model", str(tmp_path), *common], "--model"),
        "steps zero": (model + ["--prompt", "x", "--steps", "0", "--out", str(tmp_path / "o")], "--steps"),
        "steps negative": (model + ["--prompt", "x", "--steps", "-4", "--out", str(tmp_path / "o")], "--steps"),
        "size not multiple of 8": (model + common + ["--size", "30"], "--size"),
        "unknown method": (model + common + ["--method", "gan"], "--method"),
        "unknown phi": (model + common + ["--phi", "gan"], "--phi"),
        "phi with sds": (model + common + ["--method", "sds", "--phi", "ti"], "--phi"),
        "gamma with vsd": (model + common + ["--method", "vsd", "--gamma", "-0.5"], "--gamma"),
        "lr decay beyond 1": (model + common + ["--lr-decay-to", "1.5"], "--lr-decay-to"),
        "unwritable out": (model + ["--prompt", "x", "--steps", "3", "--out", str(not_a_dir / "sub")], "--out"),
        "bad resume": (["--resume", str(tmp_path / "nope"), "--steps", "3", "--out", str(tmp_path / "o")], "--resume"),
    }


def test_each_bad_input_gives_one_line_naming_the_input(tiny_eps_dir, tmp_path, capsys):
    for name, (args, flag) in _bad_inputs(tiny_eps_dir, tmp_path).items():
        with pytest.raises(SystemExit) if flag in ("--method", "--phi") and "sds" not in name else _nullcontext():
            code = run_cli("distill-2d", *args)
            assert code == 2, name
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("error: ") and flag in err, (name, err)
        assert "Traceback" not in err


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _cli_process(*args, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "asd_engine", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.parametrize("case", ["missing model dir", "unknown method", "size not multiple of 8"])
def test_bad_input_in_a_real_process_exits_nonzero_without_traceback(tiny_eps_dir, tmp_path, case):
    args, flag = _bad_inputs(tiny_eps_dir, tmp_path)[case]
    proc = _cli_process("distill-2d", *args)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in err and err.strip().count("\n") == 0 and flag in err, err


def test_ctrl_c_keeps_a_resumable_checkpoint(tiny_eps_dir, tmp_path):
    out = tmp_path / "out"
    proc = _cli_process("distill-2d", "--model", tiny_eps_dir, "--prompt", "a red cube", "--steps", 2000,
                        "--size", 32, "--out", out, "--preview-every", 5, "--checkpoint-every", 1000)
    deadline = time.time() + 120
    while not list((out / "previews").glob("*.png")) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "resume with --resume" in err and "Traceback" not in err
    meta = json.loads((out / "checkpoint" / "checkpoint.json").read_text())
    assert 5 <= meta["step"] < 2000
    assert (out / "previews" / f"step_{meta['step']:06d}.png").is_file()
    assert not (out / "final.png").exists()
    total = meta["step"] + 2
    assert run_cli("distill-2d", "--resume", out / "checkpoint", "--steps", total, "--out", out) == 0
    assert json.loads((out / "checkpoint" / "checkpoint.json").read_text())["step"] == total


def test_help_and_tiny_pipeline_command(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        run_cli("distill-2d", "--help")
    assert info.value.code == 0 and "--phi-noise" in capsys.readouterr().out
    assert run_cli("tiny-pipeline", "--out", tmp_path / "tiny", "--prediction", "v_prediction") == 0
    assert run_cli("distill-2d", "--model", tmp_path / "tiny", "--prompt", "x", "--steps", 2, "--size", 32,
                   "--out", tmp_path / "o") == 0
    # too small for this model's UNet: a user error that names the smallest size that works
    assert run_cli("distill-2d", "--model", tmp_path / "tiny", "--prompt", "x", "--steps", 2, "--size", 16,
                   "--out", tmp_path / "o2") == 2
    assert "at least 32 px" in capsys.readouterr().err


@pytest.mark.parametrize("every, step, what", [(2, 4, "the generator's loss is nan"),
                                               (1, 3, "generator.image holds non-finite values")])
def test_a_diverged_run_stops_with_one_line_and_keeps_its_last_finite_checkpoint(
        tiny_eps_dir, tmp_path, capsys, monkeypatch, every, step, what):
    """θ turns NaN in step 3's update: the next loss is NaN (step 4), or step 3's checkpoint would hold it. Either way
    the run stops with one line and exit 3, and the checkpoint on disk is step 2's, finite and resumable."""
    from safetensors.torch import load_file

    from asd_engine.runs.distill_2d import Distill2D

    original = Distill2D.train_step

    def breaks_at_step_3(self):
        info = original(self)
        if self.step == 3:
            self.image.param.data.fill_(float("nan"))
        return info

    monkeypatch.setattr(Distill2D, "train_step", breaks_at_step_3)
    out = tmp_path / "out"
    assert distill(tiny_eps_dir, out, "--checkpoint-every", every, steps=6) == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: training diverged at step {step}: {what};") and "Traceback" not in err
    meta = json.loads((out / "checkpoint" / "checkpoint.json").read_text())
    assert meta["step"] == 2 and not (out / "final.png").exists()
    assert all(bool(t.isfinite().all()) for t in load_file(out / "checkpoint" / "state.safetensors").values()
               if t.is_floating_point())
    monkeypatch.setattr(Distill2D, "train_step", original)
    assert distill(tiny_eps_dir, out, "--resume", out / "checkpoint", steps=6) == 0

"""Issue 27 at the CLI's front door: nothing a user has is lost, every flag is checked before the long part, and an
interrupt at any moment is one line.

- ``--out``: a fresh run needs a new or empty folder; a resume continues in its checkpoint's own folder;
  ``--overwrite`` replaces an earlier run's outputs (and nothing else); a folder is locked while a run writes to it.
- ``metrics.jsonl`` is on disk at every checkpoint, and a resume after a crash has each step once.
- Export flags, step intervals and ``--device`` are refused before any model is loaded; Ctrl-C during start-up and
  a second Ctrl-C give one line and status 130; ``demo`` refuses prompts the toy prior does not know.

Runs use the embedded toy prior (32 px, ~0.3 s a step) or the tiny random pipelines, 1-6 steps.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from asd_engine.cli import main
from asd_engine.cli.common import LOCK_FILE

ROOT = Path(__file__).resolve().parents[1]
FAST_3D = ["--preset", "toy-cpu", "--views", "3", "--view-size", "32", "--mesh-resolution", "40"]


def run2d(out: Path, *extra, steps: int = 3) -> int:
    """distill-2d on the embedded toy prior (its own 32 px)."""
    return main(["distill-2d", "--prompt", "a red cube", "--steps", str(steps), "--out", str(out),
                 *map(str, extra)])


def one_line(err: str) -> str:
    """The single line a refused or interrupted command printed (progress bars aside): no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "step/s" not in line
             and "s/step" not in line and "?step" not in line]
    assert len(lines) == 1, err
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def metric_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model is the long part: a check that must come before it fails the test if it comes after."""
    import asd_engine.runs.plan as plan
    import asd_engine.runs.text_to_3d as text_to_3d

    def loaded(*args, **kwargs):
        raise AssertionError("a model or checkpoint was loaded before the flags were checked")

    monkeypatch.setattr(plan, "plan_run", loaded)
    monkeypatch.setattr(text_to_3d, "load_nerf", loaded)


# ---------------------------------------------------------------------------------------- data is never lost
def test_a_fresh_run_refuses_a_folder_of_user_files_and_touches_nothing(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"precious")
    (out / "final.png").write_bytes(b"my own final.png")
    before = snapshot(out)
    for extra in ([], ["--overwrite"]):
        assert run2d(out, *extra) == 2
        line = one_line(capsys.readouterr().err)
        assert line.startswith("error: --out: ") and "holds no earlier run" in line, line
        assert snapshot(out) == before and sorted(os.listdir(out)) == ["final.png", "holiday.jpg"]


def test_a_fresh_run_refuses_a_finished_run_and_names_the_three_ways_on(tmp_path, capsys):
    out = tmp_path / "run"
    assert run2d(out, steps=2) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert main(["distill-2d", "--prompt", "a blue sphere", "--steps", "2", "--out", str(out)]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"error: --out: '{out}' already holds an earlier distill-2d run;"), line
    assert f"--resume {out / 'checkpoint'}" in line and "--overwrite" in line and "new --out folder" in line
    assert snapshot(out) == before  # checkpoint, final.png, run.json, previews and metrics untouched


def test_overwrite_replaces_only_the_earlier_runs_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    assert run2d(out, "--preview-every", 1, steps=4) == 0
    (out / "notes.txt").write_text("mine")
    (out / "previews" / "favourite.png").write_bytes(b"mine too")
    assert run2d(out, "--overwrite", "--preview-every", 1, steps=2) == 0
    assert "replacing the earlier run's outputs" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine" and (out / "previews" / "favourite.png").read_bytes() == b"mine too"
    assert sorted(p.name for p in (out / "previews").iterdir()) == ["favourite.png", "step_000001.png"]
    assert metric_steps(out) == [1, 2]  # not the earlier run's 1-4 followed by these
    assert json.loads((out / "checkpoint" / "checkpoint.json").read_text())["step"] == 2
    assert not (out / LOCK_FILE).exists()


def test_a_resume_into_another_runs_folder_is_refused(tmp_path, capsys):
    assert run2d(tmp_path / "a", steps=2) == 0
    assert run2d(tmp_path / "b", steps=2) == 0
    before = snapshot(tmp_path / "b")
    capsys.readouterr()
    assert main(["distill-2d", "--resume", str(tmp_path / "a" / "checkpoint"), "--steps", "3",
                 "--out", str(tmp_path / "b")]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("error: --out: ") and f"--out {tmp_path / 'a'}" in line, line
    assert snapshot(tmp_path / "b") == before


def test_a_live_lock_refuses_a_second_run_with_one_line(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_FILE).write_text(f"{sleeper.pid} {socket.gethostname()}\n")
        assert run2d(out) == 2
        line = one_line(capsys.readouterr().err)
        assert line.startswith("error: --out: ") and f"in use by another run (process {sleeper.pid})" in line, line
        assert sorted(os.listdir(out)) == [LOCK_FILE]  # the other run's lock stays, nothing was written
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_folder_is_locked_while_a_run_writes_to_it(tmp_path, capsys, monkeypatch):
    """A second run started into the folder while the first one trains is refused; the first one finishes."""
    from asd_engine.runs.distill_2d import Distill2D

    out = tmp_path / "run"
    original, seen = Distill2D.train_step, {}

    def step_and_try_a_second_run(self):
        if self.step == 1 and not seen:
            seen["lock"] = (out / LOCK_FILE).read_text().split()[0]
            seen["second"] = run2d(out)
            seen["err"] = capsys.readouterr().err
        return original(self)

    monkeypatch.setattr(Distill2D, "train_step", step_and_try_a_second_run)
    assert run2d(out) == 0
    assert seen["lock"] == str(os.getpid()) and seen["second"] == 2
    assert "in use by another run" in seen["err"] and "Traceback" not in seen["err"]
    assert not (out / LOCK_FILE).exists() and metric_steps(out) == [1, 2, 3]


def test_a_stale_lock_is_taken_over_and_every_exit_removes_the_lock(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(f"{dead.pid} {socket.gethostname()}\n")
    assert run2d(out, steps=1) == 0
    assert not (out / LOCK_FILE).exists()
    # an error before anything is written leaves no folder (this command made it) and no lock
    assert main(["distill-2d", "--prompt", "x", "--steps", "1", "--gamma", "3", "--out", str(tmp_path / "n")]) == 2
    assert "--gamma" in capsys.readouterr().err and not (tmp_path / "n").exists()


# ---------------------------------------------------------------------------------------- demo
@pytest.fixture
def quick_export(monkeypatch):
    """The demo's export (36 views, a 128³ mesh) is not what these tests are about: write its files small."""
    from asd_engine.cli import train

    def export(nerf, preset, out, args):
        for name in ("mesh.glb", "mesh.obj", "turntable.webp"):
            (out / name).write_bytes(b"x")
        return "wrote stand-ins"

    monkeypatch.setattr(train, "export", export)


def test_repeating_demo_replaces_the_previous_demo_in_its_own_folder(tmp_path, monkeypatch, capsys, quick_export):
    monkeypatch.chdir(tmp_path)
    demo = tmp_path / "runs" / "demo"
    assert main(["demo", "--steps", "1"]) == 0
    (demo / "notes.txt").write_text("mine")
    assert main(["demo", "--steps", "2", "--prompt", "a green torus"]) == 0
    assert "replacing the earlier run's outputs" in capsys.readouterr().err
    run = json.loads((demo / "run.json").read_text())
    assert run["demo"] is True and run["config"]["prompt"] == "a green torus" and metric_steps(demo) == [1, 2]
    assert (demo / "notes.txt").read_text() == "mine"
    # a text-to-3d run in the demo's folder is not a demo: the demo does not replace it
    (demo / "run.json").write_text(json.dumps({**run, "command": "text-to-3d", "demo": False}))
    assert main(["demo", "--steps", "1"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("error: --out: ") and "give demo a new --out folder" in line, line
    # a demo from before run.json marked demos: a toy-cpu text-to-3d run on the embedded prior
    legacy = {key: value for key, value in run.items() if key != "demo"}
    (demo / "run.json").write_text(json.dumps({**legacy, "command": "text-to-3d"}))
    assert main(["demo", "--steps", "1"]) == 0


def test_demo_elsewhere_follows_the_folder_rule(tmp_path, capsys, quick_export):
    out = tmp_path / "mine"
    assert main(["demo", "--steps", "1", "--out", str(out)]) == 0
    assert main(["demo", "--steps", "1", "--out", str(out)]) == 2
    assert "--overwrite" in one_line(capsys.readouterr().err)
    assert main(["demo", "--steps", "1", "--out", str(out), "--overwrite"]) == 0
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "a.txt").write_text("x")
    assert main(["demo", "--steps", "1", "--out", str(tmp_path / "user")]) == 2
    assert "holds no earlier run" in capsys.readouterr().err


def test_demo_refuses_prompts_the_toy_prior_does_not_know(tmp_path, capsys, no_loading):
    assert main(["demo", "--prompt", "a purple elephant", "--out", str(tmp_path / "d")]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("error: --prompt: 'a purple elephant' is not one colour and one shape") and "cube" in line
    assert not (tmp_path / "d").exists()


# ---------------------------------------------------------------------------------------- metrics.jsonl
def test_metrics_are_on_disk_at_every_checkpoint(tmp_path, monkeypatch):
    """What a checkpoint says was done is in metrics.jsonl on the disk (flushed and fsynced), not in a buffer."""
    from asd_engine.runs.base import DistillationRun

    out, on_disk = tmp_path / "run", {}
    original = DistillationRun.save_checkpoint

    def save(self, directory):
        on_disk[self.step] = metric_steps(out)  # read through a new file handle: only what reached the file
        return original(self, directory)

    monkeypatch.setattr(DistillationRun, "save_checkpoint", save)
    assert run2d(out, "--checkpoint-every", 1, steps=3) == 0
    assert on_disk == {1: [1], 2: [1, 2], 3: [1, 2, 3]}


def test_a_resume_after_a_crash_has_each_step_once_and_matches_a_straight_run(tmp_path, monkeypatch):
    from asd_engine.runs.distill_2d import Distill2D

    assert run2d(tmp_path / "straight", steps=6) == 0
    original = Distill2D.train_step

    def crashes_in_step_4(self):
        if self.step == 3:
            raise RuntimeError("simulated crash")
        return original(self)

    out = tmp_path / "run"
    monkeypatch.setattr(Distill2D, "train_step", crashes_in_step_4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run2d(out, "--checkpoint-every", 2, "--preview-every", 1, steps=6)
    assert metric_steps(out) == [1, 2, 3] and not (out / LOCK_FILE).exists()
    assert json.loads((out / "checkpoint" / "checkpoint.json").read_text())["step"] == 2
    monkeypatch.setattr(Distill2D, "train_step", original)
    assert main(["distill-2d", "--resume", str(out / "checkpoint"), "--steps", "6", "--out", str(out)]) == 0
    assert metric_steps(out) == [1, 2, 3, 4, 5, 6]
    assert (out / "metrics.jsonl").read_text() == (tmp_path / "straight" / "metrics.jsonl").read_text()
    assert (out / "final.png").read_bytes() == (tmp_path / "straight" / "final.png").read_bytes()


def test_sigkill_leaves_the_metrics_of_its_checkpoint_and_a_lock_the_resume_takes_over(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "asd_engine", "distill-2d", "--prompt", "a red cube",
                             "--steps", "2000", "--checkpoint-every", "2", "--preview-every", "1000", "--out", str(out)],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoint" / "checkpoint.json").is_file() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    proc.kill()
    proc.wait()
    step = json.loads((out / "checkpoint" / "checkpoint.json").read_text())["step"]
    steps = metric_steps(out)
    assert step >= 2 and steps[:step] == list(range(1, step + 1))  # today's bug: an empty file
    assert (out / LOCK_FILE).is_file()
    assert main(["distill-2d", "--resume", str(out / "checkpoint"), "--steps", str(step + 2), "--out", str(out)]) == 0
    assert metric_steps(out) == list(range(1, step + 3)) and not (out / LOCK_FILE).exists()


# ---------------------------------------------------------------------------------------- flags before the long part
BAD_FLAGS = {
    "views 0": (["text-to-3d", "--views", "0"], "--views"),
    "views negative": (["text-to-3d", "--views", "-3"], "--views"),
    "view size 0": (["text-to-3d", "--view-size", "0"], "--view-size"),
    "view size 100000": (["text-to-3d", "--view-size", "100000"], "--view-size"),
    "mesh resolution 1": (["text-to-3d", "--mesh-resolution", "1"], "--mesh-resolution"),
    "mesh resolution 15": (["text-to-3d", "--mesh-resolution", "15"], "--mesh-resolution"),
    "mesh resolution 5000": (["text-to-3d", "--mesh-resolution", "5000"], "--mesh-resolution"),
    "mesh threshold nan": (["text-to-3d", "--mesh-threshold", "nan"], "--mesh-threshold"),
    "mesh threshold inf": (["text-to-3d", "--mesh-threshold", "inf"], "--mesh-threshold"),
    "mesh threshold 0": (["text-to-3d", "--mesh-threshold", "0"], "--mesh-threshold"),
    "mesh threshold negative": (["text-to-3d", "--mesh-threshold", "-1"], "--mesh-threshold"),
    "turntable beyond memory": (["text-to-3d", "--views", "3600", "--view-size", "4096"], "--view-size"),
    "checkpoint every -1": (["distill-2d", "--checkpoint-every", "-1"], "--checkpoint-every"),
    "checkpoint every 0": (["distill-2d", "--checkpoint-every", "0"], "--checkpoint-every"),
    "preview every 0": (["text-to-3d", "--preview-every", "0"], "--preview-every"),
    "preview every -1": (["distill-2d", "--preview-every", "-1"], "--preview-every"),
    "device foo": (["distill-2d", "--device", "foo"], "--device"),
    "device meta": (["distill-2d", "--device", "meta"], "--device"),
    "device cuda without cuda": (["distill-2d", "--device", "cuda"], "--device"),
    "device cuda:7 of one gpu": (["text-to-3d", "--device", "cuda:7"], "--device"),
    "render views 0": (["render", "--views", "0"], "--views"),
    "render device foo": (["render", "--device", "foo"], "--device"),
    "render threshold nan": (["render", "--mesh-threshold", "nan"], "--mesh-threshold"),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flags_are_one_line_before_anything_is_loaded(case, tmp_path, capsys, monkeypatch, no_loading):
    import torch

    from asd_engine.cli import train

    argv, flag = BAD_FLAGS[case]
    command, *extra = argv
    monkeypatch.setattr(torch.cuda, "is_available", lambda: case == "device cuda:7 of one gpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(train, "_physical_memory", lambda: 16 * 2 ** 30)
    out = tmp_path / "out"
    where = (["--checkpoint", str(tmp_path / "no-such-checkpoint")] if command == "render"
             else ["--prompt", "a red cube", "--steps", "2"])
    assert main([command, *where, "--out", str(out), *extra]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"error: {flag}: "), line
    assert not out.exists()


def test_the_memory_check_names_its_estimate(tmp_path, capsys, monkeypatch, no_loading):
    from asd_engine.cli import train

    monkeypatch.setattr(train, "_physical_memory", lambda: 16 * 2 ** 30)
    assert main(["text-to-3d", "--prompt", "x", "--mesh-resolution", "1024", "--out", str(tmp_path / "o")]) == 2
    line = one_line(capsys.readouterr().err)
    assert line == "error: --mesh-resolution: the export needs about 20 GiB of memory, this machine has 16 GiB; " \
                   "use a smaller --mesh-resolution", line


def test_an_unknown_background_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["text-to-3d", "--prompt", "x", "--background", "pink", "--out", str(tmp_path / "o")])
    assert info.value.code == 2 and "--background" in one_line(capsys.readouterr().err)


def test_check_device():
    import torch

    from asd_engine.devices import check_device
    from asd_engine.errors import UserInputError

    assert check_device("cpu") == torch.device("cpu") and check_device("auto") == check_device(None)
    with pytest.raises(UserInputError) as info:
        check_device("cuda:0:1")
    assert info.value.input_name == "device"


# ---------------------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_while_loading_the_model_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import asd_engine.runs.plan as plan

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(plan, "plan_run", interrupted)
    assert run2d(tmp_path / "new") == 130
    assert one_line(capsys.readouterr().err) == "interrupted before training started; nothing was written"
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    assert run2d(tmp_path / "empty") == 130
    assert os.listdir(tmp_path / "empty") == []  # its lock is gone too


def test_ctrl_c_while_render_loads_the_checkpoint_is_one_line(tmp_path, capsys, monkeypatch):
    import asd_engine.runs.text_to_3d as text_to_3d

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(text_to_3d, "load_nerf", interrupted)
    assert main(["render", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "r")]) == 130
    assert one_line(capsys.readouterr().err) == "interrupted; nothing was written"
    assert not (tmp_path / "r").exists()


def test_a_second_ctrl_c_aborts_with_one_line_and_the_last_checkpoint_resumes(tmp_path, capsys, monkeypatch):
    from asd_engine.runs.distill_2d import Distill2D

    original = Distill2D.train_step

    def ctrl_c_twice_in_step_3(self):
        if self.step == 2:
            signal.raise_signal(signal.SIGINT)  # the first asks to stop after this step ...
            signal.raise_signal(signal.SIGINT)  # ... the second aborts at once
        return original(self)

    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN where pytest was started in the background
    monkeypatch.setattr(Distill2D, "train_step", ctrl_c_twice_in_step_3)
    assert run2d(out, "--checkpoint-every", 1, steps=5) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"aborted during step 3/5; the checkpoint of step 2 stays; resume with "
                                            f"--resume {out / 'checkpoint'} --steps 5 --out {out}")
    assert signal.getsignal(signal.SIGINT) is before and not (out / LOCK_FILE).exists()  # the handler is given back
    monkeypatch.setattr(Distill2D, "train_step", original)
    assert main(["distill-2d", "--resume", str(out / "checkpoint"), "--steps", "5", "--out", str(out)]) == 0
    assert metric_steps(out) == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------------------------------- render
def test_render_needs_a_new_folder_or_overwrite_and_overwrite_keeps_the_run(tiny_v_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["text-to-3d", "--model", str(tiny_v_dir), "--prompt", "a red cube", "--steps", "1",
                 "--device", "cpu", "--out", str(out), *FAST_3D]) == 0
    kept = {name: (out / name).read_bytes() for name in ("run.json", "metrics.jsonl", "checkpoint/state.safetensors")}
    render = ["render", "--checkpoint", str(out / "checkpoint"), "--out", str(out), "--views", "2",
              "--view-size", "16", "--mesh-resolution", "32", "--device", "cpu"]
    assert main(render) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("error: --out: ") and "--overwrite" in line and "text-to-3d run" in line, line
    assert len(list((out / "views").glob("rgb_*.png"))) == 3
    assert main([*render, "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "views").glob("rgb_*.png")) == ["rgb_000.png", "rgb_001.png"]
    assert {name: (out / name).read_bytes() for name in kept} == kept
    assert json.loads((out / "render.json").read_text())["views"] == 2


def test_a_resume_notice_is_one_line(tmp_path, capsys):
    from asd_engine.runs import checkpoint

    if not hasattr(checkpoint, "ResumeNotice"):
        pytest.skip("this engine has no resume notices")
    out = tmp_path / "run"
    assert run2d(out, steps=2) == 0
    capsys.readouterr()
    assert main(["distill-2d", "--resume", str(out / "checkpoint"), "--steps", "3", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    notices = [line for line in err.splitlines() if line.startswith("notice: ")]
    assert len(notices) == 1 and "re-planned" in notices[0] and "ResumeNotice" not in err, err

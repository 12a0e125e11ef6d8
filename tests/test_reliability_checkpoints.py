"""Issue 27, "checkpoints are untrusted input" and "disk full during a save": a hand-damaged or mismatched
checkpoint gives one line naming the input (never a traceback), through the CLI and the library; a checkpoint with
non-finite tensors is refused; a failed save leaves the previous checkpoint and no temporary folder; a moved model
is recognised by its weights' fingerprint; a re-planned 2D learning-rate schedule is announced."""

from __future__ import annotations

import errno
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from asd_engine.cli import main
from asd_engine.errors import UserInputError
from asd_engine.prior.loading import load_prior
from asd_engine.runs import checkpoint as ckpt
from asd_engine.runs.configs import Distill2DConfig, preset_config
from asd_engine.runs.distill_2d import Distill2D
from asd_engine.runs.plan import plan_run, resume_plan
from asd_engine.runs.text_to_3d import TextTo3D, load_nerf


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def one_line(capsys, after_progress: bool = False) -> str:
    """What the user saw: exactly one line on stderr, an error, no traceback (``after_progress``: the last line,
    after a training run's progress bar)."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    if after_progress:
        err = err.splitlines()[-1]
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def ck2d(tiny_eps_dir, tmp_path_factory) -> Path:
    """A 1-step ASD checkpoint of a 2D run (latent, 32 px) on the tiny ε pipeline."""
    run = Distill2D(Distill2DConfig(prompt="a red cube", model=str(tiny_eps_dir), steps=1, size=32))
    run.run()
    folder = run.save_checkpoint(tmp_path_factory.mktemp("ck2d") / "checkpoint")
    run.phi.remove()
    return folder


@pytest.fixture(scope="module")
def ck3d(tiny_v_dir, tmp_path_factory) -> Path:
    """A 1-step SDS checkpoint of a toy-cpu text-to-3d run on the tiny pixel-space pipeline."""
    config = preset_config("toy-cpu", "a red cube", steps=1, model=str(tiny_v_dir), prior_resolution=32)
    config.distill.method = "sds"
    run = TextTo3D(config)
    run.run()
    return run.save_checkpoint(tmp_path_factory.mktemp("ck3d") / "checkpoint")


def copy_of(folder: Path, tmp_path: Path, name: str = "checkpoint") -> Path:
    return Path(shutil.copytree(folder, tmp_path / name))


def edit_meta(folder: Path, edit) -> Path:
    """Edit ``checkpoint.json`` in place with ``edit(meta)``; a list it returns replaces the whole file."""
    path = folder / ckpt.META_FILE
    meta = json.loads(path.read_text())
    result = edit(meta)
    path.write_text(json.dumps(result if isinstance(result, list) else meta))
    return folder


def edit_tensors(folder: Path, edit) -> Path:
    tensors = load_file(folder / ckpt.TENSORS_FILE)
    edit(tensors)
    save_file(tensors, folder / ckpt.TENSORS_FILE)
    return folder


# ------------------------------------------------------------------------------------ damaged checkpoint.json
META_DAMAGE = {  # name → (edit of the parsed checkpoint.json, words of the one line)
    "not an object": (lambda m: [1, 2, 3], "holds a JSON list, not an object"),
    "step is text": (lambda m: m.update(step="3"), "has step '3', not a whole number ≥ 0"),
    "step negative": (lambda m: m.update(step=-4), "has step -4, not a whole number ≥ 0"),
    "step is true": (lambda m: m.update(step=True), "has step True"),
    "config not a dict": (lambda m: m.update(config="size 32"), "has no settings object ('config')"),
    "kind missing": (lambda m: m.pop("kind"), "has kind None, not one of distill-2d, text-to-3d"),
    "kind unknown": (lambda m: m.update(kind="gan"), "has kind 'gan'"),
    "size is text": (lambda m: m["config"].update(size="32"), 'config.size = "32", which is not a whole number'),
    "nested settings not an object": (lambda m: m["config"].update(distill=5),
                                      "config.distill = 5, which is not a settings object"),
    "gamma is NaN": (lambda m: m["config"]["distill"].update(gamma=float("nan")),
                     "config.distill.gamma = NaN, which is not a finite number"),
    "unknown setting": (lambda m: m["config"].update(turbo=True), "settings this version does not know (config.turbo)"),
    "optimizer missing": (lambda m: m.pop("optimizer"), "has no valid 'optimizer'"),
    "losses damaged": (lambda m: m.update(losses={"loss": ["x"]}), "damaged loss history"),
    "fingerprints damaged": (lambda m: m.update(fingerprints=[1]), "damaged weight fingerprints"),
}


@pytest.mark.parametrize("case", list(META_DAMAGE))
def test_a_damaged_2d_checkpoint_json_is_one_line_through_the_cli(ck2d, tmp_path, capsys, case):
    edit, words = META_DAMAGE[case]
    folder = edit_meta(copy_of(ck2d, tmp_path), edit)
    assert run_cli("distill-2d", "--resume", folder, "--steps", 3, "--out", tmp_path / "out") == 2
    err = one_line(capsys)
    assert err.startswith("error: --resume: ") and words in err, err


@pytest.mark.parametrize("case", ["not an object", "step is text", "step negative", "kind missing",
                                  "config not a dict", "nested settings not an object"])
def test_a_damaged_3d_checkpoint_json_is_one_line_through_text_to_3d_and_render(ck3d, tmp_path, capsys, case):
    edit, words = META_DAMAGE[case]
    folder = edit_meta(copy_of(ck3d, tmp_path), edit)
    assert run_cli("text-to-3d", "--resume", folder, "--steps", 3, "--out", tmp_path / "out") == 2
    err = one_line(capsys)
    assert err.startswith("error: --resume: ") and words in err, err
    assert run_cli("render", "--checkpoint", folder, "--out", tmp_path / "render") == 2
    err = one_line(capsys)
    assert err.startswith("error: --checkpoint: ") and words in err, err


@pytest.mark.parametrize("case", ["not an object", "step is text", "kind missing", "size is text", "gamma is NaN"])
def test_a_damaged_checkpoint_json_is_a_user_error_through_the_library(ck2d, tmp_path, case):
    edit, words = META_DAMAGE[case]
    folder = edit_meta(copy_of(ck2d, tmp_path), edit)
    with pytest.raises(UserInputError) as info:
        plan_run("distill-2d", {"steps": 3}, resume=folder)
    assert info.value.input_name == "resume" and words in info.value.problem
    with pytest.raises(UserInputError) as info:
        Distill2D.from_checkpoint(folder, overrides={"steps": 3})
    assert info.value.input_name == "resume"


def test_invalid_json_and_a_list_are_one_line(ck2d, tmp_path, capsys):
    folder = copy_of(ck2d, tmp_path)
    (folder / ckpt.META_FILE).write_text('{"step": 3,')
    assert run_cli("distill-2d", "--resume", folder, "--steps", 3, "--out", tmp_path / "out") == 2
    assert "is damaged (JSONDecodeError" in one_line(capsys)


# ------------------------------------------------------------------- tensors that do not fit their settings
def test_size_swapped_in_the_json_is_refused_before_training(ck2d, tmp_path, capsys):
    folder = edit_meta(copy_of(ck2d, tmp_path), lambda m: m["config"].update(size=64))
    assert run_cli("distill-2d", "--resume", folder, "--steps", 3, "--out", tmp_path / "out") == 2
    err = one_line(capsys)
    assert "state.safetensors' does not fit its checkpoint.json: its image is (1, 4, 4, 4), the settings make " \
           "(1, 4, 8, 8)" in err, err
    assert not (tmp_path / "out" / "final.png").exists()


def test_model_swapped_in_the_json_is_refused_by_fingerprint_or_by_shape(ck2d, tiny_v_dir, tmp_path, capsys):
    swapped = edit_meta(copy_of(ck2d, tmp_path), lambda m: m["config"].update(model=str(tiny_v_dir)))
    assert run_cli("distill-2d", "--resume", swapped, "--steps", 3, "--out", tmp_path / "out") == 2
    err = one_line(capsys)
    assert err.startswith("error: --model: the weights at ") and "differ from the ones the checkpoint" in err
    # a checkpoint older than fingerprints: the pixel-space model makes another image shape
    older = edit_meta(copy_of(swapped, tmp_path, "older"), lambda m: m.pop("fingerprints"))
    assert run_cli("distill-2d", "--resume", older, "--steps", 3, "--out", tmp_path / "out2") == 2
    assert "its image is (1, 4, 4, 4), the settings make (1, 3, 32, 32)" in one_line(capsys)


def test_a_2d_state_file_in_a_3d_checkpoint_is_refused(ck2d, ck3d, tmp_path, capsys):
    folder = copy_of(ck3d, tmp_path)
    shutil.copy(ck2d / ckpt.TENSORS_FILE, folder / ckpt.TENSORS_FILE)
    assert run_cli("render", "--checkpoint", folder, "--out", tmp_path / "render") == 2
    err = one_line(capsys)
    assert err.startswith("error: --checkpoint: ") and "does not fit its checkpoint.json: it lacks" in err, err
    assert run_cli("text-to-3d", "--resume", folder, "--steps", 3, "--out", tmp_path / "out") == 2
    err = one_line(capsys)
    assert err.startswith("error: --resume: ") and "does not fit its checkpoint.json: it lacks" in err, err


def test_a_3d_state_file_in_a_2d_checkpoint_is_refused(ck2d, ck3d, tmp_path):
    folder = copy_of(ck2d, tmp_path)
    shutil.copy(ck3d / ckpt.TENSORS_FILE, folder / ckpt.TENSORS_FILE)
    with pytest.raises(UserInputError) as info:
        Distill2D.from_checkpoint(folder, overrides={"steps": 3})
    assert info.value.input_name == "resume" and "holds no 2D image" in info.value.problem


def test_nerf_tensors_of_another_preset_are_refused(ck3d, tmp_path, capsys):
    # the hash table's size is part of the settings: a checkpoint edited to quality's table does not fit its tensors
    folder = edit_meta(copy_of(ck3d, tmp_path), lambda m: m["config"]["nerf_field"].update(log2_hashmap_size=19))
    assert run_cli("render", "--checkpoint", folder, "--out", tmp_path / "render") == 2
    err = one_line(capsys)
    assert "does not fit its checkpoint.json: its field.encoding.params is" in err, err
    with pytest.raises(UserInputError, match="does not fit"):
        load_nerf(folder)


def test_impossible_nested_settings_are_one_line(ck3d, tmp_path, capsys):
    folder = edit_meta(copy_of(ck3d, tmp_path), lambda m: m["config"]["nerf_field"].update(n_levels=-3))
    assert run_cli("render", "--checkpoint", folder, "--out", tmp_path / "render") == 2
    assert "describes a NeRF that cannot be built" in one_line(capsys)


def test_optimizer_state_that_does_not_fit_is_refused(ck2d, prior_eps, tmp_path):
    wrong_shape = edit_tensors(copy_of(ck2d, tmp_path), lambda t: t.update(
        {"optimizer.state.0.exp_avg": torch.zeros(3)}))
    with pytest.raises(UserInputError, match="optimiser state does not fit the run .*exp_avg of parameter 0"):
        Distill2D.from_checkpoint(wrong_shape, overrides={"steps": 3}, prior=prior_eps)
    bad_lr = edit_meta(copy_of(ck2d, tmp_path, "lr"), lambda m: m["optimizer"]["param_groups"][0].update(lr="fast"))
    with pytest.raises(UserInputError, match="optimizer lr is 'fast'"):
        Distill2D.from_checkpoint(bad_lr, overrides={"steps": 3}, prior=prior_eps)
    no_rng = edit_tensors(copy_of(ck2d, tmp_path, "rng"), lambda t: t.pop("rng_state"))
    with pytest.raises(UserInputError, match="no valid rng_state"):
        Distill2D.from_checkpoint(no_rng, overrides={"steps": 3}, prior=prior_eps)


# ----------------------------------------------------------------------------------------- non-finite state
def test_resuming_a_checkpoint_with_non_finite_tensors_is_refused(ck2d, ck3d, tmp_path, capsys):
    nan2d = edit_tensors(copy_of(ck2d, tmp_path), lambda t: t["generator.image"].view(-1).__setitem__(0, float("nan")))
    assert run_cli("distill-2d", "--resume", nan2d, "--steps", 3, "--out", tmp_path / "out") == 2
    assert "holds non-finite values (NaN or inf) in generator.image" in one_line(capsys)
    inf3d = edit_tensors(copy_of(ck3d, tmp_path, "3d"),
                         lambda t: t["generator.field.encoding.params"].view(-1).__setitem__(5, float("inf")))
    assert run_cli("render", "--checkpoint", inf3d, "--out", tmp_path / "render") == 2
    assert "holds non-finite values (NaN or inf) in generator.field.encoding.params" in one_line(capsys)


# ------------------------------------------------------------------------------------ a save that cannot write
def _leftovers(parent: Path) -> list[str]:
    """Temporary or set-aside checkpoint folders of :func:`ckpt.save_checkpoint` in ``parent``."""
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or p.name.endswith(".old"))


@pytest.mark.parametrize("where", ["read-only", "tensors", "meta", "swap"])
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where):
    folder = tmp_path / "checkpoint"
    ckpt.save_checkpoint(folder, {"a": torch.zeros(3)}, {"step": 1})
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if where == "read-only":  # what a read-only folder does to a non-root user (root writes anyway)
        full = OSError(errno.EROFS, os.strerror(errno.EROFS))
        mkdir = Path.mkdir
        monkeypatch.setattr(Path, "mkdir", lambda self, *a, **k: (_ for _ in ()).throw(full)
                            if ".tmp-" in self.name else mkdir(self, *a, **k))
    elif where == "tensors":
        monkeypatch.setattr(ckpt, "save_file", lambda *a, **k: (_ for _ in ()).throw(full))
    elif where == "meta":
        original = Path.write_text
        monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: (_ for _ in ()).throw(full)
                            if self.name == ckpt.META_FILE else original(self, *a, **k))
    else:  # the new folder cannot be renamed into place after the old one was moved aside
        rename = os.rename
        monkeypatch.setattr(ckpt.os, "rename", lambda src, dst: (_ for _ in ()).throw(full)
                            if ".tmp-" in str(src) else rename(src, dst))
    with pytest.raises(UserInputError) as info:
        ckpt.save_checkpoint(folder, {"a": torch.ones(3)}, {"step": 2})
    monkeypatch.undo()
    assert info.value.input_name == "out"
    assert info.value.problem == f"cannot write the checkpoint to '{folder}': {full.strerror}"
    tensors, meta = ckpt.load_checkpoint(folder)
    assert meta["step"] == 1 and torch.equal(tensors["a"], torch.zeros(3))
    assert _leftovers(tmp_path) == []


def test_an_interrupt_during_a_save_leaves_no_temporary_folder(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoint"
    ckpt.save_checkpoint(folder, {"a": torch.zeros(3)}, {"step": 1})
    monkeypatch.setattr(ckpt, "save_file", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(folder, {"a": torch.ones(3)}, {"step": 2})
    assert _leftovers(tmp_path) == [] and ckpt.load_checkpoint(folder)[1]["step"] == 1


def test_a_dead_process_temporary_folder_is_removed_by_the_next_save(tmp_path):
    pid = 2 ** 22 + 12345  # above Linux's pid_max: never a live process
    stale = tmp_path / f".checkpoint.tmp-{pid}"
    stale.mkdir()
    (stale / ckpt.TENSORS_FILE).write_bytes(b"half")
    ckpt.save_checkpoint(tmp_path / "checkpoint", {"a": torch.zeros(1)}, {"step": 1})
    assert _leftovers(tmp_path) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes into read-only folders; the monkeypatched tests cover the same path")
def test_a_read_only_folder_is_one_clean_error(tmp_path):
    folder = tmp_path / "runs" / "checkpoint"
    ckpt.save_checkpoint(folder, {"a": torch.zeros(3)}, {"step": 1})
    folder.parent.chmod(0o555)
    try:
        with pytest.raises(UserInputError, match="cannot write the checkpoint to .*Permission denied"):
            ckpt.save_checkpoint(folder, {"a": torch.ones(3)}, {"step": 2})
    finally:
        folder.parent.chmod(0o755)
    assert ckpt.load_checkpoint(folder)[1]["step"] == 1 and _leftovers(folder.parent) == []


def test_disk_full_during_a_cli_run_is_one_line_and_the_last_checkpoint_resumes(tiny_eps_dir, tmp_path, capsys,
                                                                                monkeypatch):
    original, calls = ckpt.save_file, []

    def fills_up(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", fills_up)
    out = tmp_path / "out"
    assert run_cli("distill-2d", "--model", tiny_eps_dir, "--prompt", "a red cube", "--method", "sds", "--steps", 2,
                   "--size", 32, "--checkpoint-every", 1, "--out", out) == 2
    err = one_line(capsys, after_progress=True)
    assert err == (f"error: --out: cannot write the checkpoint to '{out / 'checkpoint'}': No space left on device; "
                   "free space or choose another --out you can write to (the previous checkpoint, if any, is kept)")
    assert ckpt.load_checkpoint(out / "checkpoint", run=True)[1]["step"] == 1
    assert _leftovers(out) == []


# ---------------------------------------------------------------------- a moved model, found by its weights
def test_fingerprints_are_stored_and_not_changed_by_phis_adapter(ck2d, tiny_eps_dir):
    meta = json.loads((ck2d / ckpt.META_FILE).read_text())
    fresh = load_prior(tiny_eps_dir)  # loaded anew: no LoRA adapter in its UNet
    assert meta["fingerprints"] == {"dtype": "float32", "model": fresh.fingerprint()}


def _moved(ck2d: Path, tmp_path: Path) -> Path:
    """ck2d as if its model folder had been moved away since it was written."""
    return edit_meta(copy_of(ck2d, tmp_path), lambda m: m["config"].update(model=str(tmp_path / "gone" / "tiny")))


def test_a_moved_model_without_model_says_to_give_it(ck2d, tmp_path, capsys):
    folder = _moved(ck2d, tmp_path)
    assert run_cli("distill-2d", "--resume", folder, "--steps", 2, "--out", tmp_path / "out") == 2
    assert one_line(capsys) == (f"error: --model: the checkpoint's model '{tmp_path / 'gone' / 'tiny'}' no longer "
                                "exists; give --model with the same weights at their new place (they are recognised "
                                "by their content)")


def test_a_moved_model_resumes_with_model_at_its_new_place_and_notes_the_replanned_schedule(ck2d, tiny_eps_dir,
                                                                                           tmp_path):
    """The library as the CLI calls it (``--resume`` with ``--model``): the plan takes the weights at their new
    place, the run records it, and extending the finished run announces the re-planned learning rate."""
    folder = _moved(ck2d, tmp_path)
    plan = plan_run("distill-2d", {"steps": 2, "model": str(tiny_eps_dir)}, resume=folder, explicit=True)
    assert plan.config.model == str(tiny_eps_dir)
    with pytest.warns(ckpt.ResumeNotice, match=r"re-planned: step 1 followed the cosine of a 1-step run and "
                                               r"step 2 follows that of a 2-step run"):
        run = plan.build()
    run.phi.remove()
    assert run.step == 1 and run.config.model == str(tiny_eps_dir)


@pytest.mark.slow
def test_a_moved_model_resumes_through_the_cli(ck2d, tiny_eps_dir, tmp_path, capsys):
    folder = _moved(ck2d, tmp_path)
    out = tmp_path / "out"
    assert run_cli("distill-2d", "--resume", folder, "--steps", 2, "--model", tiny_eps_dir, "--out", out) == 0
    assert "notice: the learning rate's schedule is re-planned" in capsys.readouterr().err  # the CLI's one line
    meta = json.loads((out / "checkpoint" / ckpt.META_FILE).read_text())
    assert meta["step"] == 2 and meta["config"]["model"] == str(Path(tiny_eps_dir).resolve())  # the new place


def test_other_weights_as_model_are_refused(ck2d, tiny_v_dir, tmp_path, capsys):
    folder = _moved(ck2d, tmp_path)
    assert run_cli("distill-2d", "--resume", folder, "--steps", 2, "--model", tiny_v_dir, "--out", tmp_path / "o") == 2
    err = one_line(capsys)
    assert err.startswith(f"error: --model: the weights in '{Path(tiny_v_dir).resolve()}' differ from the ones the "
                          "checkpoint was trained with; give --model with the run's own weights"), err


def test_an_old_checkpoint_without_fingerprints_keeps_the_path_rule(ck2d, tiny_eps_dir, tmp_path, capsys):
    folder = edit_meta(_moved(ck2d, tmp_path), lambda m: m.pop("fingerprints"))
    gone = tmp_path / "gone" / "tiny"
    assert run_cli("distill-2d", "--resume", folder, "--steps", 2, "--out", tmp_path / "o") == 2
    assert one_line(capsys).endswith(f"put the model back at '{gone}' (this checkpoint is older than weight "
                                     "fingerprints, so only that path is accepted)")
    assert run_cli("distill-2d", "--resume", folder, "--steps", 2, "--model", tiny_eps_dir,
                   "--out", tmp_path / "o") == 2
    assert "older than weight fingerprints, so other weights cannot be recognised; put the model back at" \
           in one_line(capsys)


def test_a_host_prior_with_other_weights_cannot_resume(ck2d, prior_v, tmp_path):
    """The nodes hand their own prior: it must hold the weights the checkpoint was trained with."""
    plan = plan_run("distill-2d", {"prompt": "a red cube", "steps": 3, "distill.method": "asd"}, prior=prior_v)
    with pytest.raises(UserInputError) as info:
        resume_plan(plan, ck2d)
    assert info.value.input_name == "model" and "weights differ" in info.value.problem


# ---------------------------------------------------------------------------- the 2D schedule, re-planned or not
def test_the_replanned_notice_comes_only_when_the_total_changes_a_decaying_rate(ck2d, prior_eps, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ckpt.ResumeNotice)  # resumed to its own total: exact, no notice
        Distill2D.from_checkpoint(ck2d, overrides={"steps": 1}, prior=prior_eps).phi.remove()
        constant = edit_meta(copy_of(ck2d, tmp_path), lambda m: m["config"].update(lr_decay_to=1.0))
        Distill2D.from_checkpoint(constant, overrides={"steps": 4}, prior=prior_eps).phi.remove()
    with pytest.warns(ckpt.ResumeNotice, match="differs from a straight 4-step run"):
        Distill2D.from_checkpoint(ck2d, overrides={"steps": 4}, prior=prior_eps).phi.remove()

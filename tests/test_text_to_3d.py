"""Text-to-3D: Perp-Neg and view prompts, mesh export, and the text-to-3d / render CLI contract."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from asd_engine.scene.cameras import cameras_from_angles
from asd_engine.cli import main
from asd_engine.errors import UserInputError
from asd_engine.scene.export import Z_UP_TO_Y_UP, extract_mesh
from asd_engine.scene.field import FieldConfig
from asd_engine.scene.nerf import NeRFGenerator
from asd_engine.prior.prompts import ViewPrompts
from asd_engine.scene.render import RenderConfig
from asd_engine.runs.text_to_3d import TextTo3D

# tiny settings so a CLI run takes seconds: few steps, few small views, a coarse mesh grid
from asd_engine.runs.configs import preset_config

# tiny settings so a CLI run takes seconds: few steps, few small views, a coarse mesh grid
FAST = ["--preset", "toy-cpu", "--views", "3", "--view-size", "32", "--mesh-resolution", "40"]


def run_cli(*args) -> int:
    return main([str(a) for a in args])


# ---------------------------------------------------------------------------------------------- prompts, Perp-Neg
def test_perp_neg_guidance_matches_its_formula_and_reduces_to_cfg(prior_eps):
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn((2, *prior_eps.sample_shape(32)), generator=g)
    t = torch.tensor([300, 700])
    pos, uncond = prior_eps.encode_prompt(["a cube, front view"] * 2), prior_eps.encode_prompt([""] * 2)
    negs = prior_eps.encode_prompt(["a cube, side view", "a cube, back view"] * 2).view(2, 2, *pos.shape[1:])
    weights = torch.tensor([[-1.0, 0.5], [0.3, -2.0]])
    with torch.no_grad():
        plain, _ = prior_eps.guided(x_t, t, pos, uncond, 7.5)
        zero, _ = prior_eps.guided(x_t, t, pos, uncond, 7.5, negs, torch.zeros(2, 2))
        perp, _ = prior_eps.guided(x_t, t, pos, uncond, 7.5, negs, weights)
        e_u = prior_eps.model_output(x_t, t, uncond)
        e_p = prior_eps.model_output(x_t, t, pos) - e_u
        direction = e_p.clone()
        for k in range(2):
            e_k = prior_eps.model_output(x_t, t, negs[:, k]) - e_u
            for b in range(2):
                proj = (e_k[b] * e_p[b]).sum() / e_p[b].square().sum() * e_p[b]
                direction[b] += weights[b, k] * (e_k[b] - proj)
    assert torch.allclose(zero, plain, atol=1e-5)
    assert torch.allclose(perp, e_u + 7.5 * direction, atol=1e-4)
    assert not torch.allclose(perp, plain, atol=1e-3)


def test_view_prompts_pick_the_view_and_perp_neg_interpolates(prior_eps):
    prompts = ViewPrompts(prior_eps, "a red cube", perp_neg=False)
    cams = cameras_from_angles(torch.tensor([0.0, 0.0, 80.0]), torch.tensor([0.0, 180.0, 0.0]), torch.ones(3),
                               torch.full((3,), 60.0), 8, 8)
    cond = prompts.conditioning(cams)
    assert torch.equal(cond.cond[0], prompts.views[0]) and torch.equal(cond.cond[1], prompts.views[2])
    assert torch.equal(cond.cond[2], prompts.views[3]) and cond.camera.shape == (3, 16)
    assert prompts.prompts["front"] == "a red cube, front view"
    perp = ViewPrompts(prior_eps, "a red cube", perp_neg=True)
    half = cameras_from_angles(torch.tensor([0.0]), torch.tensor([45.0]), torch.ones(1), torch.tensor([60.0]), 8, 8)
    c = perp.conditioning(half)
    assert torch.allclose(c.cond[0], 0.5 * perp.views[0] + 0.5 * perp.views[1])
    assert c.negatives.shape == (1, 2, *perp.base.shape[1:]) and c.negative_weights.shape == (1, 2)
    flat = ViewPrompts(prior_eps, "a red cube", view_dependent=False).conditioning(cams)
    assert torch.equal(flat.cond[1], prompts.base[0])
    # a prior whose captions say "overhead" from 30° is prompted so at 40° (the 60° default says "front")
    at_40 = cameras_from_angles(torch.tensor([40.0]), torch.tensor([0.0]), torch.ones(1), torch.tensor([60.0]), 8, 8)
    assert torch.equal(prompts.conditioning(at_40).cond[0], prompts.views[0])
    low = ViewPrompts(prior_eps, "a red cube", perp_neg=True, overhead_elevation=30.0)
    assert torch.equal(low.conditioning(at_40).cond[0], low.views[3])


# ---------------------------------------------------------------------------------------------- meshes
class _SphereField(torch.nn.Module):
    """Stands in for NeRFField in a NeRFGenerator: a sphere of density 100, red, plus an optional tiny floater."""

    def __init__(self, floater: bool) -> None:
        super().__init__()
        self.floater = floater

    def density(self, p):
        d = (p.norm(dim=-1) < 0.5).float() * 100.0
        if self.floater:
            d = d + ((p - torch.tensor([0.8, 0.8, 0.8])).norm(dim=-1) < 0.04).float() * 100.0
        return d

    def color(self, p):
        return torch.tensor([1.0, 0.0, 0.0]).expand(p.shape[0], 3)


def _sphere_nerf(floater: bool = False) -> NeRFGenerator:
    nerf = NeRFGenerator(FieldConfig(n_levels=2, log2_hashmap_size=10, hidden_dim=8), RenderConfig())
    nerf.field = _SphereField(floater)
    return nerf


def test_mesh_of_a_sphere_has_the_right_radius_colours_and_no_floaters():
    mesh = extract_mesh(_sphere_nerf(floater=True), resolution=64, threshold=25.0)
    radii = np.linalg.norm(mesh.vertices, axis=1)
    assert abs(np.median(radii) - 0.5) < 0.03 and radii.max() < 0.6  # the floater at |p| ≈ 1.4 was dropped
    assert (mesh.visual.vertex_colors[:, :3] == [255, 0, 0]).all()
    upright = mesh.copy()
    upright.apply_transform(Z_UP_TO_Y_UP)
    assert np.allclose(upright.vertices[:, 1], mesh.vertices[:, 2])  # engine +z becomes file +y


def test_mesh_threshold_falls_back_with_a_warning_and_an_empty_field_is_an_error():
    nerf = _sphere_nerf()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mesh = extract_mesh(nerf, resolution=32, threshold=500.0)
    assert len(mesh.faces) > 0 and any("threshold" in str(w.message) for w in caught)
    nerf.field.density = lambda p: torch.zeros(p.shape[0])
    with pytest.raises(UserInputError, match="empty"):
        extract_mesh(nerf, resolution=32)


@pytest.mark.parametrize("given, preset, expected", [(None, "toy-cpu", 5.0), (None, "quality", 25.0),
                                                     (12.0, "toy-cpu", 12.0)])
def test_export_meshes_at_the_presets_isosurface_unless_told(monkeypatch, tmp_path, given, preset, expected):
    """toy-cpu marches ~5x longer steps than the SD presets, so its objects' density is ~5x lower (EXPORT_DEFAULTS)."""
    import argparse

    from asd_engine.cli import train as cli_train
    from asd_engine.scene import export

    seen = {}
    monkeypatch.setattr(export, "export_outputs", lambda nerf, out, **kw: seen.update(kw) or [])
    args = argparse.Namespace(views=None, view_size=None, mesh_resolution=None, mesh_threshold=given,
                              background="white", animation="webp")
    cli_train.export(None, preset, tmp_path, args)
    assert seen["mesh_threshold"] == expected


def test_cli_help_states_the_toy_cpu_step_count():
    """The help of every command that runs the toy-cpu preset states its step count."""
    import argparse

    from asd_engine.cli import build_parser
    from asd_engine.runs.configs import TOY_CPU_STEPS

    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for name in ("text-to-3d", "demo", "quality"):
        assert f"{TOY_CPU_STEPS}" in " ".join(commands.choices[name].format_help().split()), name


# ---------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("method", ["asd", "vsd", "sds"])
def test_short_text_to_3d_run_writes_mesh_turntable_and_views(tiny_v_dir, tmp_path, method):
    import trimesh

    out = tmp_path / "out"
    assert run_cli("text-to-3d", "--model", tiny_v_dir, "--prompt", "a red cube", "--method", method,
                   "--steps", 4, "--seed", 0, "--out", out, *FAST) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(math.isfinite(r["generator_loss"]) for r in rows)
    assert all(r["extras"]["resolution"] == 32 for r in rows)
    assert all((r["phi_loss"] is None) == (method == "sds") for r in rows)
    mesh = trimesh.load(out / "mesh.glb", force="mesh")
    assert len(mesh.faces) > 0 and mesh.visual.kind == "vertex" and mesh.visual.vertex_colors.shape[1] == 4
    assert len(trimesh.load(out / "mesh.obj", force="mesh").faces) == len(mesh.faces)
    with Image.open(out / "turntable.webp") as anim:
        assert anim.n_frames == 3 and anim.size == (32, 32)
    for kind in ("rgb", "alpha", "depth", "normal"):
        assert len(list((out / "views").glob(f"{kind}_*.png"))) == 3
    assert (out / "checkpoint" / "state.safetensors").is_file()


def test_latent_prior_text_to_3d_with_perp_neg_and_ti(tiny_eps_dir, tmp_path):
    """A latent (VAE) prior: renders are resized to the prior's size and encoded with gradients."""
    out = tmp_path / "out"
    assert run_cli("text-to-3d", "--model", tiny_eps_dir, "--prompt", "a red cube", "--steps", 2, "--out", out,
                   "--perp-neg", "on", "--phi", "ti", *FAST) == 0
    assert json.loads((out / "run.json").read_text())["config"]["perp_neg"] is True


@pytest.mark.parametrize("backend", ["torch", "warp"])
def test_text_to_3d_resume_equals_a_straight_run_and_render_reproduces_the_views(tiny_v_dir, tmp_path, backend):
    # Bit-identity holds on the CPU. On CUDA the hash grid's backward (index_add) accumulates with atomics, in no
    # fixed order, so two straight runs already differ in the last bits (seen on an H200); hence device cpu.
    # the blob fades over the first 4 steps (a recipe field, here set by hand): the resumed run must pick up the
    # fade where it stopped, and `render` must draw the saved NeRF with its faded blob. The warp backend's CPU
    # kernels run in order, so the same holds for a run with the fused kernels (recorded in run.json).
    if backend == "warp":
        pytest.importorskip("warp", reason="warp-lang is not installed: pip install -r tests/requirements.txt")
    cpu = ["--device", "cpu"]
    # the haze term draws its points from the run's generator: a resumed run must draw the same ones
    # and the learning rates fall over the second phase (steps 4-5), a function of the step alone
    common = ["--model", tiny_v_dir, "--prompt", "a red cube", "--seed", 3, "--blob-fade", "on", "--t-anneal-step", 4,
              "--lambda-haze", 30, "--lr-decay-to", 0.2, "--field-backend", backend, *FAST, *cpu]
    assert run_cli("text-to-3d", *common, "--steps", 6, "--out", tmp_path / "straight") == 0
    assert run_cli("text-to-3d", *common, "--steps", 3, "--out", tmp_path / "first") == 0
    assert run_cli("text-to-3d", "--resume", tmp_path / "first" / "checkpoint", "--steps", 6,
                   "--out", tmp_path / "resumed", *FAST[2:], *cpu) == 0
    state = lambda name: (tmp_path / name / "checkpoint" / "state.safetensors").read_bytes()  # noqa: E731
    assert state("resumed") == state("straight")
    assert (tmp_path / "resumed" / "views" / "rgb_001.png").read_bytes() == \
           (tmp_path / "straight" / "views" / "rgb_001.png").read_bytes()
    assert run_cli("render", "--checkpoint", tmp_path / "straight" / "checkpoint", "--out", tmp_path / "again",
                   *FAST[2:], *cpu) == 0
    for name in ("rgb_000.png", "depth_002.png", "normal_001.png"):
        assert (tmp_path / "again" / "views" / name).read_bytes() == \
               (tmp_path / "straight" / "views" / name).read_bytes()
    assert (tmp_path / "again" / "mesh.glb").is_file()
    assert json.loads((tmp_path / "resumed" / "run.json").read_text())["field_backend"] == backend
    if backend == "warp":  # where Warp is not installed, the kernels' checkpoint loads into the torch grid
        from asd_engine.runs.text_to_3d import load_nerf
        from asd_engine.scene import hash_kernels

        with_kernels, _, _ = load_nerf(tmp_path / "straight" / "checkpoint", device="cpu")
        points = torch.rand(500, 3) - 0.5
        expected = with_kernels.field.density(points)
        original = hash_kernels.available
        hash_kernels.available = lambda: False
        try:
            without, _, _ = load_nerf(tmp_path / "straight" / "checkpoint", device="cpu")
        finally:
            hash_kernels.available = original
        assert without.field.backend == "torch" and torch.allclose(without.field.density(points), expected, rtol=1e-5)


def test_an_extended_run_without_a_second_phase_does_not_grow_the_blob_back(tiny_v_dir, tmp_path):
    # without a second phase the seed ball fades over the run's steps; extending the run must not bring it back
    config = preset_config("toy-cpu", "a red cube", steps=3, model=str(tiny_v_dir), prior_resolution=32,
                           blob_fade=True)
    config.distill.t_anneal_step = None
    run = TextTo3D(config)
    seeds: list[float] = []
    run.run(on_step=lambda info: seeds.append(float(run.nerf.field.blob_seed)))
    run.save_checkpoint(tmp_path / "ckpt")
    run.phi.remove()
    from asd_engine.runs.checkpoint import ResumeNotice

    with pytest.warns(ResumeNotice, match="fade is re-planned: it faded over a 3-step run and now fades over a 8-step"):
        longer = TextTo3D.from_checkpoint(tmp_path / "ckpt", overrides={"steps": 8})
    longer.run(on_step=lambda info: seeds.append(float(longer.nerf.field.blob_seed)))
    longer.phi.remove()
    assert seeds[:3] == pytest.approx([1.0, 2 / 3, 1 / 3])
    assert seeds[3:] == pytest.approx([1 / 3, 1 / 3, 1 / 3, 2 / 8, 1 / 8])  # 1 - step/8 only once it is lower


def test_the_learning_rates_fall_over_the_second_phase_and_an_older_checkpoint_keeps_them(tiny_v_dir, tmp_path):
    """``lr_decay_to``: the NeRF's three rates hold through the first phase and fall along a cosine from
    ``t_anneal_step`` to that fraction at the last step; an extension re-plans the fall only once it has begun; a
    checkpoint written before the setting existed resumes at constant rates."""
    from asd_engine.runs.base import lr_factor
    from asd_engine.runs.checkpoint import ResumeNotice

    assert [lr_factor(s, 6, 0.1, start=2) for s in (0, 1, 2)] == [1.0, 1.0, 1.0]
    assert lr_factor(4, 6, 0.1, start=2) == pytest.approx(0.55) and lr_factor(6, 6, 0.1, start=2) == pytest.approx(0.1)
    assert lr_factor(5, 6, 1.0, start=2) == 1.0 and lr_factor(3, 3, 0.1, start=5) == 1.0  # never falls before start
    config = preset_config("toy-cpu", "a red cube", steps=6, model=str(tiny_v_dir), prior_resolution=32,
                           lr_decay_to=0.1)
    config.distill.t_anneal_step = 2
    run = TextTo3D(config)
    assert [g["lr"] for g in run.optimizer.param_groups] == run.base_lrs == [config.lr_grid, config.lr_mlp,
                                                                           config.lr_background]
    rates: list[list[float]] = []
    run.run(should_stop=lambda: run.step == 3, on_step=lambda info: rates.append(
        [g["lr"] for g in run.optimizer.param_groups]))
    run.save_checkpoint(tmp_path / "ckpt")
    run.phi.remove()
    for step, row in enumerate(rates):
        assert row == pytest.approx([base * lr_factor(step, 6, 0.1, start=2) for base in run.base_lrs])
    assert rates[0] == rates[1] == run.base_lrs  # the first phase at the full rates
    with pytest.warns(ResumeNotice, match="learning rate's schedule is re-planned"):  # 3 steps done, 1 falling
        longer = TextTo3D.from_checkpoint(tmp_path / "ckpt", overrides={"steps": 8})
    longer.run(should_stop=lambda: longer.step == 4)
    assert longer.optimizer.param_groups[0]["lr"] == pytest.approx(config.lr_grid * lr_factor(3, 8, 0.1, start=2))
    longer.phi.remove()
    meta_path = tmp_path / "ckpt" / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    assert meta["config"].pop("lr_decay_to") == 0.1
    meta_path.write_text(json.dumps(meta))
    older = TextTo3D.from_checkpoint(tmp_path / "ckpt")
    assert older.config.lr_decay_to == 1.0
    older.run()
    assert [g["lr"] for g in older.optimizer.param_groups] == older.base_lrs
    older.phi.remove()
    early = preset_config("toy-cpu", "a red cube", steps=2, model=str(tiny_v_dir), prior_resolution=32,
                          lr_decay_to=0.1)  # the toy-cpu second phase starts at 300: nothing has fallen yet
    first = TextTo3D(early)
    first.run()
    first.save_checkpoint(tmp_path / "early")
    first.phi.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeNotice)
        TextTo3D.from_checkpoint(tmp_path / "early", overrides={"steps": 4}).phi.remove()


@pytest.mark.parametrize("args,flag", [
    (["--preset", "huge"], "--preset"), (["--method", "gan"], "--method"), (["--steps", "0"], "--steps"),
    (["--model", "/nonexistent/model"], "--model"), (["--perp-neg", "maybe"], "--perp-neg"),
    (["--lambda-haze", "-1"], "--lambda-haze")])
def test_text_to_3d_bad_inputs_are_one_line_errors(tiny_v_dir, tmp_path, capsys, args, flag):
    base = {"--model": str(tiny_v_dir), "--prompt": "a cube", "--out": str(tmp_path / "o"), "--steps": "2"}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    argv = ["text-to-3d"] + [x for kv in base.items() for x in kv]
    try:
        code = run_cli(*argv)
    except SystemExit as exc:  # argparse choices
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and flag in err and "\n" not in err and "Traceback" not in err


def test_render_refuses_a_2d_checkpoint(tiny_eps_dir, tmp_path, capsys):
    assert run_cli("distill-2d", "--model", tiny_eps_dir, "--prompt", "x", "--steps", 1, "--size", 32,
                   "--out", tmp_path / "2d") == 0
    assert run_cli("render", "--checkpoint", tmp_path / "2d" / "checkpoint", "--out", tmp_path / "r") == 2
    assert "text-to-3d" in capsys.readouterr().err

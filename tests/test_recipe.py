"""The prior's recipe: Stable Diffusion folders without one get the official recipe, the toy prior its own, an
explicit value always wins, and every entry point (library, CLI, nodes' specs, harness) goes through it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from asd_engine import cli
from asd_engine.prior.discriminator import LORA_TARGETS
from asd_engine.distill import WEIGHTINGS
from asd_engine.runs.distill_2d import Distill2D
from asd_engine.runs.configs import Distill2DConfig
from asd_engine.errors import UserInputError
from asd_engine.runs.image_generator import ImageGenerator
from asd_engine.prior.diffusion import DiffusionPrior
from asd_engine.toy.quality import parse_toy_prompt
from asd_engine.runs import settings
from asd_engine.runs.settings import official_where_absent
from asd_engine.prior.recipe import (LORA_TARGET_CHOICES, OFFICIAL, RECIPE_FILE, Recipe, apply_aliases,
                               read_recipe, write_recipe)
from asd_engine.runs.plan import ImageGeneratorSpec, NeRFGeneratorSpec, make_run
from asd_engine.runs.text_to_3d import TextTo3D
from asd_engine.runs.configs import preset_config
from asd_engine.prior import default_prior_path
from asd_engine.scene.cameras import ELEVATION_SAMPLINGS, CameraRanges, sample_cameras

TOY_RECIPE = read_recipe(default_prior_path())  # the toy prior's recipe lives only in its asd_recipe.json

RECIPE_VALUES = ("background", "distill.guidance_scale", "distill.gamma", "distill.t_min", "distill.t_max",
                 "distill.weighting", "distill.phi_noise", "phi.lr", "phi.lora_targets")


def _values(config) -> dict:
    return {"background": config.background, "distill.guidance_scale": config.distill.guidance_scale,
            "distill.gamma": config.distill.gamma, "distill.t_min": config.distill.t_min,
            "distill.t_max": config.distill.t_max, "distill.weighting": config.distill.weighting,
            "distill.phi_noise": config.distill.phi_noise, "phi.lr": config.phi.lr,
            "phi.lora_targets": config.phi.lora_targets}


@pytest.mark.parametrize("preset", ["quality", "low-vram"])
def test_sd_folder_without_a_recipe_gets_the_official_one(tiny_eps_dir, preset):
    prior = DiffusionPrior.from_pretrained(tiny_eps_dir, device="cpu")
    assert not (tiny_eps_dir / RECIPE_FILE).exists() and prior.recipe == OFFICIAL
    run = TextTo3D(preset_config(preset, "a cat", steps=1, prior_resolution=32), prior=prior)
    assert _values(run.config) == {"background": "random", "distill.guidance_scale": 7.5, "distill.gamma": -0.75,
                                   "distill.t_min": 0.02, "distill.t_max": 0.98, "distill.weighting": "sds",
                                   "distill.phi_noise": "fresh", "phi.lr": 1e-4, "phi.lora_targets": "attention"}
    assert run.config.lambda_sparsity == 10.0 and run.phi.optimizer.param_groups[0]["lr"] == 1e-4
    assert run.config.overhead_elevation == 60.0 and run.prompts.overhead_elevation == 60.0  # DreamFusion's
    assert run.config.blob_fade is False and run.nerf.field.blob_seed == 1.0  # the permanent blob
    assert (run.config.cameras.min_elevation, run.config.cameras.max_elevation) == (-10.0, 45.0)  # official range
    assert run.config.cameras.elevation_sampling == "mixed"  # the official code's camera sampler
    assert run.config.distill.guidance_scale_annealed is None  # one CFG all run
    assert set(run.config.from_recipe) == {*RECIPE_VALUES, "lambda_sparsity", "blob_fade", "overhead_elevation",
                                           "cameras.min_elevation", "cameras.max_elevation",
                                           "cameras.elevation_sampling", "distill.guidance_scale_annealed"}
    run.phi.remove()


def test_toy_prior_carries_its_own_recipe_and_an_explicit_value_wins():
    prior = DiffusionPrior.from_pretrained(default_prior_path(), device="cpu")
    assert prior.recipe == TOY_RECIPE == read_recipe(default_prior_path())
    run = make_run(prior, NeRFGeneratorSpec(), {"prompt": "a red cube", "steps": 1})
    assert _values(run.config) == {"background": "white", "distill.guidance_scale": TOY_RECIPE.guidance_scale,
                                   "distill.gamma": TOY_RECIPE.gamma, "distill.t_min": TOY_RECIPE.t_min,
                                   "distill.t_max": TOY_RECIPE.t_max, "distill.weighting": TOY_RECIPE.weighting,
                                   "distill.phi_noise": "shared", "phi.lr": TOY_RECIPE.lora_lr,
                                   "phi.lora_targets": TOY_RECIPE.lora_targets}
    assert run.config.lambda_sparsity == TOY_RECIPE.lambda_sparsity
    assert run.config.overhead_elevation == TOY_RECIPE.overhead_elevation == 30.0
    assert run.prompts.overhead_elevation == 30.0
    assert run.config.cameras.max_elevation == TOY_RECIPE.max_elevation == 80.0  # the views the prior was tuned on
    assert run.config.cameras.min_elevation == TOY_RECIPE.min_elevation
    assert run.config.cameras.elevation_sampling == TOY_RECIPE.elevation_sampling
    assert run.config.blob_fade is TOY_RECIPE.blob_fade is True
    run.phi.remove()
    vsd = make_run(prior, NeRFGeneratorSpec(), {"prompt": "a red cube", "steps": 1, "distill.method": "vsd"})
    assert vsd.config.distill.gamma == 0.0  # VSD is ASD with γ = 0, whatever the recipe's γ
    vsd.phi.remove()
    run = make_run(prior, NeRFGeneratorSpec(), {"prompt": "a red cube", "steps": 1, "distill.guidance_scale": 5.0, "distill.t_max": 0.7, "background": "random", "distill.phi_noise": "fresh",
                                                  "cameras.min_elevation": -20.0, "cameras.max_elevation": 50.0,
                                                  "cameras.elevation_sampling": "degrees"})
    assert (run.config.distill.guidance_scale, run.config.distill.t_max, run.config.background,
            run.config.distill.phi_noise, run.config.cameras.min_elevation, run.config.cameras.max_elevation,
            run.config.cameras.elevation_sampling) == (5.0, 0.7, "random", "fresh", -20.0, 50.0, "degrees")
    assert {"distill.guidance_scale", "distill.t_max", "background", "distill.phi_noise", "cameras.min_elevation",
            "cameras.max_elevation", "cameras.elevation_sampling"}.isdisjoint(run.config.from_recipe)
    assert "distill.t_min" in run.config.from_recipe
    run.phi.remove()
    run = TextTo3D(preset_config("toy-cpu", "a red cube", steps=1, overhead_elevation=60.0), prior=prior)
    assert run.prompts.overhead_elevation == 60.0 and "overhead_elevation" not in run.config.from_recipe
    run.phi.remove()


def test_textual_inversion_keeps_its_own_learning_rate(tiny_v_dir, tmp_path):
    folder = shutil.copytree(tiny_v_dir, tmp_path / "model")
    write_recipe(folder, Recipe(name="x", lora_lr=3e-3))
    prior = DiffusionPrior.from_pretrained(folder, device="cpu")
    lora = Distill2D(Distill2DConfig(prompt="a cat", steps=1, size=32), prior=prior)
    assert lora.config.phi.lr == 3e-3
    lora.phi.remove()
    config = Distill2DConfig(prompt="a cat", steps=1, size=32)
    config.phi.kind = "ti"
    ti = Distill2D(config, prior=prior)
    assert ti.config.phi.lr is None and "phi.lr" not in ti.config.from_recipe
    assert ti.config.phi.lora_targets is None and "phi.lora_targets" not in ti.config.from_recipe


def test_resumed_run_keeps_the_values_it_started_with(tiny_v_dir, tmp_path):
    folder = shutil.copytree(tiny_v_dir, tmp_path / "model")
    write_recipe(folder, Recipe(name="first", guidance_scale=2.0, background="white"))
    run = Distill2D(Distill2DConfig(prompt="a cat", steps=2, size=32, model=str(folder)))
    run.run()
    run.save_checkpoint(tmp_path / "ckpt")
    run.phi.remove()
    write_recipe(folder, Recipe(name="changed later", guidance_scale=9.0))
    resumed = Distill2D.from_checkpoint(tmp_path / "ckpt", overrides={"steps": 3})
    assert resumed.config.distill.guidance_scale == 2.0 and resumed.config.background == "white"
    assert "distill.guidance_scale" in resumed.config.from_recipe
    resumed.phi.remove()
    # a checkpoint written before `lora_targets` existed had φ on attention, whatever the prior's recipe says now
    meta_path = tmp_path / "ckpt" / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    assert meta["config"]["phi"].pop("lora_targets") == "attention"
    assert meta["config"].pop("lr_decay_to") == 0.05  # nor a falling learning rate
    assert meta["config"].pop("jitter") == 0  # nor a rolled image
    meta_path.write_text(json.dumps(meta))
    write_recipe(folder, Recipe(name="changed later", lora_targets="all", jitter_2d=3))
    older = Distill2D.from_checkpoint(tmp_path / "ckpt", overrides={"steps": 3})
    assert older.config.phi.lora_targets == "attention" and older.config.lr_decay_to == 1.0
    assert older.config.jitter == 0 and older.image.jitter == 0
    older.run()
    older.phi.remove()


def test_a_recipe_field_missing_from_an_older_checkpoint_is_the_official_value():
    """Before a recipe field existed the engine used the official value; a config saved then resumes with it."""
    import dataclasses

    saved = dataclasses.asdict(preset_config("toy-cpu", "a red cube", steps=1))
    del saved["overhead_elevation"], saved["phi"]["lora_targets"], saved["blob_fade"]
    del saved["cameras"]["max_elevation"], saved["cameras"]["elevation_sampling"]
    filled = official_where_absent(saved, type(preset_config("toy-cpu", "a red cube")))
    assert filled["overhead_elevation"] == 60.0 and filled["phi"]["lora_targets"] == "attention"
    assert filled["blob_fade"] is False  # the permanent blob
    assert filled["cameras"]["max_elevation"] == 45.0
    # not the official "mixed": the engine drew uniform in degrees until the official sampler was read again
    assert filled["cameras"]["elevation_sampling"] == "degrees"
    assert "overhead_elevation" not in saved and "max_elevation" not in saved["cameras"]  # the caller's dict stays
    assert {k: v for k, v in filled.items() if k not in ("overhead_elevation", "phi", "blob_fade", "cameras")} == {
        k: v for k, v in saved.items() if k not in ("phi", "cameras")}
    flat = dataclasses.asdict(Distill2DConfig(prompt="a cat"))
    assert official_where_absent(flat, Distill2DConfig) == flat  # nothing absent: nothing added (2D has no overhead)


def test_a_checkpoint_from_before_the_camera_range_had_two_ends_resumes_with_its_range():
    """Older versions stored the elevation range as one pair (``cameras.elevation``); it resumes as it was."""
    import dataclasses

    from asd_engine.runs.checkpoint import check_config
    from asd_engine.runs.configs import TextTo3DConfig, config_from_dict

    saved = dataclasses.asdict(preset_config("toy-cpu", "a red cube", steps=1))
    del saved["cameras"]["min_elevation"], saved["cameras"]["max_elevation"], saved["cameras"]["elevation_sampling"]
    saved["cameras"]["elevation"] = [-5.0, 40.0]
    check_config(TextTo3DConfig, saved, "ckpt")  # what loading a checkpoint checks first: no unknown setting
    config = config_from_dict(TextTo3DConfig, official_where_absent(saved, TextTo3DConfig))
    assert (config.cameras.min_elevation, config.cameras.max_elevation) == (-5.0, 40.0)
    assert config.cameras.elevation_sampling == "degrees"  # what that version drew


def test_the_training_cameras_reach_the_recipes_top_elevation(tiny_eps_dir, tmp_path, monkeypatch):
    """A prior's recipe says how high its training cameras go; a run draws its cameras up to there."""
    from asd_engine.runs import text_to_3d

    folder = shutil.copytree(tiny_eps_dir, tmp_path / "model")
    write_recipe(folder, Recipe(name="x", min_elevation=-40.0, max_elevation=20.0))
    drawn = []
    def spy(*args, **kwargs):
        cameras = sample_cameras(*args, **kwargs)
        drawn.append(cameras.elevation)
        return cameras
    monkeypatch.setattr(text_to_3d, "sample_cameras", spy)
    prior = DiffusionPrior.from_pretrained(folder, device="cpu")
    run = TextTo3D(preset_config("toy-cpu", "a cat", steps=4, batch_size=8, prior_resolution=32), prior=prior)
    run.run()
    run.phi.remove()
    elevations = torch.cat(drawn)
    assert run.config.cameras.max_elevation == 20.0 and "cameras.max_elevation" in run.config.from_recipe
    assert run.config.cameras.min_elevation == -40.0 and "cameras.min_elevation" in run.config.from_recipe
    assert elevations.max() <= 20.0 and elevations.max() > 10.0
    assert elevations.min() >= -40.0 and elevations.min() < -30.0
    for bad in (dict(max_elevation=95.0), dict(min_elevation=-91.0), dict(min_elevation=20.0, max_elevation=20.0)):
        write_recipe(folder, Recipe(name="x", **bad))
        with pytest.raises(UserInputError, match="out-of-range"):
            DiffusionPrior.from_pretrained(folder, device="cpu")


def test_the_lowest_camera_must_be_below_the_highest(tiny_eps_dir):
    """A range the user set upside down is refused before training, naming the flag and the fix."""
    prior = DiffusionPrior.from_pretrained(tiny_eps_dir, device="cpu")
    for values, problem in (({"cameras.min_elevation": 50.0}, "(50°) is not below the highest (45°)"),  # recipe's
                            ({"cameras.min_elevation": 10.0, "cameras.max_elevation": 10.0}, "(10°) is not below"),
                            ({"cameras.min_elevation": -95.0}, "-95")):
        with pytest.raises(UserInputError) as caught:
            make_run(prior, NeRFGeneratorSpec(), {"prompt": "a cat", "steps": 1, **values})
        assert caught.value.input_name == "cameras.min_elevation" and problem in caught.value.problem
        assert caught.value.render(settings.flag_of).startswith("--min-elevation: ")


def test_elevation_sampling_draws_what_it_names():
    """degrees: uniform in the angle (the stream of draws as before the choice existed); sphere: uniform in sin e
    (equal area on the sphere); mixed: one of the two per batch (the official code's sampler)."""
    import math

    def elevations(sampling: str, batches: int = 400, batch: int = 25) -> torch.Tensor:
        ranges = CameraRanges(min_elevation=-10.0, max_elevation=80.0, elevation_sampling=sampling)
        g = torch.Generator().manual_seed(0)
        return torch.cat([sample_cameras(batch, ranges, 8, 8, g).elevation for _ in range(batches)])

    reference = torch.Generator().manual_seed(0)
    assert torch.allclose(sample_cameras(25, CameraRanges(-10.0, 80.0, "degrees"), 8, 8,
                                         torch.Generator().manual_seed(0)).elevation,
                          -10.0 + 90.0 * torch.rand(25, generator=reference))
    sin_45 = (math.sin(math.radians(80)) - math.sin(math.radians(45))) / (math.sin(math.radians(80)) + math.sin(
        math.radians(10)))  # 0.24 of equal-area views lie above 45°; 35/90 = 0.39 of angle-uniform ones
    share = {s: float((elevations(s) > 45.0).float().mean()) for s in ("degrees", "sphere", "mixed")}
    assert abs(share["degrees"] - 35 / 90) < 0.015 and abs(share["sphere"] - sin_45) < 0.015
    assert abs(share["mixed"] - (35 / 90 + sin_45) / 2) < 0.03
    for s in ("degrees", "sphere", "mixed"):
        e = elevations(s, batches=40)
        assert e.min() >= -10.0 and e.max() <= 80.0
    # one coin per batch: each batch's share above 45° sits near one kind's (0.39 or 0.24), not near their mean (a
    # coin per camera would put every batch of 200 within about ±0.03 of it)
    above = (elevations("mixed", batches=200, batch=200).view(200, 200) > 45.0).float().mean(1)
    assert float((above - (35 / 90 + sin_45) / 2).abs().mean()) > 0.05
    with pytest.raises(ValueError, match="resolve"):
        sample_cameras(1, CameraRanges(elevation_sampling=None), 8, 8, torch.Generator())


def test_bad_recipe_files_are_named_errors(tiny_v_dir, tmp_path):
    assert tuple(LORA_TARGETS) == LORA_TARGET_CHOICES  # the recipe validates the names φ knows
    assert settings.BY_FIELD["phi.lora_targets"].choices == LORA_TARGET_CHOICES  # and the settings offer
    assert settings.BY_FIELD["distill.weighting"].choices == WEIGHTINGS  # the table's values are the engine's
    assert settings.BY_FIELD["cameras.elevation_sampling"].choices == ELEVATION_SAMPLINGS
    folder = shutil.copytree(tiny_v_dir, tmp_path / "model")
    (folder / RECIPE_FILE).write_text(json.dumps({"guidance": 3}))
    with pytest.raises(UserInputError, match="unknown keys"):
        DiffusionPrior.from_pretrained(folder, device="cpu")
    (folder / RECIPE_FILE).write_text(json.dumps({"background": "grey"}))
    with pytest.raises(UserInputError, match="background"):
        DiffusionPrior.from_pretrained(folder, device="cpu")
    (folder / RECIPE_FILE).write_text(json.dumps({"weighting_2d": "flat"}))
    with pytest.raises(UserInputError, match="weighting_2d"):
        DiffusionPrior.from_pretrained(folder, device="cpu")
    for jitter in (-1, 1.5):
        (folder / RECIPE_FILE).write_text(json.dumps({"jitter_2d": jitter}))
        with pytest.raises(UserInputError, match="out-of-range"):
            DiffusionPrior.from_pretrained(folder, device="cpu")
    for key in ("phi_noise", "phi_noise_2d"):
        (folder / RECIPE_FILE).write_text(json.dumps({key: "reused"}))
        with pytest.raises(UserInputError, match=key):
            DiffusionPrior.from_pretrained(folder, device="cpu")
    for key, value in (("max_elevation", "80"), ("guidance_scale", None), ("overhead_elevation", True)):
        (folder / RECIPE_FILE).write_text(json.dumps({key: value}))  # typed as a string, null, a bool
        with pytest.raises(UserInputError, match=f"{key} is .*, not a finite number"):
            DiffusionPrior.from_pretrained(folder, device="cpu")
    (folder / RECIPE_FILE).write_text(json.dumps({"elevation_sampling": "cosine"}))
    with pytest.raises(UserInputError, match="elevation_sampling 'cosine' is not one of mixed, degrees, sphere"):
        DiffusionPrior.from_pretrained(folder, device="cpu")
    (folder / RECIPE_FILE).write_text(json.dumps({"lora_targets": "convs"}))
    with pytest.raises(UserInputError, match="lora_targets"):
        DiffusionPrior.from_pretrained(folder, device="cpu")
    (folder / RECIPE_FILE).write_text("{")
    with pytest.raises(UserInputError, match="not valid JSON"):
        DiffusionPrior.from_pretrained(folder, device="cpu")


def test_pixel_start_matches_the_background_the_prior_saw(tiny_v_dir):
    prior = DiffusionPrior.from_pretrained(tiny_v_dir, device="cpu")
    for background, mean in (("white", 1.0), ("random", 0.5), ("black", 0.0)):
        image = ImageGenerator(prior, 32, "pixel", torch.Generator().manual_seed(0), background)
        start = (image.param.detach() + 1.0) / 2.0  # pixel-space prior: θ is the image in [-1, 1]
        assert abs(float(start.mean()) - mean) < 0.02


def test_cli_records_each_value_and_where_it_came_from(tiny_v_dir, tmp_path):
    out = tmp_path / "run"
    assert cli.main(["distill-2d", "--model", str(tiny_v_dir), "--prompt", "a cat", "--steps", "1", "--size", "32",
                     "--cfg", "4", "--out", str(out)]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["distill"]["guidance_scale"] == 4.0
    assert "distill.guidance_scale" not in record["config"]["from_recipe"]
    assert {"background", "distill.t_min", "distill.t_max", "phi.lr"} <= set(record["config"]["from_recipe"])
    assert record["recipe"]["name"] == OFFICIAL.name
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["text-to-3d"].format_help()
    assert " ".join(help_text.split()).count("from the prior's recipe") >= 5  # cfg, t range, background, φ lr, sparsity


def test_prompts_as_people_type_them():
    aliases = TOY_RECIPE.prompt_aliases
    assert apply_aliases("An Orange Cone", aliases) == "a Orange Cone"
    assert apply_aliases("the blue torus, side view", aliases) == "a blue torus, side view"
    assert apply_aliases("another banana", aliases) == "another banana"  # whole words only
    prior = DiffusionPrior.from_pretrained(default_prior_path(), device="cpu")
    same = prior.encode_prompt(["a orange cone", "an orange cone", "An Orange Cone", "The orange cone"])
    assert all(torch.equal(same[0], e) for e in same[1:])
    assert parse_toy_prompt("An Orange Cone") == ("cone", "orange")
    with pytest.raises(UserInputError, match="colours: red"):
        parse_toy_prompt("a pink cube")


def test_harness_and_2d_spec_use_the_recipe():
    prior = DiffusionPrior.from_pretrained(default_prior_path(), device="cpu")
    run = make_run(prior, ImageGeneratorSpec(), {"prompt": "a blue sphere", "steps": 1})
    assert run.config.background == "white" and run.config.distill.guidance_scale == TOY_RECIPE.guidance_scale
    assert float(run.images().mean()) > 0.9  # the 2D image starts white, as the toy prior's training images are
    # the toy prior's 2D runs have their own w(t); its 3D runs (test above) the general one
    assert run.config.distill.weighting == TOY_RECIPE.weighting_2d == "uniform" != TOY_RECIPE.weighting
    # one widget serves both modes (the Train Loop node): its default text names both of the toy prior's values
    text = settings.default_text(settings.BY_FIELD["distill.weighting"], "3d")
    assert f"toy prior {TOY_RECIPE.weighting} in 3D, {TOY_RECIPE.weighting_2d} in 2D" in text
    assert "in 2D" not in settings.default_text(settings.BY_FIELD["distill.weighting"], "2d")
    assert "distill.weighting" in run.config.from_recipe
    assert run.config.jitter == run.image.jitter == TOY_RECIPE.jitter_2d == 1 and "jitter" in run.config.from_recipe
    # and their own φ noise: shared in 3D, fresh in 2D (where the 2D recipe was measured)
    assert run.config.distill.phi_noise == TOY_RECIPE.phi_noise_2d == "fresh" != TOY_RECIPE.phi_noise
    assert "distill.phi_noise" in run.config.from_recipe
    run.phi.remove()
    run = make_run(prior, ImageGeneratorSpec(jitter=0), {"prompt": "a blue sphere", "steps": 1, "distill.weighting": "sds"})
    assert run.config.distill.weighting == "sds" and "distill.weighting" not in run.config.from_recipe
    assert run.image.jitter == 0 and "jitter" not in run.config.from_recipe
    run.phi.remove()


def test_2d_weighting_and_phi_noise_fall_back_to_the_general_ones(tiny_v_dir, tmp_path):
    folder = shutil.copytree(tiny_v_dir, tmp_path / "model")
    cases = ((Recipe(name="a", weighting="uniform", phi_noise="shared"), ("uniform", "shared"), ("uniform", "shared")),
             (Recipe(name="b", weighting_2d="sigma_over_alpha", phi_noise_2d="shared"), ("sigma_over_alpha", "shared"),
              ("sds", "fresh")))
    for recipe, values_2d, values_3d in cases:
        write_recipe(folder, recipe)
        prior = DiffusionPrior.from_pretrained(folder, device="cpu")
        run = make_run(prior, ImageGeneratorSpec(size=32), {"prompt": "a cat", "steps": 1, "distill.method": "sds"})
        assert (run.config.distill.weighting, run.config.distill.phi_noise) == values_2d
        config = preset_config("low-vram", "a cat", steps=1, prior_resolution=32)
        config.distill.method = "sds"
        resolved = TextTo3D(config, prior=prior).config.distill
        assert (resolved.weighting, resolved.phi_noise) == values_3d


def test_2d_jitter_rolls_the_image_the_prior_sees_and_trains_every_pixel(tiny_v_dir, tmp_path):
    prior = DiffusionPrior.from_pretrained(tiny_v_dir, device="cpu")
    run = Distill2D(Distill2DConfig(prompt="a cat", steps=1, size=32), prior=prior)
    assert run.config.jitter == 0 and run.image.jitter == 0  # the official recipe never moves the image
    run.phi.remove()
    folder = shutil.copytree(tiny_v_dir, tmp_path / "model")
    write_recipe(folder, Recipe(name="rolled", jitter_2d=2))
    rolled = DiffusionPrior.from_pretrained(folder, device="cpu")
    for method, jitter, expected in (("asd", None, 2), ("vsd", None, 2), ("sds", None, 0), ("sds", 1, 1)):
        config = Distill2DConfig(prompt="a cat", steps=1, size=32, jitter=jitter)
        config.distill.method = method
        run = Distill2D(config, prior=rolled)
        assert run.image.jitter == expected, method  # SDS has no φ whose error a roll would spread: 0 unless asked
        assert ("jitter" in run.config.from_recipe) == (jitter is None)
        if run.phi is not None:
            run.phi.remove()
    image = ImageGenerator(prior, 32, "latent", torch.Generator().manual_seed(0), "white", jitter=2)
    rng, replay = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    shifts = set()
    for _ in range(40):
        x0 = image(rng)
        shift = tuple(torch.randint(-2, 3, (2,), generator=replay).tolist())
        assert torch.equal(x0, torch.roll(image.param, shift, dims=(-2, -1)))
        shifts.add(shift)
    assert len(shifts) > 10 and all(abs(d) <= 2 for s in shifts for d in s)
    weights = torch.randn_like(image.param)
    image.param.grad = None
    (image(torch.Generator().manual_seed(2)) * weights).sum().backward()
    shift = tuple(torch.randint(-2, 3, (2,), generator=torch.Generator().manual_seed(2)).tolist())
    assert torch.equal(image.param.grad, torch.roll(weights, [-d for d in shift], dims=(-2, -1)))  # every pixel
    still = ImageGenerator(prior, 32, "latent", torch.Generator().manual_seed(0), "white")
    rng = torch.Generator().manual_seed(3)
    state = rng.get_state()
    assert still(rng) is still.param and torch.equal(rng.get_state(), state)  # jitter 0 draws nothing
    with pytest.raises(UserInputError, match="^jitter"):
        Distill2D(Distill2DConfig(prompt="a cat", steps=1, size=32, jitter=-1), prior=prior)


def test_the_second_phase_cfg_comes_from_the_recipe_unless_the_user_chose_a_cfg(tiny_eps_dir, tmp_path):
    """The recipe's second-phase CFG fills a 3D run; a --cfg given alone holds all run; both given: both used."""
    folder = shutil.copytree(tiny_eps_dir, tmp_path / "model")
    write_recipe(folder, Recipe(name="x", guidance_scale=3.0, guidance_scale_annealed=2.0))
    prior = DiffusionPrior.from_pretrained(folder, device="cpu")
    cases = (({}, (3.0, 2.0)), ({"distill.guidance_scale": 5.0}, (5.0, None)),
             ({"distill.guidance_scale": 5.0, "distill.guidance_scale_annealed": 4.0}, (5.0, 4.0)),
             ({"distill.guidance_scale_annealed": 2.5}, (3.0, 2.5)))
    for values, expected in cases:
        run = make_run(prior, NeRFGeneratorSpec(), {"prompt": "a cat", "steps": 1, **values})
        assert (run.config.distill.guidance_scale, run.config.distill.guidance_scale_annealed) == expected, values
        assert ("distill.guidance_scale_annealed" in run.config.from_recipe) == (not values)
        run.phi.remove()
    library = preset_config("toy-cpu", "a cat", steps=1, prior_resolution=32)
    library.distill.guidance_scale = 5.0  # a library caller's own CFG holds all run, as a front door's does
    library_run = TextTo3D(library, prior=prior)
    chosen = library_run.config.distill
    assert (chosen.guidance_scale, chosen.guidance_scale_annealed) == (5.0, None)
    library_run.phi.remove()
    image_run = make_run(prior, ImageGeneratorSpec(size=None), {"prompt": "a cat", "steps": 1})
    assert image_run.config.distill.guidance_scale_annealed is None  # 2D runs have no second phase
    official = make_run(DiffusionPrior.from_pretrained(tiny_eps_dir, device="cpu"), NeRFGeneratorSpec(),
                        {"prompt": "a cat", "steps": 1})
    assert official.config.distill.guidance_scale_annealed is None  # the official recipe: the CFG holds
    official.phi.remove()
    with pytest.raises(UserInputError) as caught:
        make_run(prior, NeRFGeneratorSpec(), {"prompt": "a cat", "steps": 1, "distill.guidance_scale_annealed": -1.0})
    assert caught.value.render(settings.flag_of).startswith("--cfg-annealed: -1 is out of range")
    for bad in (0, -2.0, "2", True):
        (folder / RECIPE_FILE).write_text(json.dumps({"guidance_scale_annealed": bad}))
        with pytest.raises(UserInputError, match="guidance_scale_annealed is .*, not a guidance scale above 0"):
            DiffusionPrior.from_pretrained(folder, device="cpu")
    (folder / RECIPE_FILE).write_text(json.dumps({"guidance_scale_annealed": None}))  # null: the CFG holds
    assert DiffusionPrior.from_pretrained(folder, device="cpu").recipe.guidance_scale_annealed is None


def test_a_checkpoint_from_before_the_second_phase_cfg_resumes_with_one_cfg():
    import dataclasses

    from asd_engine.runs.configs import TextTo3DConfig

    saved = dataclasses.asdict(preset_config("toy-cpu", "a red cube", steps=1))
    del saved["distill"]["guidance_scale_annealed"]
    assert official_where_absent(saved, TextTo3DConfig)["distill"]["guidance_scale_annealed"] is None

"""Quality regression guards: a short deterministic run on the embedded prior must still make the prompt's object.

Each guard is one fixed-seed run with the toy prior's own recipe, scored by the quality harness's judges against
the analytic truth. The thresholds are the values measured when the guard was written (docs/quality.md) with a
margin, so a change that breaks distillation quality (a wrong sign, a lost recipe value, a background the prior
never saw) fails CI. A blob that never learned anything does not pass: the untrained NeRF's colour error is ~0.38.
"""

from __future__ import annotations

import torch

from asd_engine.prior.diffusion import DiffusionPrior
from asd_engine.toy.quality import evaluate_nerf
from asd_engine.runs.plan import ImageGeneratorSpec, NeRFGeneratorSpec, make_run
from asd_engine.toy.data import COLOURS, SHAPES, ToyJudge
from asd_engine.prior import default_prior_path

# measured on this project's 2-core CPU with the prior and recipe in asd_engine/assets/toy-prior, 1 thread: the prior
# fine-tuned on views up to 80°, cameras up to 80° drawn as the official code draws them (elevation_sampling "mixed"):
# IoU 0.801, colour error 0.105, area ratio 0.83 in 86 s; uniform in degrees (until 2026-12-07): 0.811 / 0.100 / 1.17
# (300 steps: 0.845 / 0.105 / 1.02; its colour settles later, 0.065 at 900 steps). The prior before it (views up to
# 45°): 0.852 / 0.042 / 1.13; with fresh φ noise 0.841 / 0.060 / 0.89; with the permanent blob 0.874 / 0.057 / 0.95;
# on the first-release prior 0.859 / 0.075 / 1.03. The untrained blob: IoU 0.81, colour error 0.38, so the IoU alone
# would not catch a broken run, the colour does; the previous recipe's 0.18 fails too.
GUARD_3D = {"prompt": "a red cube", "steps": 200, "iou": 0.80, "colour_error": 0.105}
# 2D: SDS, and ASD, whose images were speckled until the sixth round (w = 1 and a falling learning rate in 2D): then
# ASD's red read as orange. Measured with 1 thread: red cube, both judges right, border std 0.029 and no foreground
# pixel in the 3-pixel frame, in 51 s (seventh round, with the 2D jitter of 1 px; without it 0.032 and 3 foreground
# pixels in the frame, the corner specks; with 1 - ᾱ and the same falling rate, VSD's border std was 0.055).
# Since the prior's fine-tune on views up to 80° (issue 30) the guard runs 300 steps (the Train Loop node's and the
# harness's 2D default): at 150 steps SDS's sphere on the new weights has straight sides and the scale-normalised
# judge reads it as a cube in seeds 0-2; at 300 steps all three are judged sphere and blue by both judges.
GUARD_2D = {"prompt": "a blue sphere", "steps": 300}
GUARD_2D_ASD = {"prompt": "a red cube", "steps": 300, "border_std": 0.029}


def test_3d_run_makes_the_prompts_object():
    prior = DiffusionPrior.from_pretrained(default_prior_path(), device="cpu")
    run = make_run(prior, NeRFGeneratorSpec(seed=0), {"prompt": GUARD_3D["prompt"], "steps": GUARD_3D["steps"], "distill.method": "asd"})
    with torch.enable_grad():
        run.run()
    scores = evaluate_nerf(run.nerf, "cube", "red")
    run.phi.remove()
    assert scores["iou"] >= GUARD_3D["iou"] - 0.1, scores
    assert scores["colour_error"] <= GUARD_3D["colour_error"] + 0.05, scores
    assert 0.6 <= scores["area_ratio"] <= 1.5, scores


def test_2d_run_is_judged_the_prompts_shape_and_colour():
    prior = DiffusionPrior.from_pretrained(default_prior_path(), device="cpu")
    run = make_run(prior, ImageGeneratorSpec(seed=0), {"prompt": GUARD_2D["prompt"], "steps": GUARD_2D["steps"], "distill.method": "sds"})
    with torch.enable_grad():
        run.run()
    shape, colour = ToyJudge(bank_per_shape=100, scale_normalised=True)(run.images())
    assert SHAPES[int(shape)] == "sphere" and list(COLOURS)[int(colour)] == "blue"


def test_2d_asd_makes_a_clean_image_of_the_prompts_object():
    prior = DiffusionPrior.from_pretrained(default_prior_path(), device="cpu")
    run = make_run(prior, ImageGeneratorSpec(seed=0), {"prompt": GUARD_2D_ASD["prompt"], "steps": GUARD_2D_ASD["steps"], "distill.method": "asd"})
    with torch.enable_grad():
        run.run()
    run.phi.remove()
    image = run.images()
    for judge in (ToyJudge(bank_per_shape=100), ToyJudge(bank_per_shape=100, scale_normalised=True)):
        shape, colour = judge(image)
        assert SHAPES[int(shape)] == "cube" and list(COLOURS)[int(colour)] == "red", judge.scale_normalised
    border = torch.ones(image.shape[-2:], dtype=torch.bool)
    border[3:-3, 3:-3] = False  # the 3-pixel frame, flat white in the truth: the speckle shows there
    assert float(image[0][:, border].std()) <= GUARD_2D_ASD["border_std"] + 0.013
    assert not judge.foreground(image)[0][border].any()  # no speck the scale-normalised judge would count

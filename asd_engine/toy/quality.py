"""Quality harness: does ASD beat VSD and SDS? Measured against analytic ground truth on the embedded prior.

3D (``mode="3d"``): for each method × prompt × seed a toy-cpu text-to-3D run, then the NeRF is rendered from the
evaluation orbit (elevation 15°, distance 1.5, fov 70°, 8 views) and compared with exact renders of the prompt's
shape and colour from the same cameras: silhouette IoU (maximised over rotations about the up axis: the shapes
are symmetric or nearly), foreground colour error (mean absolute RGB difference of mean colours) and the
silhouette area ratio (predicted ÷ true: above 1 the object came out too large). The low orbit sees a torus as a flat
ring whose hole is a thin line, so a disc scores as well as a torus there; the **top IoU** compares silhouettes from
4 views at 75° elevation, and the **hole opening** is the mean transparency (1 − alpha) of the NeRF over the true
shape's holes in those views (the pixels its filled silhouette adds: only the torus has one; 1 = as open as the
truth, 0 = a disc). The **geometry** (:func:`evaluate_geometry`) judges what ``mesh.glb`` holds: the solid inside the
export's isosurface — the torus's hole seen from above and its axis —, the solid's reach and height, and the share of
the field's opacity floating away from the true surface.
2D (``mode="2d"``): distill-2d runs judged by :class:`ToyJudge` (is the shape right, is the colour right).
Results: ``quality.json`` (every run and the per-method summary with the spread across seeds), ``grid.png``
(methods × prompts, first seed), ``pictures/`` (every run's final picture), ``checkpoints/`` (3D: every run's final
checkpoint) and ``runs.jsonl`` (the journal that lets a stopped harness resume).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserInputError
from ..images import save_png
from ..runs.configs import EXPORT_DEFAULTS, preset_config
from ..scene.cameras import MIN_ELEVATION_DEGREES
from .data import COLOURS, SHAPES, best_rotation_iou, colour_error, enclosed_holes, truth_views

EVAL_VIEWS, EVAL_SIZE = 8, 64
TOP_VIEWS, TOP_ELEVATION = 4, 75.0  # seen from above: a torus's hole (true centre opacity 0.03 at 64 px)


def parse_toy_prompt(prompt: str) -> tuple[str, str]:
    """``"a red cube"`` → ("cube", "red"); the harness can only judge prompts of the toy vocabulary."""
    words = prompt.lower().replace(",", " ").split()
    shapes = [w for w in words if w in SHAPES]
    colours = [w for w in words if w in COLOURS]
    if len(shapes) != 1 or len(colours) != 1:
        raise UserInputError("prompts", f"'{prompt}' is not one colour and one shape of the toy vocabulary",
                             f"use e.g. 'a red cube' (colours: {', '.join(COLOURS)}; shapes: {', '.join(SHAPES)})")
    return shapes[0], colours[0]


@torch.no_grad()
def evaluate_nerf(nerf, shape: str, colour: str) -> dict[str, float]:
    """Silhouette IoU and colour error of ``nerf`` against the analytic truth from the evaluation orbit."""
    from ..scene.export import render_turntable

    turntable = render_turntable(nerf, views=EVAL_VIEWS, size=EVAL_SIZE)
    images, alpha = turntable.rgb.permute(0, 3, 1, 2), turntable.alpha.permute(0, 3, 1, 2)
    truth, truth_alpha = truth_views(shape, colour, EVAL_VIEWS, EVAL_SIZE)
    iou, shift = best_rotation_iou(alpha, truth_alpha)
    # IoU alone cannot tell a too-large object from a too-small one; the silhouette area ratio can (1 = right size)
    area_ratio = float((alpha > 0.5).sum() / (truth_alpha > 0.5).sum().clamp_min(1))
    top = render_turntable(nerf, views=TOP_VIEWS, size=EVAL_SIZE, elevation=TOP_ELEVATION).alpha.permute(0, 3, 1, 2)
    _, top_truth_alpha = truth_views(shape, colour, TOP_VIEWS, EVAL_SIZE, elevation=TOP_ELEVATION)
    top_iou, _ = best_rotation_iou(top, top_truth_alpha)
    return {"iou": iou, "colour_error": colour_error(images, alpha, truth, truth_alpha), "rotation_views": shift,
            "area_ratio": area_ratio, "top_iou": top_iou, "hole_opening": hole_opening(top, top_truth_alpha)}


GEOMETRY_RESOLUTION = EXPORT_DEFAULTS["toy-cpu"]["mesh_resolution"]  # the harness's runs are toy-cpu runs
MESH_LEVEL = EXPORT_DEFAULTS["toy-cpu"]["mesh_threshold"]
FLOATER_MARGIN = 0.1        # density further than this outside the true surface counts as floating
AXIS_RADIUS = 0.04          # "the axis": within this distance of the z axis (the torus's hole has radius 0.17)


def grid_points(radius: float, n: int) -> torch.Tensor:
    """The points of the ``n``³ grid over the scene cube ``[-radius, radius]³`` that ``export.density_grid`` samples,
    ``[n³, 3]`` in its (x, y, z) order."""
    axis = torch.linspace(-radius, radius, n)
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)


@torch.no_grad()
def evaluate_geometry(nerf, shape: str, level: float) -> dict[str, float]:
    """What ``mesh.glb`` would hold, against the truth: the solid where the density exceeds the mesh's isosurface
    ``level`` (the toy-cpu export's 5) on its 128³ grid over the scene cube.

    - ``extent_xy`` / ``extent_z``: the largest connected part's reach from the up axis and its height ÷ the truth's;
    - ``floaters``: the share of the field's opacity (alpha per marching step, summed over the grid) lying further than
      ``FLOATER_MARGIN`` outside the true surface and not in the largest part (haze, detached bits): 0 = none;
    - ``overgrowth``: the same share inside the largest part (the object grown past the truth, e.g. a pedestal);
    - tori only (NaN otherwise): ``mesh_hole_opening``, the share of the true hole's columns (seen from above) that
      the solid leaves empty (truth: 1), and ``axis_filled``, the length of the solid along the z axis (within
      ``AXIS_RADIUS``) ÷ the ring's height (truth: 0; a column running the ring's height: 1).
    """
    import numpy as np
    from scipy import ndimage

    from ..scene.export import density_grid
    from .data import shape_sdf

    n, radius = GEOMETRY_RESOLUTION, nerf.field_config.radius
    density = torch.from_numpy(density_grid(nerf, np.full(3, -radius), np.full(3, radius), n))   # [n, n, n] x, y, z
    points = grid_points(radius, n)
    sdf = shape_sdf(shape, points).view(n, n, n)
    solid, truth = (density > level).numpy(), (sdf < 0).numpy()
    labels, count = ndimage.label(solid)
    if count:
        largest = labels == 1 + int(torch.tensor(ndimage.sum(solid, labels, range(1, count + 1))).argmax())
    else:
        largest = solid
    alpha = nerf.step_alpha(density.clamp_min(0))
    outside, attached = sdf > FLOATER_MARGIN, torch.from_numpy(largest)
    total = alpha.sum().clamp_min(1e-12)
    result = {"floaters": float(alpha[outside & ~attached].sum() / total),
              "overgrowth": float(alpha[outside & attached].sum() / total)}
    radial = torch.sqrt(points[:, 0] ** 2 + points[:, 1] ** 2).view(n, n, n)[:, :, 0]   # [n, n] over (x, y)
    # width as the farthest reach from the up axis: the same for any turn of the object about it
    reach = lambda mask: float(radial[torch.from_numpy(mask.any(axis=2))].max()) if mask.any() else 0.0  # noqa: E731
    height = lambda mask: int(mask.any(axis=(0, 1)).sum())  # noqa: E731
    result["extent_xy"] = reach(largest) / max(reach(truth), 1e-6)
    result["extent_z"] = height(largest) / max(height(truth), 1)
    result["mesh_hole_opening"] = result["axis_filled"] = float("nan")
    if shape == "torus":
        covered = torch.from_numpy(solid.any(axis=2))
        hole = (~torch.from_numpy(truth.any(axis=2))) & (radial < 0.3)      # the true hole's columns, from above
        result["mesh_hole_opening"] = float((~covered[hole]).float().mean())
        on_axis = torch.from_numpy(solid)[radial < AXIS_RADIUS].any(dim=0)   # [n] along z
        result["axis_filled"] = float(on_axis.sum()) / max(height(truth), 1)
    return result


def _geometry_of_checkpoint(directory: Path, shape: str) -> dict[str, float]:
    from ..runs.text_to_3d import load_nerf

    nerf, _, _ = load_nerf(directory)
    return evaluate_geometry(nerf, shape, MESH_LEVEL)


def hole_opening(alpha: torch.Tensor, truth_alpha: torch.Tensor) -> float:
    """Mean ``1 - alpha`` of ``alpha [V, 1, H, W]`` over the holes of the truth's silhouettes (the pixels that
    filling them adds); NaN when the truth has no hole (every shape but the torus)."""
    holes = enclosed_holes(truth_alpha[:, 0] > 0.5)
    if not holes.any():
        return float("nan")
    return float((1.0 - alpha[:, 0].cpu().clamp(0, 1))[holes].mean())


@dataclass
class QualitySettings:
    methods: list[str]
    prompts: list[str]
    seeds: int = 3
    steps: int | None = None          # None: the preset's default
    mode: str = "3d"
    model: str | None = None          # None: the embedded prior
    phi_noise: str | None = None      # None: the prior's recipe (toy prior: shared; Stable Diffusion: fresh)
    guidance_scale: float | None = None  # None: the prior's recipe (toy prior: 3; the paper's SD recipe: 7.5)
    field_backend: str = "auto"       # 3D: the hash grid's implementation (scene.field.FIELD_BACKENDS)
    lambda_haze: float = 0.0          # 3D: the haze term's weight (TextTo3DConfig.lambda_haze; 0: off, the default)
    min_elevation: float | None = None  # 3D: the training cameras' lowest elevation; None: the prior's recipe
    # 3D: the second phase's CFG; None: the prior's recipe, or one CFG all run when `guidance_scale` is given alone
    guidance_scale_annealed: float | None = None
    lr_decay_to: float | None = None  # 3D: where the NeRF's learning rates fall to; None: the toy-cpu preset's
    batch_size: int | None = None     # 3D: cameras per step; None: the toy-cpu preset's


def check_quality_settings(settings: QualitySettings) -> list[tuple[str, str]]:
    """Refuse a harness that would measure nothing or cannot run, before any model is loaded; returns each
    prompt's ``(shape, colour)``."""
    import math

    from ..distill import METHODS
    from ..prior import default_prior_path
    from ..prior.recipe import read_recipe
    from ..runs.settings import check_setting

    if settings.mode not in ("3d", "2d"):
        raise UserInputError("mode", f"unknown mode '{settings.mode}'", "use 3d or 2d")
    if not settings.methods:
        raise UserInputError("methods", "no method given", f"name one or more of {', '.join(METHODS)}, "
                             "comma-separated (e.g. asd,vsd)")
    for method in settings.methods:
        if method not in METHODS:
            raise UserInputError("methods", f"unknown method '{method}'", f"use a comma list of {', '.join(METHODS)}")
    if not settings.prompts:
        raise UserInputError("prompts", "no prompt given", "give one or more toy prompts, semicolon-separated "
                             "(e.g. 'a red cube;a green torus')")
    if isinstance(settings.seeds, bool) or not isinstance(settings.seeds, int) or settings.seeds < 1:
        raise UserInputError("seeds", f"{settings.seeds!r} seeds would measure nothing",
                             "use 1 or more seeds per prompt (default 3)")
    if settings.steps is not None and (isinstance(settings.steps, bool) or not isinstance(settings.steps, int)
                                       or settings.steps < 1):
        raise UserInputError("steps", f"{settings.steps!r} is not a step count", "use 1 or more steps per run")
    if settings.guidance_scale is not None and not (math.isfinite(settings.guidance_scale)
                                                    and settings.guidance_scale >= 0):
        raise UserInputError("distill.guidance_scale", f"{settings.guidance_scale} is not a guidance scale",
                             "use a finite number ≥ 0 (the toy prior's recipe: 3)")
    check_setting("nerf_field.backend", settings.field_backend)  # the settings table's own check
    check_setting("distill.phi_noise", settings.phi_noise)
    check_setting("lambda_haze", settings.lambda_haze)
    # the 3D-only settings the harness takes when given (None: left out), and why a 2D harness refuses each
    three_d_only = (("cameras.min_elevation", settings.min_elevation, "2D runs have no cameras"),
                    ("distill.guidance_scale_annealed", settings.guidance_scale_annealed,
                     "2D runs have no second phase"),
                    ("lr_decay_to", settings.lr_decay_to, "the harness's 2D runs keep the 2D default"),
                    ("batch_size", settings.batch_size, "2D runs distil one image, not a batch of cameras"))
    for field, value, _ in three_d_only:
        check_setting(field, value)
    if settings.lambda_haze and settings.mode != "3d":
        raise UserInputError("lambda_haze", "the haze term is a 3D regulariser", "leave it at 0 when mode is 2d")
    for field, value, why in three_d_only:
        if value is not None and settings.mode != "3d":
            raise UserInputError(field, why, "leave it out when mode is 2d")
    prior_folder = Path(settings.model or default_prior_path())
    if settings.min_elevation is not None and prior_folder.is_dir():  # the harness has no --max-elevation: the
        top = read_recipe(prior_folder).max_elevation                  # prior's recipe sets the cameras' top
        if settings.min_elevation >= top:
            raise UserInputError("cameras.min_elevation", f"the lowest camera ({settings.min_elevation:g}°) is not "
                                 f"below the prior's highest ({top:g}°)",
                                 f"use {{=cameras.min_elevation}} below {top:g}")
    return [parse_toy_prompt(p) for p in settings.prompts]


def _grid(rows: list[list[torch.Tensor]]) -> torch.Tensor:
    """Rows of ``[3, H, W]`` images → one ``[3, rows·H, cols·W]`` image."""
    return torch.cat([torch.cat(row, dim=2) for row in rows], dim=1)


# a run's identity in the journal; min_elevation, guidance_scale_annealed, lr_decay_to and batch_size are the values
# used (3D; None in 2D), not "from the recipe"; guidance_scale_annealed is None when the CFG held all run
RUN_FIELDS = ("mode", "method", "prompt", "seed", "steps", "phi_noise", "guidance_scale", "lambda_haze",
              "min_elevation", "guidance_scale_annealed", "lr_decay_to", "batch_size")
# what a journal line written before the field existed ran with
RUN_FIELD_DEFAULTS = {"lambda_haze": 0.0, "guidance_scale_annealed": None}


def _run_key(record: dict) -> tuple:
    # before min_elevation, lr_decay_to and batch_size were journalled, every 3D run's cameras started at the
    # official -10°, its learning rates held, and it rendered one camera a step
    three_d = record["mode"] == "3d"
    defaults = dict(RUN_FIELD_DEFAULTS, min_elevation=MIN_ELEVATION_DEGREES if three_d else None,
                    lr_decay_to=1.0 if three_d else None, batch_size=1 if three_d else None)
    return tuple(record[name] if name in record else defaults[name] for name in RUN_FIELDS)


def _read_journal(journal: Path, input_name: str) -> dict[tuple, dict]:
    """A harness journal's runs by their identity; a run journalled twice (rescored with newer metrics) as last
    written. A line that is not a run, or a journal that is not text, is a user error on ``input_name``."""
    try:
        lines = journal.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserInputError(input_name, f"{journal} cannot be read ({error})",
                             "use a folder the quality harness wrote ({=out}), or move this journal away") from None
    runs = {}
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                record = json.loads(line)
                runs[_run_key(record)] = record
            except (ValueError, KeyError, TypeError) as error:
                raise UserInputError(input_name, f"{journal} line {number} is not a harness run ({error!r})",
                                     "remove that line; the quality harness rerun with that {=out} remakes the run"
                                     ) from None
    return runs


def _run_name(method: str, prompt: str, seed: int) -> str:
    return f"{method}__{prompt.replace(' ', '_')}__seed{seed}"


def _picture_path(out: Path, method: str, prompt: str, seed: int) -> Path:
    """Every run's final picture is kept, so a better judge or metric can rescore a harness without rerunning it."""
    return out / "pictures" / f"{_run_name(method, prompt, seed)}.png"


def _checkpoint_path(out: Path, method: str, prompt: str, seed: int) -> Path:
    """3D runs keep their final checkpoint too (a few MB): a new 3D metric (the mesh, floaters) rescores from it."""
    return out / "checkpoints" / _run_name(method, prompt, seed)


def run_quality(settings: QualitySettings, out: Path, device: str | None = None,
                log: Callable[[str], None] = print) -> dict:
    """Every method × prompt × seed, scored; ``out/runs.jsonl`` grows by one line per finished run, so a harness
    that is stopped (Ctrl-C, a lost machine) and started again with the same ``out`` skips what it already did."""
    from ..distill import DistillConfig
    from ..images import read_png
    from ..prior import default_prior_path
    from ..prior.diffusion import DiffusionPrior
    from ..runs import settings as run_settings
    from ..runs.configs import TOY_CPU_STEPS
    from ..runs.plan import ImageGeneratorSpec, NeRFGeneratorSpec, make_run
    from .data import ToyJudge

    targets = check_quality_settings(settings)
    steps = settings.steps or (TOY_CPU_STEPS if settings.mode == "3d" else 300)  # 2d: the Train Loop node's default
    out.mkdir(parents=True, exist_ok=True)
    journal = out / "runs.jsonl"
    done = _read_journal(journal, "out") if journal.is_file() else {}
    prior = DiffusionPrior.from_pretrained(settings.model or default_prior_path(), device=device)
    # journals name the values used, not "from the recipe"
    noise_row = run_settings.BY_FIELD["distill.phi_noise"]
    min_elevation = None if settings.mode != "3d" else (  # the same for every method and prompt
        settings.min_elevation if settings.min_elevation is not None
        else run_settings.recipe_value(run_settings.BY_FIELD["cameras.min_elevation"], prior.recipe, "3d", "asd"))
    # the second phase's CFG as the resolver sets it; journalled as None when it equals the CFG (it held all run)
    cfg = run_settings.with_recipe(DistillConfig(guidance_scale=settings.guidance_scale,
                                                 guidance_scale_annealed=settings.guidance_scale_annealed),
                                   prior.recipe, settings.mode)
    late_cfg = None if cfg.guidance_scale_annealed in (None, cfg.guidance_scale) else cfg.guidance_scale_annealed
    preset = preset_config("toy-cpu", "")
    lr_decay_to = None if settings.mode != "3d" else (
        settings.lr_decay_to if settings.lr_decay_to is not None else preset.lr_decay_to)
    batch_size = None if settings.mode != "3d" else (
        settings.batch_size if settings.batch_size is not None else preset.batch_size)
    judges = None  # built on the first 2D run that needs them (rendering their mask banks takes a while)
    runs, grid_rows = [], []
    for method in settings.methods:
        row = []
        for prompt, (shape, colour) in zip(settings.prompts, targets):
            phi_noise = settings.phi_noise or run_settings.recipe_value(noise_row, prior.recipe, settings.mode, method)
            for seed in range(settings.seeds):
                identity = dict(zip(RUN_FIELDS, (settings.mode, method, prompt, seed, steps, phi_noise,
                                                 settings.guidance_scale, settings.lambda_haze, min_elevation,
                                                 late_cfg, lr_decay_to, batch_size)))
                key, picture_path = _run_key(identity), _picture_path(out, method, prompt, seed)
                if key in done and picture_path.is_file():
                    record = done[key]
                    checkpoint = _checkpoint_path(out, method, prompt, seed)
                    if settings.mode == "3d" and "overgrowth" not in record and checkpoint.is_dir():
                        record = dict(record, **_geometry_of_checkpoint(checkpoint, shape))  # a journal from before
                        with journal.open("a") as handle:                                # the geometry metrics
                            handle.write(json.dumps(record) + "\n")
                    runs.append(record)
                    if seed == 0:
                        row.append(read_png(picture_path)[0])
                    continue
                started = time.perf_counter()
                if settings.mode == "3d":
                    spec = NeRFGeneratorSpec(preset="toy-cpu", seed=seed, field_backend=settings.field_backend)
                else:
                    spec = ImageGeneratorSpec(size=None, seed=seed)
                values = {"prompt": prompt, "steps": steps, "distill.method": method, "distill.phi_noise": phi_noise,
                          "distill.guidance_scale": settings.guidance_scale}
                if settings.mode == "3d":
                    values["lambda_haze"], values["cameras.min_elevation"] = settings.lambda_haze, min_elevation
                    values["distill.guidance_scale_annealed"] = settings.guidance_scale_annealed
                    values["lr_decay_to"], values["batch_size"] = lr_decay_to, batch_size
                run = make_run(prior, spec, values)
                drift: list[float] = []
                with torch.enable_grad():
                    run.run(on_step=lambda info: drift.append(info.phi_drift))
                seconds = time.perf_counter() - started
                # the values the run actually used (from the prior's recipe unless the harness set them)
                used = dict(cfg=run.config.distill.guidance_scale, gamma=run.config.distill.gamma,
                            weighting=run.config.distill.weighting, background=run.config.background,
                            phi_lr=run.config.phi.lr if run.phi is not None else None,
                            lora_targets=run.config.phi.lora_targets if run.phi is not None else None)
                if settings.mode == "3d":
                    used["overhead_elevation"], used["blob_fade"] = run.config.overhead_elevation, run.config.blob_fade
                    used["min_elevation"], used["max_elevation"] = (run.config.cameras.min_elevation,
                                                                    run.config.cameras.max_elevation)
                    used["cfg_annealed"] = run.config.distill.guidance_scale_annealed
                    used["elevation_sampling"] = run.config.cameras.elevation_sampling
                    used["lambda_sparsity"], used["lambda_haze"] = run.config.lambda_sparsity, run.config.lambda_haze
                    used["field_backend"], used["lr_decay_to"] = run.nerf.field.backend, run.config.lr_decay_to
                    used["batch_size"] = run.config.batch_size
                else:
                    used["lr_decay_to"], used["jitter"] = run.config.lr_decay_to, run.config.jitter
                record = dict(identity, seconds=seconds, used=used)
                if drift and drift[-1] is not None:  # φ's distance from the prior over the last tenth of the run
                    record["phi_drift"] = statistics.fmean(drift[-max(1, len(drift) // 10):])
                if settings.mode == "3d":
                    record.update(evaluate_nerf(run.nerf, shape, colour))
                    record.update(evaluate_geometry(run.nerf, shape, MESH_LEVEL))
                    picture = run.preview()[0]
                    run.save_checkpoint(_checkpoint_path(out, method, prompt, seed))
                else:
                    picture = run.images()
                    judges = judges or {"": ToyJudge(), "_cropped": ToyJudge(scale_normalised=True)}
                    for suffix, judge in judges.items():  # as rendered, and scale-normalised (bounding-box crops)
                        judged_shape, judged_colour = judge(picture)
                        record[f"shape_right{suffix}"] = bool(judged_shape >= 0 and SHAPES[int(judged_shape)] == shape)
                        record[f"colour_right{suffix}"] = bool(
                            judged_colour >= 0 and list(COLOURS)[int(judged_colour)] == colour)
                    picture = torch.nn.functional.interpolate(picture, scale_factor=2, mode="nearest")[0]
                if run.phi is not None and hasattr(run.phi, "remove"):
                    run.phi.remove()
                save_png(picture, picture_path)
                if seed == 0:
                    row.append(picture.cpu())
                with journal.open("a") as handle:  # one whole line per run: a kill loses at most the current run
                    handle.write(json.dumps(record) + "\n")
                runs.append(record)
                log(json.dumps(record))
        grid_rows.append(row)
    summary = summarise(runs, settings.mode)
    result = {"settings": settings.__dict__, "summary": summary, "runs": runs}
    (out / "quality.json").write_text(json.dumps(result, indent=2))
    save_png(_grid(grid_rows), out / "grid.png")
    return result


def summarise(runs: list[dict], mode: str) -> dict[str, dict[str, float]]:
    """Per method: means over prompts and seeds, and the spread (std over seeds of the per-seed means)."""
    summary = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        seeds = sorted({r["seed"] for r in mine})
        keys = ("iou", "colour_error", "area_ratio", "top_iou", "hole_opening", "mesh_hole_opening", "axis_filled",
                "floaters", "overgrowth", "extent_xy", "extent_z") if mode == "3d" else (
            "shape_right", "colour_right", "shape_right_cropped", "colour_right_cropped")
        keys += ("phi_drift",)
        keys = tuple(k for k in keys if all(k in r for r in mine))  # journals from older versions lack some
        entry = {}
        for key in keys:
            defined = [r for r in mine if r[key] == r[key]]  # drop NaNs (e.g. the hole opening of a holeless shape)
            entry[key] = statistics.fmean(float(r[key]) for r in defined) if defined else float("nan")
            by_seed = {s: [float(r[key]) for r in defined if r["seed"] == s] for s in seeds}
            per_seed = [statistics.fmean(values) for values in by_seed.values() if values]
            entry[f"{key}_seed_std"] = statistics.pstdev(per_seed) if len(per_seed) > 1 else 0.0
        entry["seconds_per_run"] = statistics.fmean(r["seconds"] for r in mine)
        summary[method] = entry
    return summary


def markdown_table(result: dict) -> str:
    mode = result["settings"]["mode"]
    if mode == "3d":
        lines = ["| method | silhouette IoU ↑ | ± over seeds | colour error ↓ | ± over seeds | area ratio (1 = right) "
                 "| top IoU ↑ | hole opening ↑ | mesh: hole opening ↑ | mesh: axis filled ↓ | floaters ↓ | overgrowth ↓ "
                 "| mesh: reach / height (1 = right) | φ drift | s / run |",
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
                 "| ---: |"]
        for method, s in result["summary"].items():
            lines.append(f"| {method} | {s['iou']:.3f} | {s['iou_seed_std']:.3f} | {s['colour_error']:.3f} | "
                         f"{s['colour_error_seed_std']:.3f} | {_cell(s, 'area_ratio', '{:.2f}')} | "
                         f"{_cell(s, 'top_iou', '{:.3f}')} | {_cell(s, 'hole_opening', '{:.2f}')} | "
                         f"{_cell(s, 'mesh_hole_opening', '{:.2f}')} | {_cell(s, 'axis_filled', '{:.2f}')} | "
                         f"{_cell(s, 'floaters', '{:.4f}')} | {_cell(s, 'overgrowth', '{:.3f}')} | "
                         f"{_cell(s, 'extent_xy', '{:.2f}')} / {_cell(s, 'extent_z', '{:.2f}')} | "
                         f"{_cell(s, 'phi_drift', '{:.3f}')} | "
                         f"{s['seconds_per_run']:.0f} |")
    else:
        lines = ["| method | shape right ↑ | ± over seeds | colour right ↑ | ± over seeds | shape right, scale-normalised ↑ "
                 "| colour right, scale-normalised ↑ | φ drift | s / run |",
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for method, s in result["summary"].items():
            lines.append(f"| {method} | {100 * s['shape_right']:.0f} % | {100 * s['shape_right_seed_std']:.0f} | "
                         f"{100 * s['colour_right']:.0f} % | {100 * s['colour_right_seed_std']:.0f} | "
                         f"{_cell(s, 'shape_right_cropped', '{:.0%}')} | {_cell(s, 'colour_right_cropped', '{:.0%}')} | "
                         f"{_cell(s, 'phi_drift', '{:.3f}')} | {s['seconds_per_run']:.0f} |")
    if mode == "3d" and result.get("runs"):
        lines += ["", per_prompt_table(result["runs"])]
    return "\n".join(lines)


# The per-prompt target docs/quality.md reports: a prompt's mean over its seeds has IoU ≥ 0.85 and an
# area within 0.85–1.15 of the truth's; a torus's mesh keeps at least 0.8 of the true hole in every run.
TARGET_IOU, TARGET_AREA, TARGET_HOLE = 0.85, (0.85, 1.15), 0.8


def _mean(values: list[float]) -> float:
    defined = [float(v) for v in values if v == v]  # NaN: the metric does not apply (e.g. a cube's hole)
    return statistics.fmean(defined) if defined else float("nan")


def _holes(runs: list[dict]) -> list[float]:
    """The mesh hole openings of the runs that have one (tori; NaN or absent otherwise)."""
    openings = (r.get("mesh_hole_opening", float("nan")) for r in runs)
    return [h for h in openings if h == h]


def per_prompt(runs: list[dict]) -> list[dict]:
    """3D runs → one entry per method × prompt (in the runs' order): means over its seeds, the lowest hole among
    its runs and whether the mean meets the per-prompt target (``TARGET_IOU``, ``TARGET_AREA``)."""
    entries = []
    for method, prompt in dict.fromkeys((r["method"], r["prompt"]) for r in runs):
        mine = [r for r in runs if r["method"] == method and r["prompt"] == prompt]
        entry = {"method": method, "prompt": prompt, "runs": len(mine)}
        for key in ("iou", "area_ratio", "colour_error", "mesh_hole_opening", "axis_filled", "floaters"):
            entry[key] = _mean([r.get(key, float("nan")) for r in mine])
        holes = _holes(mine)
        entry["lowest_hole"] = min(holes) if holes else float("nan")
        entry["in_target"] = bool(entry["iou"] >= TARGET_IOU and TARGET_AREA[0] <= entry["area_ratio"] <= TARGET_AREA[1])
        entries.append(entry)
    return entries


def per_prompt_table(runs: list[dict]) -> str:
    """The per-prompt table of 3D runs and, per method, how many prompts meet the target and how many torus runs keep
    their hole (the counts docs/quality.md leads with)."""
    entries = per_prompt(runs)
    lines = ["| prompt | method | runs | IoU | area ratio | colour error | mesh: hole opening (lowest run) "
             "| mesh: axis filled | floaters | in target |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for e in entries:
        hole = "—" if e["lowest_hole"] != e["lowest_hole"] else f"{e['mesh_hole_opening']:.2f} ({e['lowest_hole']:.2f})"
        lines.append(f"| {e['prompt']} | {e['method']} | {e['runs']} | {e['iou']:.3f} | {e['area_ratio']:.3f} | "
                     f"{e['colour_error']:.3f} | {hole} | {_cell(e, 'axis_filled', '{:.2f}')} | "
                     f"{_cell(e, 'floaters', '{:.4f}')} | {'yes' if e['in_target'] else 'no'} |")
    lines.append("")
    for method in dict.fromkeys(e["method"] for e in entries):
        mine = [e for e in entries if e["method"] == method]
        holes = _holes([r for r in runs if r["method"] == method])
        line = (f"- {method}: {sum(e['in_target'] for e in mine)} of {len(mine)} prompts in the target (mean IoU ≥ "
                f"{TARGET_IOU}, area {TARGET_AREA[0]}–{TARGET_AREA[1]})")
        if holes:
            line += f"; {sum(h >= TARGET_HOLE for h in holes)} of {len(holes)} runs with a hole keep ≥ {TARGET_HOLE} of it"
        lines.append(line)
    return "\n".join(lines)


def read_journals(folders: list[Path]) -> list[dict]:
    """The runs of one or more harness folders (``runs.jsonl``), e.g. the halves of an evaluation split over two
    processes. A run journalled twice (rescored with newer metrics) counts once, as last written. Refuses folders
    without a journal, and runs of one method made with different settings (steps, CFG, φ's noise, ...), which
    a mean would silently mix."""
    runs: dict[tuple, dict] = {}
    for folder in folders:
        journal = Path(folder) / "runs.jsonl"
        if not journal.is_file():
            raise UserInputError("folders", f"{folder} has no runs.jsonl",
                                 "name folders written by the quality harness ({=out})")
        runs.update(_read_journal(journal, "folders"))
    if not runs:
        raise UserInputError("folders", "the journals hold no finished run", "wait for a run to finish, or name "
                             "another folder")
    if len({record["mode"] for record in runs.values()}) > 1:
        raise UserInputError("folders", "the journals mix 3D and 2D runs", "report each mode's folders separately")
    settings_of: dict[str, tuple] = {}
    for key in runs:
        fields = dict(zip(RUN_FIELDS, key))
        method = fields["method"]
        variant = tuple((name, fields[name]) for name in RUN_FIELDS if name not in ("method", "prompt", "seed"))
        if settings_of.setdefault(method, variant) != variant:
            differ = [name for (name, a), (_, b) in zip(settings_of[method], variant) if a != b]
            raise UserInputError("folders", f"the {method} runs were made with different {', '.join(differ)}",
                                 "report each setting's folders separately")
    return list(runs.values())


def report(folders: list[Path]) -> str:
    """Markdown tables (per method, and for 3D per prompt) of the runs that harness folders hold."""
    runs = read_journals(folders)
    mode = runs[0]["mode"]
    return markdown_table({"settings": {"mode": mode}, "summary": summarise(runs, mode), "runs": runs})


def _cell(summary: dict, key: str, fmt: str) -> str:
    """Absent (older journals) or NaN (no run had it, e.g. no torus for the hole opening) → "—"."""
    return fmt.format(summary[key]) if key in summary and summary[key] == summary[key] else "—"

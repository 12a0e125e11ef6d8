"""The embedded toy prior: a small text-to-image diffusion model trained here on :mod:`asd_engine.toy.data`.

It is an ordinary diffusers pipeline folder — ``UNet2DConditionModel`` (pixel space, 32 px), ``CLIPTextModel`` with
a ``CLIPTokenizer`` (vocab.json + merges.txt, loads offline), a ``DDIMScheduler`` — shipped in
``asd_engine/assets/toy-prior`` and loaded by the same :class:`DiffusionPrior` code as Stable Diffusion. It is the
default ``--model`` everywhere, and, because its training scenes have known 3D truth, it lets the quality harness
*measure* whether ASD beats VSD and SDS.

Schedule: v-prediction with zero-terminal-SNR betas and "trailing" timestep spacing, the known cure for the
grey/tinted-background bias of low-resolution pixel diffusion (the last training step is pure noise, so the
sampler starts where training did). Training: AdamW, warm-up then constant learning rate, 10 % caption dropout
for classifier-free guidance, EMA weights exported. Resumable: an atomic checkpoint every few hundred steps.

``python -m asd_engine train-toy-prior --work DIR [--steps N] [--export DIR] [--init DIR]`` (see docs/toy_prior.md);
``--init`` fine-tunes an exported prior (its weights and tokenizer) instead of starting from random weights.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import UserInputError
from ..prior import default_prior_path
from ..prior.recipe import read_recipe, write_recipe
from ..runs import checkpoint as ckpt
from ..scene.cameras import MAX_ELEVATION_DEGREES, VIEWS, sample_cameras
from .data import (COLOURS, SHAPES, caption, data_cameras, enclosed_holes, foreground_masks, render_shapes,
                   sample_batch)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


@dataclass
class ToyPriorConfig:
    size: int = 32
    batch_size: int = 32
    steps: int = 4000
    lr: float = 5e-4
    warmup_steps: int = 200
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    dataset_size: int = 40_000
    seed: int = 0
    unet_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention_heads: int = 4
    text_width: int = 64
    text_layers: int = 2
    max_length: int = 16
    checkpoint_every: int = 250
    # captions say "overhead view" above it (degrees); why 30: docs/engine.md#recipe-overhead_elevation
    overhead_elevation: float = 30.0
    # the training cameras' highest elevation (degrees; the lowest stays CameraRanges' -10); the exported recipe's
    # max_elevation, so distillation draws the views the prior saw: docs/toy_prior.md#training
    max_elevation: float = MAX_ELEVATION_DEGREES
    init: str | None = None     # a toy-prior pipeline folder to fine-tune (its tokenizer and weights); None: scratch


def all_captions() -> list[str]:
    return [caption(c, s, v) for c in COLOURS for s in SHAPES for v in (None, *VIEWS)]


def build_tokenizer(folder: Path, max_length: int):
    """A CLIP BPE tokenizer whose merges make every caption word one token (learned with the tokenizers library's
    BPE trainer on the captions); unknown words fall back to byte-level pieces."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Sequence([  # CLIP's pre-tokenisation
        pre_tokenizers.Split(Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                                   r"""[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True),
        ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=4000, min_frequency=1, initial_alphabet=ByteLevel.alphabet(),
                                  end_of_word_suffix="</w>", special_tokens=[BOS, EOS], show_progress=False)
    bpe.train_from_iterator(all_captions() * 4, trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    for char in ByteLevel.alphabet():  # every single byte can end a word, so no input maps to "unknown"
        vocab.setdefault(char + "</w>", len(vocab))
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True,
         "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}))
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def build_models(config: ToyPriorConfig, vocab_size: int, bos_id: int, eos_id: int):
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    n = len(config.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=config.size, in_channels=3, out_channels=3, block_out_channels=config.unet_channels,
        layers_per_block=config.layers_per_block,
        # no attention at full resolution (1024 tokens: the cost of the whole UNet), text cross-attention below
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=config.text_width, attention_head_dim=config.attention_heads,
        norm_num_groups=min(32, config.unet_channels[0]))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=config.text_width, intermediate_size=2 * config.text_width,
        num_hidden_layers=config.text_layers, num_attention_heads=4, max_position_embeddings=config.max_length,
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                              prediction_type="v_prediction", rescale_betas_zero_snr=True,
                              timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False)
    return unet, text_encoder, scheduler


def _load_pipeline(folder: Path):
    """``(tokenizer, unet, text_encoder, scheduler)`` of a toy-prior pipeline folder, to fine-tune it."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if not (folder / "unet").is_dir() or not (folder / "tokenizer").is_dir():
        raise UserInputError("init", f"'{folder}' is not a toy-prior pipeline folder (no unet/ or tokenizer/)",
                             "give a folder that train-toy-prior exported, e.g. asd_engine/assets/toy-prior")
    return (CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True),
            UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True),
            CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True),
            DDIMScheduler.from_pretrained(folder / "scheduler", local_files_only=True))


def save_pipeline(folder: Path, unet, text_encoder, tokenizer, scheduler, config: ToyPriorConfig,
                  extra: dict | None = None) -> Path:
    import diffusers

    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder / "unet")
    text_encoder.save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    scheduler.save_pretrained(folder / "scheduler")
    index = {"_class_name": "PixelSpaceTextToImagePipeline", "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    # the shipped recipe (asd_recipe.json), with the elevations these captions and cameras used
    write_recipe(folder, replace(read_recipe(default_prior_path()), overhead_elevation=config.overhead_elevation,
                                 max_elevation=config.max_elevation))
    (folder / "toy_prior.json").write_text(json.dumps({"training": asdict(config), **(extra or {})}, indent=2))
    return folder


def _dataset(config: ToyPriorConfig, tokenizer, work: Path, log: Callable[[str], None]) -> dict[str, torch.Tensor]:
    """Render (or reload) the cached training set: uint8 images, token ids, shape/colour labels."""
    from safetensors.torch import load_file, save_file

    top = "" if config.max_elevation == ToyPriorConfig.max_elevation else f"-top{config.max_elevation:g}"
    path = work / (f"dataset-seed{config.seed}-n{config.dataset_size}-px{config.size}"
                   f"-overhead{config.overhead_elevation:g}{top}.safetensors")
    if path.is_file():
        return load_file(str(path))
    g = torch.Generator().manual_seed(10_000 + config.seed)
    ranges = data_cameras(config.max_elevation)
    images, captions, shapes, colours = [], [], [], []
    started = time.time()
    for start in range(0, config.dataset_size, 256):
        batch = sample_batch(min(256, config.dataset_size - start), config.size, g, ranges,
                             overhead_elevation=config.overhead_elevation)
        images.append((batch.images * 255 + 0.5).clamp(0, 255).to(torch.uint8))
        captions += batch.captions
        shapes += batch.shapes
        colours += batch.colours
        if start % 5120 == 0:
            log(f"rendering the training set: {start + len(batch.captions)}/{config.dataset_size} "
                f"({time.time() - started:.0f} s)")
    ids = tokenizer(captions, padding="max_length", max_length=config.max_length, truncation=True,
                    return_tensors="pt").input_ids
    data = {"images": torch.cat(images).contiguous(), "ids": ids.contiguous(), "shapes": torch.tensor(shapes), "colours": torch.tensor(colours)}
    tmp = path.with_suffix(".tmp")
    save_file(data, str(tmp))
    tmp.rename(path)
    return data


def train_toy_prior(config: ToyPriorConfig, work: Path, export: Path | None = None,
                    log: Callable[[str], None] = print) -> Path:
    """Train (resuming from ``work/checkpoint`` if present) and export the EMA weights as a pipeline folder."""
    from tqdm import tqdm

    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    base = None
    if config.init:
        tokenizer, unet, text_encoder, scheduler = _load_pipeline(Path(config.init))
        info = Path(config.init) / "toy_prior.json"  # read now: the export may overwrite the folder it started from
        base = {k: v for k, v in json.loads(info.read_text()).items() if k != "loss_history"} if info.is_file() else {}
    else:
        tokenizer = build_tokenizer(work / "tokenizer", config.max_length)
        vocab = tokenizer.get_vocab()
        unet, text_encoder, scheduler = build_models(config, len(vocab), vocab[BOS], vocab[EOS])
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.01)
    rng = torch.Generator().manual_seed(config.seed)
    step, history, seconds_before = 0, [], 0.0
    state_dir = work / "checkpoint"
    if (state_dir / ckpt.META_FILE).is_file():
        tensors, meta = ckpt.load_checkpoint(state_dir)
        for prefix, module in (("unet.", unet), ("text.", text_encoder), ("ema_unet.", ema_unet), ("ema_text.", ema_text)):
            module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        ckpt.load_optimizer_state(optimizer, tensors, meta["optimizer"], "optimizer")
        rng.set_state(tensors["rng_state"])
        step, history, seconds_before = meta["step"], meta["history"], meta["seconds"]
        log(f"resumed from step {step}")
    data = _dataset(config, tokenizer, work, log)
    empty_ids = tokenizer([""], padding="max_length", max_length=config.max_length, return_tensors="pt").input_ids
    alphas = scheduler.alphas_cumprod.float()

    def save_state() -> None:
        tensors = {"rng_state": rng.get_state()}
        for prefix, module in (("unet.", unet), ("text.", text_encoder), ("ema_unet.", ema_unet), ("ema_text.", ema_text)):
            tensors.update({prefix + k: v for k, v in module.state_dict().items()})
        opt_tensors, opt_meta = ckpt.optimizer_state(optimizer, "optimizer")
        tensors.update(opt_tensors)
        ckpt.save_checkpoint(state_dir, tensors, {"kind": "toy-prior-training", "step": step, "history": history,
                                                  "seconds": seconds_before + time.time() - started,
                                                  "config": asdict(config), "optimizer": opt_meta})

    bar = tqdm(total=config.steps, initial=step, desc="toy prior", unit="step", dynamic_ncols=True)
    started, running = time.time(), []
    while step < config.steps:
        index = torch.randint(len(data["images"]), (config.batch_size,), generator=rng)
        x0 = data["images"][index].float() / 127.5 - 1.0
        ids = data["ids"][index].clone()
        drop = torch.rand(config.batch_size, generator=rng) < config.caption_dropout
        ids[drop] = empty_ids
        t = torch.randint(0, 1000, (config.batch_size,), generator=rng)
        eps = torch.randn(x0.shape, generator=rng)
        a = alphas[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - alphas[t]).sqrt().view(-1, 1, 1, 1)
        x_t, v = a * x0 + s * eps, a * eps - s * x0
        for group in optimizer.param_groups:
            group["lr"] = config.lr * min(1.0, (step + 1) / config.warmup_steps)
        pred = unet(x_t, t, encoder_hidden_states=text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, v)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_text, text_encoder)):
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(pl, 1.0 - config.ema_decay)
        step += 1
        running.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{sum(running[-50:]) / len(running[-50:]):.4f}", refresh=False)
        if step % 50 == 0:  # [step, mean loss of the last 50 steps, training seconds so far]
            history.append([step, sum(running[-50:]) / len(running[-50:]), seconds_before + time.time() - started])
        if step % config.checkpoint_every == 0 or step == config.steps:
            save_state()
    bar.close()
    export = export or work / "pipeline"
    extra = {"steps": step, "final_loss": history[-1][1] if history else None,
             "training_seconds": history[-1][2] if history else None, "loss_history": history}
    if base is not None:  # the fine-tuned prior's lineage: what it started from (without that run's loss curve)
        extra["fine_tuned_from"] = base
    return save_pipeline(export, ema_unet, ema_text, tokenizer, scheduler, config, extra)


@torch.no_grad()
def sample_images(prior, prompts: list[str], seeds: list[int], steps: int = 30, guidance_scale: float = 3.0,
                  size: int | None = None, guidance_interval: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Sample one image per (prompt, seed) with the prior's own scheduler class (DDIM for the toy prior) and CFG
    → ``[B, 3, H, W]`` in [0, 1]. Works for any pixel- or latent-space prior this engine loads.

    ``guidance_interval (lo, hi)``: CFG only at the sampler's steps whose t / T lies in [lo, hi]; the others use the
    plain conditional prediction (scale 1). It says at which noise levels guidance sets what a sample looks like
    (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval"; docs/history/quality-rounds.md#round-20)."""
    import diffusers
    from diffusers import DDIMScheduler, SchedulerMixin

    folder = Path(prior.source)
    index = json.loads((folder / "model_index.json").read_text())
    scheduler_class = getattr(diffusers, index["scheduler"][1], DDIMScheduler)
    if not issubclass(scheduler_class, SchedulerMixin):
        scheduler_class = DDIMScheduler
    scheduler = scheduler_class.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    scheduler.set_timesteps(steps)
    lo, hi = guidance_interval
    total = scheduler.config.num_train_timesteps
    side = size or int(prior.unet.config.sample_size) * prior.vae_scale_factor
    shape = prior.sample_shape(side)
    x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(prior.device)
    x = x * scheduler.init_noise_sigma
    cond, uncond = prior.encode_prompt(prompts), prior.encode_prompt([""] * len(prompts))
    for t in scheduler.timesteps:
        tt = torch.full((len(prompts),), int(t), device=prior.device)
        model_in = scheduler.scale_model_input(x, t)
        out = prior.model_output(torch.cat([model_in, model_in]), torch.cat([tt, tt]), torch.cat([uncond, cond]))
        out_u, out_c = out.chunk(2)
        scale = guidance_scale if lo <= int(t) / total <= hi else 1.0
        x = scheduler.step(out_u + scale * (out_c - out_u), t, x).prev_sample
    return prior.decode(x)


def config_summary(config: ToyPriorConfig) -> str:
    return (f"UNet {config.unet_channels} × {config.layers_per_block} layers, text {config.text_width}×"
            f"{config.text_layers}, {config.size} px, batch {config.batch_size}, {config.steps} steps")


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())



@torch.no_grad()
def prompt_fidelity(prior, per_prompt: int = 10, steps: int = 30, guidance_scale: float = 3.0,
                    seed: int = 0, judge=None) -> dict:
    """Share of samples whose colour / shape the :class:`ToyJudge` finds right, over every shape × colour prompt."""
    from .data import ToyJudge

    judge = judge or ToyJudge()
    colour_right, shape_right, total = 0, 0, 0
    per_class: dict[str, dict[str, float]] = {}
    for shape in SHAPES:
        for colour in COLOURS:
            prompt = caption(colour, shape, None)
            images = sample_images(prior, [prompt] * per_prompt, [seed * 10_000 + i for i in range(per_prompt)],
                                   steps=steps, guidance_scale=guidance_scale)
            judged_shape, judged_colour = judge(images)
            s = int((judged_shape == SHAPES.index(shape)).sum())
            c = int((judged_colour == list(COLOURS).index(colour)).sum())
            shape_right, colour_right, total = shape_right + s, colour_right + c, total + per_prompt
            per_class[prompt] = {"shape": s / per_prompt, "colour": c / per_prompt}
    return {"shape_right": shape_right / total, "colour_right": colour_right / total, "samples": total,
            "per_prompt": per_class, "sampler": {"steps": steps, "guidance_scale": guidance_scale}}


HOLE_MIN_PIXELS = 4  # a sample "has a hole" when its foreground encloses at least this many background pixels


@torch.no_grad()
def overhead_hole_rate(prior, per_colour: int = 24, steps: int = 30, guidance_scale: float = 3.0,
                       seed: int = 0) -> dict:
    """How often the prior draws a torus's hole where its training data shows one: the share of "a <colour> torus,
    overhead view" samples whose foreground (:func:`.data.foreground_masks`) encloses ≥ ``HOLE_MIN_PIXELS``
    background pixels, per colour. Beside it, ``data``: the same detector on exact renders from the trainer's
    overhead cameras (its elevations above the prior's ``overhead_elevation``), all of which show the hole in
    their alpha; at 32 px the detector misses the smallest ones, so ``data`` is the rate a prior that learned its data
    would reach. Why it is measured: distillation can only open a hole that the prior draws, and the shipped prior
    draws it less often than its data shows it (docs/toy_prior.md)."""
    seeds = [seed * 10_000 + i for i in range(per_colour)]
    per_class = {}
    for colour in COLOURS:
        images = sample_images(prior, [caption(colour, "torus", "overhead")] * per_colour, seeds, steps=steps,
                               guidance_scale=guidance_scale).clamp(0, 1)
        holes = enclosed_holes(foreground_masks(images)).flatten(1).sum(1)
        per_class[colour] = float((holes >= HOLE_MIN_PIXELS).float().mean())
    size = int(prior.unet.config.sample_size) * prior.vae_scale_factor
    overhead = data_cameras(prior.recipe.max_elevation, min_elevation=prior.recipe.overhead_elevation)
    cameras = sample_cameras(96, overhead, size, size, torch.Generator().manual_seed(seed))
    truth, _ = render_shapes(["torus"] * 96, [list(COLOURS)[i % len(COLOURS)] for i in range(96)], cameras)
    data = float((enclosed_holes(foreground_masks(truth)).flatten(1).sum(1) >= HOLE_MIN_PIXELS).float().mean())
    return {"mean": sum(per_class.values()) / len(per_class), "per_colour": per_class, "data": data,
            "samples_per_colour": per_colour, "sampler": {"steps": steps, "guidance_scale": guidance_scale}}


def plot_curve(points: list[tuple[float, float]], path: Path, title: str, width: int = 640, height: int = 360) -> Path:
    """A plain line chart with PIL (no plotting library is a dependency of the pack)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 60, width - 20, 30, height - 40
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    to_px = lambda x, y: (left + (x - x0) / max(x1 - x0, 1e-9) * (right - left),  # noqa: E731
                          bottom - (y - y0) / max(y1 - y0, 1e-9) * (bottom - top))
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.line([to_px(x, y) for x, y in points], fill=(200, 40, 40), width=2)
    draw.text((left, 8), title, fill="black")
    for value, (x, y) in ((y1, (4, top - 6)), (y0, (4, bottom - 6))):
        draw.text((x, y), f"{value:.3f}", fill="black")
    draw.text((left, bottom + 8), f"{x0:.0f}", fill="black")
    draw.text((right - 40, bottom + 8), f"{x1:.0f}", fill="black")
    image.save(path)
    return path


def report(prior_folder: Path, out: Path, per_prompt: int = 10, steps: int = 30, guidance_scale: float = 3.0,
           log: Callable[[str], None] = print) -> dict:
    """Sample grid (prompts × seeds), fidelity numbers, the overhead tori's hole rate and the loss curve of a toy
    prior → ``out``."""
    from ..images import save_png
    from ..prior.diffusion import DiffusionPrior

    prior = DiffusionPrior.from_pretrained(prior_folder, device="cpu")
    out.mkdir(parents=True, exist_ok=True)
    prompts = [caption(c, s, None) for s in SHAPES for c in COLOURS]
    seeds = list(range(6))
    rows = []
    for prompt in prompts:
        images = sample_images(prior, [prompt] * len(seeds), seeds, steps=steps, guidance_scale=guidance_scale)
        rows.append(torch.cat(list(images), dim=2))
    save_png(torch.cat(rows, dim=1), out / "samples.png")
    log("wrote the sample grid")
    fidelity = prompt_fidelity(prior, per_prompt=per_prompt, steps=steps, guidance_scale=guidance_scale)
    holes = overhead_hole_rate(prior, steps=steps, guidance_scale=guidance_scale)
    log(f"overhead tori with a hole: {holes['mean']:.0%} of samples (the data under the same detector: "
        f"{holes['data']:.0%})")
    info = json.loads((prior_folder / "toy_prior.json").read_text()) if (prior_folder / "toy_prior.json").is_file() else {}
    history = info.get("loss_history", [])
    if history:
        plot_curve([(h[0], h[1]) for h in history], out / "loss.png", "toy prior: training loss (v-MSE, 50-step mean)")
    result = {"fidelity": fidelity, "overhead_holes": holes, "prompts": prompts, "seeds": seeds,
              "training": {k: v for k, v in info.items() if k != "loss_history"}}
    (out / "report.json").write_text(json.dumps(result, indent=2))
    return result

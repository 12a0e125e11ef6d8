"""The few places where the pack touches ComfyUI: device and dtype policy, model management, model folders, output
folder, progress, status text, interrupt. Only core's public functions are called; none of its lists is edited.

Every ComfyUI import is inside a function so that the node modules import (and their contract tests run) in plain
Python; outside ComfyUI the functions fall back to the engine's own behaviour.
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from pathlib import Path

import torch

from ..asd_engine.devices import PRECISIONS, set_device_provider, set_precision_provider
from ..asd_engine.prior import default_prior_path

EMBEDDED_PRIOR = "asd-toy-prior (embedded, 32 px)"
MODEL_FOLDERS = ("asd", "diffusers")


REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements.txt"
MODULE_OF = {"pillow": "PIL", "scikit-image": "skimage", "websocket-client": "websocket"}  # distribution → import


def missing_requirements() -> list[str]:
    """The distributions in the pack's requirements.txt that this Python cannot import (found without importing)."""
    import importlib.util
    import re

    missing = []
    for line in REQUIREMENTS.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line.split("#", 1)[0])
        if match:
            name = match.group(1).lower()
            try:
                found = importlib.util.find_spec(MODULE_OF.get(name, name.replace("-", "_"))) is not None
            except (ImportError, ValueError):  # a finder refusing it, or a broken entry in sys.modules
                found = False
            if not found:
                missing.append(name)
    return missing


def install_hint(missing: list[str]) -> str:
    """One line: which packages are missing and the command that installs them into this Python."""
    import sys

    return (f"missing Python package{'s' if len(missing) > 1 else ''} {', '.join(missing)}: run "
            f"`{sys.executable} -m pip install -r {REQUIREMENTS}` and restart ComfyUI")


def in_comfyui() -> bool:
    try:
        import comfy.model_management  # noqa: F401
        import folder_paths  # noqa: F401
    except ImportError:
        return False
    return True


def setup() -> None:
    """At pack import inside ComfyUI: say in one line which requirements are missing (the nodes still load, so
    workflows open; running one repeats the line), follow ComfyUI's device choice and dtype policy, register
    ``models/asd``."""
    if not in_comfyui():
        return
    missing = missing_requirements()
    if missing:
        logging.error("[ASD] %s", install_hint(missing))
    import comfy.model_management
    import folder_paths

    set_device_provider(comfy.model_management.get_torch_device)
    set_precision_provider(core_precision)
    asd_dir = os.path.join(folder_paths.models_dir, "asd")
    os.makedirs(asd_dir, exist_ok=True)
    folder_paths.add_model_folder_path("asd", asd_dir)


def core_precision(device: torch.device) -> torch.dtype:
    """ "auto" precision inside ComfyUI: the dtype core gives a diffusion model's weights on ``device``
    (``unet_dtype``, which honours --force-fp32, --fp16-unet, --bf16-unet, ...). fp8 and fp64 cannot train φ
    (core would cast them per layer; the engine computes in its weights' dtype), so those choices become fp32."""
    import comfy.model_management as mm

    dtype = mm.unet_dtype(device, supported_dtypes=[torch.float16, torch.bfloat16, torch.float32])  # core's order
    return dtype if dtype in PRECISIONS.values() else torch.float32


def _pipeline_folders() -> dict[str, Path]:
    """Diffusers pipeline folders (holding model_index.json) under ComfyUI's ``asd`` and ``diffusers`` folders."""
    found: dict[str, Path] = {}
    if not in_comfyui():
        return found
    import folder_paths

    for kind in MODEL_FOLDERS:
        try:
            roots = folder_paths.get_folder_paths(kind)
        except KeyError:
            continue
        for root in roots:
            if not os.path.isdir(root):
                continue
            for current, dirs, files in os.walk(root, followlinks=True):
                if "model_index.json" in files:
                    found.setdefault(os.path.relpath(current, root), Path(current))
                    dirs.clear()
    return found


def _checkpoint_files() -> list[str]:
    """ComfyUI's ``models/checkpoints`` files that can become a prior (:func:`loadable_checkpoints`)."""
    if not in_comfyui():
        return []
    import folder_paths

    names = folder_paths.get_filename_list("checkpoints")
    return loadable_checkpoints({name: folder_paths.get_full_path("checkpoints", name) for name in names})


# file path → ((mtime_ns, size), the header's problem or None): a header is read once per version of a file
_header_verdicts: dict[str, tuple[tuple[int, int], str | None]] = {}


def loadable_checkpoints(files: dict[str, str]) -> list[str]:
    """The names of ``files`` (name → path) Load SD Model lists: SD 1.x / 2.x safetensors, judged from each file's
    header and cached by modification time and size, so that ComfyUI's /object_info stays fast with many large
    files. SDXL, Flux, LoRAs, ... are left out with one console line each; pickles stay listed, so that choosing one
    explains why it is refused and how to convert it."""
    from ..asd_engine.prior.diffusion import PICKLE_SUFFIXES
    from ..asd_engine.prior.single_file import header_problem

    listed = []
    for name, path in files.items():
        if Path(name).suffix.lower() in PICKLE_SUFFIXES:
            listed.append(name)
            continue
        try:
            stat = os.stat(path)
        except OSError:
            continue
        version = (stat.st_mtime_ns, stat.st_size)
        cached = _header_verdicts.get(path)
        if cached is None or cached[0] != version:
            try:
                problem = header_problem(path)
            except Exception as exc:  # noqa: BLE001 — a strange file must not break ComfyUI's node list
                problem = f"'{name}' has a header this pack cannot read ({type(exc).__name__}: {exc})"
            _header_verdicts[path] = (version, problem)
        problem = _header_verdicts[path][1]
        if problem is None:
            listed.append(name)
        else:
            _report_left_out(f"models/checkpoints/{name}", problem)
    return listed


_reported: set[tuple[str, str]] = set()


def _report_left_out(what: str, problem: str) -> None:
    """One console line per model and reason, not one per page load."""
    if (what, problem) not in _reported:
        _reported.add((what, problem))
        logging.info("[ASD] Load SD Model leaves out %s: %s", what, problem)


def _loadable_folders() -> list[str]:
    """The pipeline folders whose model_index.json and component folders make a Stable Diffusion-style pipeline (no
    weights are read); the others are left out with one console line each."""
    from ..asd_engine.errors import UserInputError
    from ..asd_engine.prior.diffusion import inspect_pipeline_folder

    listed = []
    for name, folder in _pipeline_folders().items():
        try:
            inspect_pipeline_folder(folder)
        except UserInputError as exc:
            _report_left_out(f"the pipeline folder {name}", exc.problem)
            continue
        listed.append(name)
    return listed


def model_choices() -> list[str]:
    """The embedded prior first (when shipped), then pipeline folders, then single-file checkpoints: those that can
    become a prior."""
    names = [EMBEDDED_PRIOR] if (default_prior_path() / "model_index.json").is_file() else []
    return names + sorted(_loadable_folders()) + sorted(_checkpoint_files())


def model_path(name: str) -> Path:
    if name == EMBEDDED_PRIOR:
        return default_prior_path()
    folders = _pipeline_folders()
    if name in folders:
        return folders[name]
    if in_comfyui():
        import folder_paths

        if name in folder_paths.get_filename_list("checkpoints"):  # also one left out of the list: the loader
            return Path(folder_paths.get_full_path("checkpoints", name))  # says exactly why it cannot be used
    from ..asd_engine.errors import UserInputError

    raise UserInputError("model", f"'{name}' is neither a pipeline folder in models/asd or models/diffusers nor a "
                         "file in models/checkpoints", "put the model there and refresh the page")


def checkpoint_state_dict(model, clip, vae) -> tuple[dict[str, torch.Tensor], str]:
    """Core Load Checkpoint's MODEL / CLIP / VAE → (state dict in the original single-file layout, prediction type).

    ComfyUI writes exactly this layout when it saves a checkpoint; patches (e.g. LoRAs applied by core nodes) are
    baked in first. The tensors are copied out of inference mode so the engine can train φ against them; the
    prediction type comes from the model's sampling object, so a ModelSamplingDiscrete node upstream is respected.
    """
    import comfy.model_management
    import comfy.model_sampling

    comfy.model_management.load_models_gpu([model, clip.load_model()], force_patch_weights=True)
    exported = model.model.state_dict_for_saving(clip.get_sd(), vae.get_sd(), None)
    with torch.inference_mode(False):
        state = {k: v.detach().to("cpu", copy=True) for k, v in exported.items()}
    sampling = model.get_model_object("model_sampling")
    # V_PREDICTION subclasses EPS, so it is tested first.
    if isinstance(sampling, comfy.model_sampling.V_PREDICTION):
        prediction = "v_prediction"
    elif isinstance(sampling, comfy.model_sampling.EPS):
        prediction = "epsilon"
    else:
        from ..asd_engine.errors import UserInputError

        raise UserInputError("model", f"its sampling is {type(sampling).__name__}",
                             "connect a Stable Diffusion 1.x/2.x checkpoint (epsilon or v-prediction)")
    return state, prediction


def offload_device() -> torch.device:
    """Where frozen priors wait between runs: ComfyUI's offload device for diffusion models (the CPU unless
    --gpu-only / --highvram), the engine's default device outside ComfyUI."""
    if in_comfyui():
        import comfy.model_management

        return torch.device(comfy.model_management.unet_offload_device())
    from ..asd_engine.devices import default_device

    return default_device()


# One ModelPatcher per prior, made when the prior is loaded. ComfyUI's list of loaded models holds only a weak
# reference to a patcher, so the patcher must live as long as its prior does; keyed weakly, it dies with it.
_patchers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def register_prior(prior) -> None:
    """Make ``prior`` a model ComfyUI's model management can load, measure and offload: a ModelPatcher over its
    networks (``prior.modules()``, the same objects), loading to ComfyUI's torch device. Nothing moves yet."""
    if not in_comfyui() or prior in _patchers:
        return
    import comfy.model_management
    import comfy.model_patcher

    _patchers[prior] = comfy.model_patcher.ModelPatcher(
        prior.modules(), load_device=comfy.model_management.get_torch_device(), offload_device=prior.device)


@contextlib.contextmanager
def priors_loaded(priors, reserve_bytes: int = 0):
    """Load ``priors`` to the device through ComfyUI's model management for the duration of the block, asking it
    to free ``reserve_bytes`` more for training (other models are offloaded as ComfyUI decides); afterwards —
    finished, cancelled or failed — each goes back to its offload device and leaves ComfyUI's loaded list.

    Full loads only: φ's LoRA layers and the engine's own modules are not ComfyUI ops, so they cannot run with
    weights left on the CPU (ComfyUI's partial "lowvram" loading); core Train LoRA loads the same way."""
    managed = [p for p in priors if p is not None and p in _patchers]
    if not managed:
        yield
        return
    import comfy.model_management as mm

    mm.load_models_gpu([_patchers[p] for p in managed], memory_required=reserve_bytes, force_full_load=True)
    for prior in managed:
        prior.to(_patchers[prior].load_device)
    try:
        yield
    finally:
        _release([_patchers[p] for p in managed])
        for prior in managed:
            prior.to(_patchers[prior].offload_device)
        mm.soft_empty_cache()


def _release(patchers: list) -> None:
    """Unload ``patchers`` (back to their offload device, out of ComfyUI's loaded list) through core's public
    ``free_memory``, asking it to free everything on their device except the other loaded models (``keep_loaded``),
    so those stay where ComfyUI put them."""
    import comfy.model_management as mm

    for device in {patcher.load_device for patcher in patchers}:
        others = [loaded for loaded in mm.current_loaded_models
                  if all(loaded.model is not patcher for patcher in patchers)]
        mm.free_memory(1 << 62, device, keep_loaded=others)


def output_dir() -> Path:
    if in_comfyui():
        import folder_paths

        return Path(folder_paths.get_output_directory())
    return Path.cwd() / "output"


def output_label(path) -> str:
    """``path`` as a user finds it: ``output/…`` inside ComfyUI's output folder, else as it is."""
    path = Path(path)
    base = output_dir()
    return f"output/{path.relative_to(base).as_posix()}" if path.is_relative_to(base) else str(path)


def new_output_folder(prefix: str) -> tuple[Path, str]:
    """A fresh ``output/asd/<prefix>_NNNNN`` folder → (absolute path, path relative to the output folder)."""
    base = output_dir()
    parent = base / "asd"
    parent.mkdir(parents=True, exist_ok=True)
    safe = _safe_name(prefix, limit=100)
    number = 1 + max([int(p.name.rsplit("_", 1)[-1]) for p in parent.glob(f"{safe}_*")
                      if p.name.rsplit("_", 1)[-1].isdigit()] or [0])
    folder = parent / f"{safe}_{number:05d}"
    folder.mkdir()
    return folder, str(folder.relative_to(base))


def _safe_name(text: str, limit: int = 40) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text.strip())[:limit].strip("_") or "asd"


def train_folder(prompt: str, key: str) -> Path:
    """``output/asd/train/<prompt>_<key>``: one folder per run identity (see ``RunPlan.key``), so re-queueing the
    same run finds its checkpoint, and renaming outputs downstream never retrains."""
    return output_dir() / "asd" / "train" / f"{_safe_name(prompt)}_{key}"


def _asd_model_folders() -> list[Path]:
    if not in_comfyui():
        return []
    import folder_paths

    return [Path(p) for p in folder_paths.get_folder_paths("asd")]


CHECKPOINT_ROOTS = (("output", lambda: [output_dir() / "asd"]), ("models", _asd_model_folders))


def checkpoint_choices() -> dict[str, Path]:
    """Checkpoint folders (holding ``checkpoint.json``) under ``output/asd`` and the ``models/asd`` folders, by the
    label the Load ASD Checkpoint dropdown shows: ``output/asd/...`` or ``models/asd/...``. Only these can be
    loaded by a graph: a server started with --listen must not read folders a graph names."""
    from ..asd_engine.runs.checkpoint import META_FILE

    found: dict[str, Path] = {}
    for label, roots in CHECKPOINT_ROOTS:
        for root in roots():
            if not root.is_dir():
                continue
            for meta in sorted(root.rglob(META_FILE)):
                relative = meta.parent.relative_to(root).as_posix()
                found.setdefault(f"{label}/asd/{relative}", meta.parent)
    return found


def allowed_checkpoint(path, input_name: str = "resume") -> Path:
    """``path`` (a Load ASD Checkpoint label or a folder path) as a checkpoint folder under ``output/asd`` or a
    ``models/asd`` folder, after resolving symlinks and ``..``; anything else is refused with one message, whether
    or not it exists, so a graph can neither read nor probe other folders of the server."""
    from ..asd_engine.errors import UserInputError
    from ..asd_engine.runs.checkpoint import META_FILE

    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else ""
    refused = UserInputError(input_name, f"'{text}' is not a checkpoint folder under output/asd or models/asd",
                             "connect Load ASD Checkpoint (its list), Save ASD Checkpoint or a Train Loop's "
                             "'checkpoint' output")
    if not text.strip() or "\0" in text:
        raise refused
    if not os.path.isabs(text):  # a dropdown label ("output/asd/…"); a path relative to the server's cwd is not
        labelled = checkpoint_choices().get(text)
        if labelled is None:
            raise refused
        text = os.fspath(labelled)
    folder = Path(os.path.realpath(text))
    roots = [Path(os.path.realpath(root)) for _, listed in CHECKPOINT_ROOTS for root in listed()]
    if not any(folder.is_relative_to(root) for root in roots) or not os.path.isfile(folder / META_FILE):
        raise refused
    return folder


def save_preview(images: torch.Tensor, prefix: str = "asd_preview") -> list[dict]:
    """IMAGE ``[B, H, W, 3]`` → PNGs in ComfyUI's temp folder, as core Preview Image writes them: the ``ui`` entries
    that show them on the node. Outside ComfyUI: nothing to show, ``[]``."""
    if not in_comfyui():
        return []
    import folder_paths

    from ..asd_engine.images import to_pil

    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
        prefix, folder_paths.get_temp_directory(), images.shape[2], images.shape[1])
    shown = []
    for index, image in enumerate(images):  # [H, W, 3] → the engine's [3, H, W] writer
        name = f"{filename}_{counter + index:05}_.png"
        to_pil(image.permute(2, 0, 1)).save(os.path.join(folder, name), compress_level=1)
        shown.append({"filename": name, "subfolder": subfolder, "type": "temp"})
    return shown


def show_text(text: str) -> None:
    """One line of status on the running node in the page (core's progress-text channel, what core Get Image Size
    shows its result with) and in the console; outside ComfyUI only the console log."""
    logging.info("[ASD] %s", text)
    if not in_comfyui():
        return
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer
    except ImportError:  # a ComfyUI without the channel (older than 0.3.4x)
        return
    context, server = get_executing_context(), getattr(PromptServer, "instance", None)
    if context is None or server is None or not hasattr(server, "send_progress_text"):
        return
    server.send_progress_text(text, context.node_id, sid=server.client_id)  # to the client that queued the graph


class Progress:
    """ComfyUI's progress bar with a preview image (at most ``--preview-size`` px, as core's sampler previews);
    outside ComfyUI it does nothing."""

    def __init__(self, total: int) -> None:
        self.bar = None
        self.preview_size = 512
        if in_comfyui():
            import comfy.utils
            from comfy.cli_args import args

            self.bar = comfy.utils.ProgressBar(total)
            self.preview_size = args.preview_size

    def update(self, step: int, total: int, preview: torch.Tensor | None = None) -> None:
        """Move the bar to ``step`` of ``total``, with ``preview`` ``[1, 3, H, W]`` when given."""
        if self.bar is None:
            return
        image = None
        if preview is not None:
            from ..asd_engine.images import to_pil

            image = ("JPEG", to_pil(preview), self.preview_size)
        self.bar.update_absolute(step, total, image)


def is_interrupt(exc: BaseException) -> bool:
    if in_comfyui():
        import comfy.model_management

        if isinstance(exc, comfy.model_management.InterruptProcessingException):
            return True
    return isinstance(exc, KeyboardInterrupt)


def check_interrupt() -> None:
    if in_comfyui():
        import comfy.model_management

        comfy.model_management.throw_exception_if_processing_interrupted()


def to_comfy_images(images: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` (C = 1 or 3) → ComfyUI IMAGE ``[B, H, W, 3]`` on the CPU."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().contiguous()

"""CLIP score (the paper's Table 1 metric): cosine similarity of CLIP image and text embeddings.

Weights come from a local folder holding a transformers ``CLIPModel`` (e.g. ``openai/clip-vit-base-patch16``, the
ViT-B/16 of the paper's protocol, downloaded by the user); nothing is fetched. Images are resized (shorter side,
bicubic), centre-cropped to the model's input size and normalised with the folder's preprocessor statistics
(CLIP's defaults when it has none). The score of a set of images is the mean cosine over the images, as the
paper averages over rendered views.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import UserInputError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipScorer:
    """A local CLIP model; ``scorer(images [N, 3, H, W] in [0, 1], prompt) → cosines [N]``."""

    def __init__(self, folder: str | os.PathLike, device: str | torch.device = "cpu",
                 input_name: str = "clip") -> None:
        from transformers import AutoTokenizer, CLIPModel

        folder = Path(folder).expanduser()
        if not (folder / "config.json").is_file():
            raise UserInputError(input_name, f"'{folder}' is not a CLIP model folder (no config.json)",
                                 "download a transformers CLIPModel (e.g. openai/clip-vit-base-patch16) and give its folder")
        try:
            self.model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise UserInputError(input_name, f"cannot load a CLIP model from '{folder}' ({str(exc).splitlines()[0]})",
                                 "give a folder with config.json, the weights and the tokenizer files") from None
        mean, std = CLIP_MEAN, CLIP_STD
        processor = folder / "preprocessor_config.json"
        if processor.is_file():
            config = json.loads(processor.read_text())
            mean, std = tuple(config.get("image_mean", mean)), tuple(config.get("image_std", std))
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.size = int(self.model.config.vision_config.image_size)
        self.device = torch.device(device)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, torch.float32)
        h, w = images.shape[-2:]
        scale = self.size / min(h, w)
        images = F.interpolate(images, size=(max(self.size, round(h * scale)), max(self.size, round(w * scale))),
                               mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (images.shape[-2] - self.size) // 2, (images.shape[-1] - self.size) // 2
        images = images[..., top:top + self.size, left:left + self.size]
        return (images - self.mean) / self.std

    @staticmethod
    def _projected(output) -> torch.Tensor:
        # transformers 4 returns the projected features; transformers 5 an output whose pooler_output they are
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def text_embedding(self, prompt: str) -> torch.Tensor:
        """Unit text embedding ``[1, P]``."""
        tokens = self.tokenizer([prompt], padding=True, truncation=True, return_tensors="pt").to(self.device)
        return F.normalize(self._projected(self.model.get_text_features(**tokens)), dim=-1)

    def image_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """Unit image embeddings ``[N, P]`` of images ``[N, 3, H, W]`` in [0, 1] (differentiable)."""
        return F.normalize(self._projected(self.model.get_image_features(pixel_values=self.preprocess(images))), dim=-1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompt: str) -> torch.Tensor:
        return (self.image_embedding(images) @ self.text_embedding(prompt).T).squeeze(-1)


def load_images(paths: list[str | os.PathLike], input_name: str = "images") -> torch.Tensor:
    """Image files, a folder of them, or animated WEBP/GIF turntables → ``[N, 3, H, W]`` in [0, 1] (one size)."""
    import numpy as np
    from PIL import Image, ImageSequence

    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".gif"))
        elif path.is_file():
            files.append(path)
        else:
            raise UserInputError(input_name, f"'{path}' does not exist", "give image files, a folder or a turntable")
    frames = []
    for file in files:
        try:
            with Image.open(file) as image:
                for frame in ImageSequence.Iterator(image):
                    frames.append(torch.from_numpy(np.asarray(frame.convert("RGB")).copy()))
        except OSError as exc:
            raise UserInputError(input_name, f"cannot read '{file}' ({exc})", "give PNG/JPEG/WEBP/GIF files") from None
    if not frames:
        raise UserInputError(input_name, "no images found", "give image files, a folder of them or a turntable")
    size = frames[0].shape[:2]
    frames = [f for f in frames if f.shape[:2] == size]
    return torch.stack(frames).permute(0, 3, 1, 2).float() / 255.0

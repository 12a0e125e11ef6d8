"""The discriminator φ of Adversarial Score Distillation (also VSD's "LoRA score of the rendered images").

φ is a small trainable change to the frozen prior such that ``eps_phi(x_t)`` models the *generator's* current
distribution while the untouched prior models the prompt's. Two kinds, as the paper names them:

- :class:`LoraDiscriminator`: a peft LoRA adapter on the prior's UNet attention projections
  (to_q/to_k/to_v/to_out.0; or every layer, :data:`LORA_TARGETS`). The adapter lives on the *same* UNet as the
  prior and is switched on only inside φ's own calls, so the prior is never copied. Optionally a camera embedding
  (flattened 4×4 camera-to-world → MLP 16→time-embedding width) is added to the UNet's time embedding, as the
  official ASD/VSD code does.
- :class:`TextualInversionDiscriminator`: new tokens added to the tokenizer whose input-embedding rows are the only
  trainable parameters; φ's prediction is the frozen UNet conditioned on ``"<phi tokens> <prompt>"``.

Both expose the same small interface used by :mod:`asd_engine.distill`:
``model_output(x_t, t, camera)`` (no training), ``train_step(x_t, t, loss_fn, camera, generator)`` (one optimiser
step on φ), and ``state_tensors()/load_state_tensors()`` for checkpoints. Frozen prior weights are never modified.
"""

from __future__ import annotations

import itertools
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from torch import nn

from ..errors import UserInputError

if TYPE_CHECKING:  # annotations only: φ's settings stay importable below the prior
    from .diffusion import DiffusionPrior

PHI_KINDS = ("lora", "ti")
# UNet layers φ's LoRA adapts (peft module-name suffixes): "attention" (official) or "all" (every convolution and
# transformer projection too, for UNets without full-resolution attention): docs/engine.md#recipe-lora_targets
LORA_TARGETS = {  # keys = recipe.LORA_TARGET_CHOICES (tested)
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    "all": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
            "conv_in", "conv_out", "conv1", "conv2", "conv_shortcut", "conv"],
}
_instance_ids = itertools.count()


@dataclass
class PhiConfig:
    """Settings of φ. ``lr=None`` means the kind's default (LoRA 1e-4 as the official configs, TI 5e-3)."""

    kind: str = "lora"
    lora_rank: int = 4
    lora_targets: str | None = None  # a key of LORA_TARGETS; None: from the prior's recipe (official "attention")
    camera_embedding: bool = True
    camera_dropout: float = 0.1
    num_tokens: int = 1
    init_word: str = "object"
    prompt_template: str = "{phi} {prompt}"
    lr: float | None = None


def build_discriminator(prior: DiffusionPrior, prompt: str, config: PhiConfig,
                        with_camera: bool = False) -> "LoraDiscriminator | TextualInversionDiscriminator":
    """Make φ of ``config.kind`` for ``prompt`` (the view-independent prompt) on ``prior``."""
    if config.kind == "lora":
        return LoraDiscriminator(prior, prompt, config, with_camera=with_camera and config.camera_embedding)
    return TextualInversionDiscriminator(prior, prompt, config)


class _Discriminator:
    """Shared training plumbing: optimiser, one φ step, state for checkpoints."""

    default_lr: float = 1e-4
    prior: DiffusionPrior

    def _make_optimizer(self, lr: float | None, weight_decay: float) -> None:
        # AdamW with the official VSD/ASD betas and eps; fp32 trainable parameters.
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=self.default_lr if lr is None else lr,
                                           betas=(0.9, 0.99), eps=1e-15, weight_decay=weight_decay)

    def parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    @contextmanager
    def _active(self, camera: torch.Tensor | None) -> Iterator[torch.Tensor]:
        """Context in which the UNet acts as φ; yields the text embeddings to condition it on."""
        raise NotImplementedError

    def model_output(self, x_t: torch.Tensor, t: torch.Tensor, camera: torch.Tensor | None = None) -> torch.Tensor:
        """φ's native prediction ``[B, C, h, w]`` at ``x_t [B, C, h, w]``, ``t [B]`` (call under ``no_grad``)."""
        with self._active(camera) as embeddings:
            return self.prior.model_output(x_t, t, embeddings)

    def base_output(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """φ's model without φ (adapters off, no φ tokens) on the prompt: ``[B, C, h, w]`` native (under no_grad)."""
        return self.prior.model_output(x_t, t, self.base_embeddings)

    def train_step(self, x_t: torch.Tensor, t: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor],
                   camera: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step on φ: ``loss_fn(φ output) → scalar``; returns ``(output.detach(), loss.detach())``.

        ``camera [B, 16]`` is zeroed for the whole batch with probability ``camera_dropout`` (drawn from
        ``generator``), as the official code does, so φ also learns the camera-free score.
        """
        if camera is not None and self.camera_dropout > 0:
            if torch.rand((), generator=generator).item() < self.camera_dropout:
                camera = torch.zeros_like(camera)
        with torch.enable_grad(), self._active(camera) as embeddings:
            output = self.prior.model_output(x_t, t, embeddings)
            loss = loss_fn(output)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()  # inside the context: peft turns requires_grad off on disabled adapters
        self.optimizer.step()
        return output.detach(), loss.detach()

    # ---------------------------------------------------------------- checkpoints
    def state_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        own = self.state_tensors_live()
        missing = sorted(set(own) - set(tensors))
        if missing:
            raise UserInputError("resume", f"the checkpoint's φ lacks {len(missing)} tensors (e.g. {missing[0]})",
                                 "resume with the same {=phi.kind}, {=phi.lora_rank} / {=phi.num_tokens} as the run "
                                 "that saved it")
        with torch.no_grad():
            for name, param in own.items():
                if tensors[name].shape != param.shape:
                    raise UserInputError("resume", f"φ tensor {name} has shape {tuple(tensors[name].shape)}, "
                                         f"expected {tuple(param.shape)}",
                                         "resume with the same φ settings as the run that saved it")
                param.copy_(tensors[name].to(param.device, param.dtype))

    def state_tensors_live(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class LoraDiscriminator(_Discriminator):
    """φ as a LoRA adapter (rank ``config.lora_rank``) on the prior's UNet, plus an optional camera embedding."""

    default_lr = 1e-4

    def __init__(self, prior: DiffusionPrior, prompt: str, config: PhiConfig, with_camera: bool = False) -> None:
        from diffusers.models.embeddings import TimestepEmbedding
        from peft import LoraConfig
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.prior = prior
        self.kind = "lora"
        self.camera_dropout = config.camera_dropout if with_camera else 0.0
        # A unique adapter name per φ, so several φ (e.g. a side-by-side comparison graph) can share one prior.
        self.adapter_name = f"asd_phi_{next(_instance_ids)}"
        unet = prior.unet
        # lora_alpha = rank → scale 1; peft's default init (B = 0) makes φ equal the prior at step 0.
        with warnings.catch_warnings():  # several φ on one UNet is intended; peft warns about it
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            targets = LORA_TARGETS[config.lora_targets or "attention"]  # None only outside a run (tests)
            unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank, target_modules=targets),
                             adapter_name=self.adapter_name)
        # Toggling through the cached tuner layers is ~5× cheaper than unet.enable_adapters(), which walks
        # every module of the UNet on every call.
        self._layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
        self._lora_params = {name: p for name, p in unet.named_parameters()
                             if f".{self.adapter_name}." in name and "lora_" in name}
        for p in self._lora_params.values():
            p.data = p.data.float()  # trainable parameters stay fp32 even when the prior runs in half precision
        self.camera_mlp: nn.Module | None = None
        if with_camera:
            width = unet.time_embedding.linear_2.out_features
            self.camera_mlp = TimestepEmbedding(16, width).to(prior.device)
            # Zero-initialised output: φ starts exactly equal to the prior (the official code leaves it random,
            # which makes the first generator gradients follow an untrained embedding).
            nn.init.zeros_(self.camera_mlp.linear_2.weight)
            nn.init.zeros_(self.camera_mlp.linear_2.bias)
        self._set_enabled(False)
        self.embeddings = prior.encode_prompt([prompt])  # [1, L, D], φ sees the view-independent prompt
        self.base_embeddings = self.embeddings
        self._make_optimizer(config.lr, weight_decay=0.01)

    def parameters(self) -> list[nn.Parameter]:
        params = list(self._lora_params.values())
        if self.camera_mlp is not None:
            params += list(self.camera_mlp.parameters())
        return params

    def _set_enabled(self, enabled: bool) -> None:
        for layer in self._layers:
            if enabled and layer.active_adapters != [self.adapter_name]:
                layer.set_adapter(self.adapter_name)
            layer.enable_adapters(enabled)

    @contextmanager
    def _active(self, camera: torch.Tensor | None) -> Iterator[torch.Tensor]:
        hook = None
        if self.camera_mlp is not None:
            def add_camera(_module, _inputs, emb):  # emb: [B, width]; diffusers adds class embeddings here too
                cams = torch.zeros(emb.shape[0], 16, device=emb.device) if camera is None else camera
                return emb + self.camera_mlp(cams.to(emb.device, torch.float32)).to(emb.dtype)
            hook = self.prior.unet.time_embedding.register_forward_hook(add_camera)
        self._set_enabled(True)
        try:
            yield self.embeddings
        finally:
            self._set_enabled(False)
            if hook is not None:
                hook.remove()

    def state_tensors_live(self) -> dict[str, torch.Tensor]:
        # Names without the per-instance adapter name, so a checkpoint loads into any φ of the same shape.
        tensors = {f"lora.{name.replace(f'.{self.adapter_name}.', '.')}": p for name, p in self._lora_params.items()}
        if self.camera_mlp is not None:
            tensors.update({f"camera_mlp.{k}": v for k, v in self.camera_mlp.state_dict().items()})
        return tensors

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.state_tensors_live().items()}

    def remove(self) -> None:
        """Delete the adapter from the shared UNet (the prior is left exactly as loaded)."""
        with warnings.catch_warnings():  # peft notes which adapter becomes active; φ sets its own on every call
            warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
            self.prior.unet.delete_adapters(self.adapter_name)


class TextualInversionDiscriminator(_Discriminator):
    """φ as ``num_tokens`` new word embeddings; the text encoder and UNet stay frozen and untouched.

    The new tokens get ids past the text encoder's vocabulary. Instead of resizing the shared embedding matrix
    (which would copy it, ~200 MB for SD2), two hooks on the input-embedding layer map those ids to row 0 for the
    lookup and then substitute the trainable rows: only those rows receive gradients, and every weight of the
    text encoder stays bit-identical.
    """

    default_lr = 5e-3

    def __init__(self, prior: DiffusionPrior, prompt: str, config: PhiConfig) -> None:
        self.prior = prior
        self.kind = "ti"
        self.camera_dropout = 0.0
        uid = next(_instance_ids)
        self.tokens = [f"<asd-phi-{uid}-{i}>" for i in range(config.num_tokens)]
        tokenizer = prior.tokenizer
        tokenizer.add_tokens(self.tokens)
        self.token_ids = torch.tensor(tokenizer.convert_tokens_to_ids(self.tokens), device=prior.device)
        embedding_layer = prior.text_encoder.get_input_embeddings()
        init_ids = tokenizer(config.init_word, add_special_tokens=False).input_ids
        init_ids = [i for i in init_ids if i < embedding_layer.num_embeddings]
        if not init_ids:
            raise UserInputError("phi.init_word", f"'{config.init_word}' has no tokens in this tokenizer",
                                 "use an ordinary word, e.g. 'object'")
        with torch.no_grad():
            init = embedding_layer.weight[init_ids].float().mean(0)
        self.token_embeddings = nn.Parameter(init.repeat(config.num_tokens, 1).clone())  # [num_tokens, D]
        self.prompt_ids = prior.tokenize([config.prompt_template.format(phi=" ".join(self.tokens), prompt=prompt)])
        self.base_embeddings = prior.encode_prompt([prompt])
        self._make_optimizer(config.lr, weight_decay=0.0)

    def parameters(self) -> list[nn.Parameter]:
        return [self.token_embeddings]

    def encode(self) -> torch.Tensor:
        """φ's text embeddings ``[1, L, D]``; differentiable w.r.t. the token rows when grad is enabled."""
        layer = self.prior.text_encoder.get_input_embeddings()
        first, ids = int(self.token_ids.min()), self.token_ids
        state: dict[str, torch.Tensor] = {}

        def map_new_ids(_module, args):
            input_ids = args[0]
            state["ids"], state["mask"] = input_ids, torch.isin(input_ids, ids)
            return (torch.where(state["mask"], torch.zeros_like(input_ids), input_ids),) + tuple(args[1:])

        def substitute_rows(_module, _args, output):
            index = (state["ids"] - first).clamp(0, len(self.tokens) - 1)  # new ids are consecutive from `first`
            rows = self.token_embeddings.to(output.dtype)[index]
            return torch.where(state["mask"].unsqueeze(-1), rows, output)

        pre = layer.register_forward_pre_hook(map_new_ids)
        post = layer.register_forward_hook(substitute_rows)
        try:
            return self.prior.encode_token_ids(self.prompt_ids)
        finally:
            pre.remove()
            post.remove()

    @contextmanager
    def _active(self, camera: torch.Tensor | None) -> Iterator[torch.Tensor]:
        yield self.encode()

    def state_tensors_live(self) -> dict[str, torch.Tensor]:
        return {"ti.token_embeddings": self.token_embeddings}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"ti.token_embeddings": self.token_embeddings.detach().clone()}

"""The fidelity discriminator and quality guidance (paper §3.2 "Quality guidance", Eq. 7-8 and 12).

D(z_t, t, c) -> P(high-fidelity | noisy latent z_t, timestep t, text embedding c). Architecture as in the paper: the
base UNet's conv_in + time embedding + down blocks (the base's own weights, frozen), then a copy of its mid block
(fine-tuned), then GroupNorm + SiLU + global average pooling + a linear layer. Conditioning on t and c is the UNet's
own (time embedding into every resnet, cross-attention to c), so it works on any SD-architecture base.

The frozen parts are *shared* with the base UNet, not copied: a discriminator file holds only the mid block and the
head (a few MB for SD 2.1), and it is only meaningful with the base it was trained on -- the config records a
fingerprint of the frozen weights, and loading against another base raises `BaseMismatchError`.

Quality guidance: energy E_q = w_q * -log D(real | z_t, t, c) (paper Eq. 8); the sampler adds
sqrt(1 - alpha_bar_t) * dE/dz_t to the noise estimate (Eq. 12), i.e. eps - w_q * sqrt(1 - alpha_bar) * grad log D:
classifier guidance with scale w_q (w_q = 1 is Dhariwal & Nichol's unit scale). The paper's 1e-3 lives in its own
unpublished normalisation; ours is chosen by measurement (docs/shapesworld/discriminator.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, Field

from luciddrag.engine.errors import BaseMismatchError, InputError, ModelLoadError
from luciddrag.engine.guidance import GuidanceContext, Region

FORMAT_VERSION = 1
WEIGHTS_NAME = "discriminator.safetensors"
CONFIG_NAME = "discriminator.json"
TRAINABLE_PREFIXES = ("mid_block.", "head_norm.", "head.", "skip_norms.", "skip_convs.")
POOLINGS = ("mean", "mean_max", "multiscale", "multiscale_conv")
PROBES_PER_TENSOR = 4


# -- config and base identity ---------------------------------------------------------------------------------------


class BaseIdentity(BaseModel):
    """Which base model a discriminator belongs to: its name, its UNet architecture and a probe of frozen weights.

    The probe (a few values per frozen tensor) is compared with a tolerance rather than hashed, so the same base
    loaded in fp16, bf16 or fp32 matches while a differently trained base (or another architecture) does not.
    """

    name: str
    architecture: str = Field(description="sha256 of the UNet config (architecture keys only).")
    probe: list[float]


Motion = Literal["translate", "scale", "patch"]
MOTIONS: tuple[Motion, ...] = ("translate", "scale", "patch")


class DiscriminatorConfig(BaseModel):
    format_version: int = FORMAT_VERSION
    base: BaseIdentity
    head_groups: int
    pooling: Literal["mean", "mean_max", "multiscale", "multiscale_conv"] = Field(
        "mean", description="Head pooling over the mid block's map: 'mean' (global average, the paper's linear "
                            "classifier on pooled features) or 'mean_max' (average and max concatenated: a local "
                            "artefact such as a ghost or a smear moves the max even where it barely moves the mean); "
                            "'multiscale': 'mean' plus the average and max of every down block's (frozen) output, "
                            "so the head also sees the finest maps, where small damage is still resolved; "
                            "'multiscale_conv': as 'multiscale' with a trainable 3x3 convolution on each level first "
                            "(the frozen features are the base's, made for denoising; this lets the head re-mix them).")
    threshold: float = Field(0.5, description="Critic: accept when P(real) >= threshold (calibrated per base).")
    critic_timesteps: list[int] = Field(default_factory=lambda: [100, 200, 300],
                                        description="Timesteps at which the critic scores a final image.")
    critic_seed: int = 0
    w_quality: float = Field(0.0, ge=0, description="Recommended quality-guidance weight w_q (measured).")
    quality_steps: int = Field(10, ge=0, description="Recommended n2: quality guidance on the first n2 steps.")
    quality_motions: list[Motion] = Field(
        default_factory=lambda: list(MOTIONS),
        description="The kinds of drag the recommended w_q is for: 'translate' (move an object), 'scale' (resize "
                    "it), 'patch' (deform around the point). Measured per kind: a weight that helps moves can hurt "
                    "resizes. The agent samples the other kinds without quality guidance.")
    notes: dict[str, Any] = Field(default_factory=dict)


_ARCH_SKIP = ("_name_or_path", "_diffusers_version", "_class_name", "_use_default_values")


def architecture_hash(unet) -> str:
    cfg = {k: v for k, v in dict(unet.config).items() if k not in _ARCH_SKIP}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def frozen_modules(unet) -> dict[str, nn.Module]:
    return {"conv_in": unet.conv_in, "time_embedding": unet.time_embedding, "down_blocks": unet.down_blocks}


def weight_probe(unet) -> list[float]:
    """PROBES_PER_TENSOR evenly spaced values of every frozen tensor (in a fixed order), as floats."""
    vals: list[float] = []
    for _, mod in frozen_modules(unet).items():
        for _, p in sorted(mod.named_parameters()):
            flat = p.detach().reshape(-1)
            idx = torch.linspace(0, flat.numel() - 1, PROBES_PER_TENSOR).long().to(flat.device)
            vals += [float(v) for v in flat[idx].float().cpu()]
    return vals


def base_identity(unet, name: str) -> BaseIdentity:
    return BaseIdentity(name=str(name), architecture=architecture_hash(unet), probe=weight_probe(unet))


def check_base(expected: BaseIdentity, unet, name: str, where: str = "the discriminator") -> None:
    """Raise BaseMismatchError unless `unet` is the base `expected` describes (tolerance covers fp16/bf16 loads)."""
    hint = (f"train one for this base: `luciddrag discriminator synthesize --base {name} ...` then "
            f"`luciddrag train-discriminator --base {name} ...`")
    if architecture_hash(unet) != expected.architecture:
        raise BaseMismatchError(f"{where} was trained for base {expected.name!r}, but the loaded base {name!r} has a "
                                f"different UNet architecture; {hint}")
    got = np.array(weight_probe(unet))
    want = np.array(expected.probe)
    # bf16 keeps ~3 significant digits: a relative 2e-2 tolerance covers every dtype; a different training does not
    if got.shape != want.shape or not np.allclose(got, want, rtol=2e-2, atol=2e-3):
        raise BaseMismatchError(f"{where} was trained for base {expected.name!r}, but the loaded base {name!r} has "
                                f"different weights in the frozen down blocks; {hint}")


# -- the model ------------------------------------------------------------------------------------------------------


def _groups(channels: int, preferred: int) -> int:
    g = min(preferred, channels)
    while channels % g:
        g -= 1
    return g


class FidelityDiscriminator(nn.Module):
    """Frozen base encoder (shared with the base UNet) + trainable mid block copy + linear head -> one logit."""

    def __init__(self, unet, head_groups: int | None = None, pooling: str = "mean") -> None:
        super().__init__()
        import copy

        c = int(unet.config.block_out_channels[-1])
        self.head_groups = head_groups or _groups(c, int(unet.config.norm_num_groups or 32))
        # Shared modules: same objects as in the base UNet; frozen, never saved.
        self.conv_in = unet.conv_in
        self.time_proj = unet.time_proj
        self.time_embedding = unet.time_embedding
        self.down_blocks = unet.down_blocks
        for m in (self.conv_in, self.time_embedding, self.down_blocks):
            m.requires_grad_(False)
        self.mid_block = copy.deepcopy(unet.mid_block)  # initialised from the base, fine-tuned
        self.mid_block.requires_grad_(True)
        self.head_norm = nn.GroupNorm(self.head_groups, c)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, not {pooling!r}")
        self.pooling = pooling
        n_features = 2 * c if pooling == "mean_max" else c
        if pooling in ("multiscale", "multiscale_conv"):
            # the frozen skip features have whatever scale the base gave them: a trainable norm per level puts them
            # on one footing before the linear layer
            skip = [int(ch) for ch in unet.config.block_out_channels]
            self.skip_norms = nn.ModuleList(nn.GroupNorm(_groups(ch, self.head_groups), ch) for ch in skip)
            self.skip_norms.to(unet.dtype)
            n_features += 2 * sum(skip)
            if pooling == "multiscale_conv":
                self.skip_convs = nn.ModuleList(nn.Conv2d(ch, ch, 3, padding=1) for ch in skip)
                for conv in self.skip_convs:  # start as the identity map, i.e. as 'multiscale'
                    nn.init.dirac_(conv.weight)
                    nn.init.zeros_(conv.bias)
                self.skip_convs.to(unet.dtype)
        self.head = nn.Linear(n_features, 1)
        nn.init.zeros_(self.head.bias)
        nn.init.normal_(self.head.weight, std=0.01)  # small: start near P = 0.5 everywhere
        self.head_norm.to(unet.dtype)
        self.head.to(unet.dtype)
        self.mid_block.to(unet.dtype)
        self.center_input = bool(getattr(unet.config, "center_input_sample", False))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith(TRAINABLE_PREFIXES)}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n.startswith(TRAINABLE_PREFIXES)]

    def train(self, mode: bool = True) -> "FidelityDiscriminator":
        """Only the trainable parts switch mode; the shared base modules stay in eval mode (no dropout)."""
        super().train(False)
        for m in (self.mid_block, self.head_norm, self.head, getattr(self, "skip_norms", None),
                  getattr(self, "skip_convs", None)):
            if m is not None:
                m.train(mode)
        return self

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor | int, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Logit of P(real), shape (B,). `timesteps`: int or (B,); `text_embeddings`: (B, L, D) or (1, L, D)."""
        b = latents.shape[0]
        t = torch.as_tensor(timesteps, device=latents.device)
        t = t.reshape(-1).expand(b) if t.numel() == 1 else t.reshape(b)
        emb = text_embeddings.expand(b, -1, -1) if text_embeddings.shape[0] == 1 else text_embeddings
        emb = emb.to(latents.dtype)
        temb = self.time_embedding(self.time_proj(t).to(latents.dtype))
        h = 2 * latents - 1.0 if self.center_input else latents
        h = self.conv_in(h)
        skips = []
        for blk in self.down_blocks:
            if getattr(blk, "has_cross_attention", False):
                h, res = blk(hidden_states=h, temb=temb, encoder_hidden_states=emb)
            else:
                h, res = blk(hidden_states=h, temb=temb)
            skips.append(res[-2] if len(res) > 1 and blk.downsamplers is not None else res[-1])
        if getattr(self.mid_block, "has_cross_attention", False):
            h = self.mid_block(h, temb, encoder_hidden_states=emb)
        else:
            h = self.mid_block(h, temb)
        h = F.silu(self.head_norm(h))
        pooled = h.mean(dim=(2, 3))
        if self.pooling == "mean_max":
            pooled = torch.cat([pooled, h.amax(dim=(2, 3))], dim=1)
        elif self.pooling in ("multiscale", "multiscale_conv"):
            # each level's last pre-downsampling map: 16x16, 8x8, 4x4 on ShapesWorld
            if self.pooling == "multiscale_conv":
                skips = [conv(s) for conv, s in zip(self.skip_convs, skips)]
            maps = [F.silu(norm(s)) for norm, s in zip(self.skip_norms, skips)]
            pooled = torch.cat([pooled, *(m.mean(dim=(2, 3)) for m in maps), *(m.amax(dim=(2, 3)) for m in maps)], 1)
        return self.head(pooled).squeeze(-1).float()


@dataclass
class Discriminator:
    """A loaded discriminator: the module, its config, and where it came from."""

    model: FidelityDiscriminator
    config: DiscriminatorConfig
    path: Path | None = None


# -- losses and small math ------------------------------------------------------------------------------------------


def discrimination_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The canonical discrimination loss (Eq. 7): -[y log D + (1 - y) log(1 - D)], D = sigmoid(logit).

    `weights` (per sample) balance the classes when real and low-fidelity counts differ.
    """
    loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
    if weights is None:
        return loss.mean()
    return (loss * weights).sum() / weights.sum().clamp_min(1e-8)


def quality_energy(logits: torch.Tensor) -> torch.Tensor:
    """-log D(real) = softplus(-logit): stable for any logit, and 0 when D is sure the latent is real."""
    return F.softplus(-logits.float())


def noisy(z0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Forward diffusion z_t = sqrt(a) z0 + sqrt(1 - a) eps, `alpha_bar` (B,)."""
    a = alpha_bar.to(z0.dtype).view(-1, *([1] * (z0.dim() - 1)))
    return a.sqrt() * z0 + (1 - a).sqrt() * noise


def alphas_cumprod(scheduler_config: dict) -> torch.Tensor:
    """The base model's training noise schedule (alpha_bar for t = 0..T-1)."""
    from diffusers import DDPMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr")
    return DDPMScheduler(**{k: scheduler_config[k] for k in keys if k in scheduler_config}).alphas_cumprod.float()


# -- building, saving, loading --------------------------------------------------------------------------------------


def build_discriminator(components, seed: int = 0, pooling: str = "mean") -> Discriminator:
    """A fresh discriminator for a base (mid block from the base, random head)."""
    torch.manual_seed(seed)
    model = FidelityDiscriminator(components.unet, pooling=pooling).to(components.device)
    cfg = DiscriminatorConfig(base=base_identity(components.unet, components.name), head_groups=model.head_groups,
                              pooling=pooling)
    return Discriminator(model.eval(), cfg)


def save_discriminator(disc: Discriminator, folder: str | os.PathLike) -> Path:
    """Write discriminator.safetensors (trainable weights only, fp32) + discriminator.json into `folder`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in disc.model.trainable_state().items()}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "luciddrag-discriminator",
                                                           "base": disc.config.base.name})
    (folder / CONFIG_NAME).write_text(disc.config.model_dump_json(indent=1))
    disc.path = folder
    return folder


def read_config(path: str | os.PathLike) -> DiscriminatorConfig:
    folder = _folder(path)
    try:
        return DiscriminatorConfig.model_validate_json((folder / CONFIG_NAME).read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{folder} has no {CONFIG_NAME}: not a LucidDrag discriminator folder") from None
    except ValueError as exc:
        raise ModelLoadError(f"{folder / CONFIG_NAME} is not a valid discriminator config: "
                             f"{str(exc).splitlines()[0]}") from None


def write_config(path: str | os.PathLike, config: DiscriminatorConfig) -> None:
    (_folder(path) / CONFIG_NAME).write_text(config.model_dump_json(indent=1))


def _folder(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if p.is_file() and p.name in (WEIGHTS_NAME, CONFIG_NAME):
        p = p.parent
    if not p.is_dir():
        raise ModelLoadError(f"discriminator not found: {path} (a folder with {WEIGHTS_NAME} and {CONFIG_NAME})")
    return p


_cache: dict[tuple, Discriminator] = {}  # (folder, id(unet), file mtimes) -> loaded
_cache_lock = threading.Lock()


def load_discriminator(path: str | os.PathLike, components, use_cache: bool = True) -> Discriminator:
    """Load a discriminator for `components`' base. Raises BaseMismatchError when it belongs to another base."""
    from safetensors.torch import load_file

    folder = _folder(path)
    # the files' mtimes are in the key so a long-running app sees `discriminator set` / a retrain without a restart
    stamps = tuple((folder / n).stat().st_mtime_ns if (folder / n).is_file() else 0
                   for n in (CONFIG_NAME, WEIGHTS_NAME))
    key = (str(folder.resolve()), id(components.unet), stamps)
    with _cache_lock:
        if use_cache and key in _cache:
            return _cache[key]
    cfg = read_config(folder)
    if cfg.format_version != FORMAT_VERSION:
        raise ModelLoadError(f"{folder} has discriminator format {cfg.format_version}; this LucidDrag reads "
                             f"{FORMAT_VERSION}")
    check_base(cfg.base, components.unet, components.name, where=f"discriminator {folder}")
    try:
        state = load_file(str(folder / WEIGHTS_NAME), device="cpu")
    except (OSError, FileNotFoundError) as exc:
        raise ModelLoadError(f"cannot read {folder / WEIGHTS_NAME}: {str(exc).splitlines()[0]}") from None
    model = FidelityDiscriminator(components.unet, head_groups=cfg.head_groups, pooling=cfg.pooling).to(
        components.device)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if m.startswith(TRAINABLE_PREFIXES)]
    if missing or unexpected:
        raise ModelLoadError(f"{folder / WEIGHTS_NAME} does not match this base's mid block "
                             f"(missing {missing[:3]}, unexpected {list(unexpected)[:3]})")
    model.requires_grad_(False)
    disc = Discriminator(model.eval(), cfg, folder)
    with _cache_lock:
        for stale in [k for k in _cache if k[:2] == key[:2]]:  # an older version of these files
            del _cache[stale]
        _cache[key] = disc
    return disc


# -- scoring images (the critic) -----------------------------------------------------------------------------------


def encode_prompts(components, prompts: Sequence[str]) -> torch.Tensor:
    """Text embeddings exactly as the editor computes them (padded to the tokenizer's max length)."""
    tok = components.tokenizer
    max_len = tok.model_max_length if tok.model_max_length and tok.model_max_length < 10_000 else 77
    ids = tok(list(prompts), padding="max_length", max_length=max_len, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return components.text_encoder(ids.to(components.device))[0].to(components.dtype)


def image_to_latents(components, images: Sequence[Image.Image], size: tuple[int, int] | None = None) -> torch.Tensor:
    """RGB images -> VAE latents (mean x scaling factor), resized to the base's working size."""
    from luciddrag.engine.preprocess import pil_to_tensor_array, working_size

    arrs = []
    for im in images:
        im = im.convert("RGB")
        wsize = size or working_size(im.width, im.height, components.native_size, components.size_multiple)
        if im.size != wsize:
            im = im.resize(wsize, Image.Resampling.LANCZOS)
        arrs.append(pil_to_tensor_array(im))
    if len({a.shape for a in arrs}) > 1:
        raise InputError("images of different aspect ratios cannot be scored in one batch")
    vae = components.vae
    x = torch.from_numpy(np.stack(arrs)).to(components.device, vae.dtype)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    return z.to(components.dtype)


def logits_at(disc: Discriminator, components, z0: torch.Tensor, emb: torch.Tensor, timesteps: Sequence[int],
              seed: int = 0) -> torch.Tensor:
    """(len(timesteps), B) logits of clean latents noised to each timestep with fixed, seeded noise."""
    ab = alphas_cumprod(components.scheduler_config).to(z0.device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    with torch.no_grad():
        for t in timesteps:
            eps = torch.randn(z0.shape, generator=gen).to(z0.device, z0.dtype)
            zt = noisy(z0, eps, ab[int(t)].expand(z0.shape[0]))
            out.append(disc.model(zt, int(t), emb))
    return torch.stack(out)


def score_images(disc: Discriminator, components, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
    """P(real) of each image: sigmoid of the mean logit over the config's critic timesteps (fixed noise)."""
    if len(images) != len(prompts):
        raise InputError(f"{len(images)} images but {len(prompts)} prompts")
    z0 = image_to_latents(components, images)
    emb = encode_prompts(components, prompts)
    logits = logits_at(disc, components, z0, emb, disc.config.critic_timesteps, disc.config.critic_seed)
    return [float(v) for v in torch.sigmoid(logits.mean(0))]


def score_image(disc: Discriminator, components, image: Image.Image, prompt: str) -> float:
    """P(real) of one image (the agent's critic)."""
    return score_images(disc, components, [image], [prompt])[0]


# -- quality guidance ------------------------------------------------------------------------------------------------


@dataclass
class QualityTerm:
    """Quality guidance (paper Eq. 8): w_q * -log D(real | z_t, t, c), active on the first n2 sampling steps.

    Region "all" by default (the paper guides the whole latent); "edit" restricts its gradient to the editable mask.
    """

    disc: Discriminator
    weight: float
    steps: int  # n2
    name: str = "quality"
    region: Region = "all"

    def active(self, step: int, num_steps: int) -> bool:
        return self.weight > 0 and step < self.steps

    def energy(self, ctx: GuidanceContext) -> torch.Tensor:
        logits = self.disc.model(ctx.latents, ctx.timestep, ctx.text_embeddings)
        return self.weight * quality_energy(logits)


def quality_terms(disc: Discriminator | None, weight: float | None = None, steps: int | None = None,
                  region: Region = "all", motion: Motion | None = None,
                  motions: Sequence[Motion] | None = None) -> list[QualityTerm]:
    """[QualityTerm] with the given weight/steps, or the discriminator's recommended ones; [] without one.

    `motion`: the kind of drag being sampled; [] unless it is among `motions` (default: the discriminator's
    `quality_motions`)."""
    if disc is None:
        return []
    if motion is not None and motion not in (disc.config.quality_motions if motions is None else motions):
        return []
    w = disc.config.w_quality if weight is None else weight
    n2 = disc.config.quality_steps if steps is None else steps
    return [QualityTerm(disc, float(w), int(n2), region=region)] if w > 0 and n2 > 0 else []

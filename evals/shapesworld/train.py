"""Train the tiny ShapesWorld latent diffusion model on the CPU, seeded and resumable.

Three phases, all inside one wall-clock budget:

1. VAE: an ``AutoencoderKL`` (16/32/32 channels, 4x down, 4-channel 16x16 latents) on rendered scenes.
2. Cache the latents of every training scene (posterior means) and set ``scaling_factor`` so they have unit std.
3. UNet + text encoder: a ``UNet2DConditionModel`` with cross-attention down blocks and ``CrossAttnUpBlock2D`` in
   ``up_blocks[1]`` and ``up_blocks[2]`` (the engine hooks those and their self-attention), conditioned by a
   2-layer ``CLIPTextModel`` over a word-level tokenizer. Epsilon prediction with SD's noise schedule, Min-SNR(5)
   loss weighting (converges markedly faster at this size), 10% empty captions for classifier-free guidance, and an
   EMA of the weights, which is what gets saved.

The result is saved in the diffusers Stable Diffusion folder layout (``model_index.json`` plus one subfolder per
component, safetensors weights), so the engine loads it exactly like SD. State for ``--resume`` lives in a work
directory outside the repository. Budget split and schedules depend on wall-clock time, so the *data and
initialisation* are seeded, but the number of optimisation steps (recorded) depends on the machine's speed.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from luciddrag.engine import position
from luciddrag.engine.checkpoint import atomic_save, load_checkpoint
from luciddrag.evals.shapesworld import quality, world

TRAIN_SEED_STRIDE = 10_000_000  # training scene i of run seed S is render_scene(S * STRIDE + i)
HELDOUT_SEED_BASE = 900_000_000  # held-out evaluation scenes; never used for training (S < 90)
MAX_TOKENS = 24
SPECIAL_TOKENS = {"pad": "<pad>", "unk": "<unk>", "bos": "<bos>", "eos": "<eos>"}
IMAGE_SIZE = 64


@dataclass
class TrainConfig:
    out: Path
    work_dir: Path
    seed: int = 0
    minutes: float = 44.0  # total wall-clock budget of VAE + UNet training (rendering, encoding, eval excluded)
    vae_fraction: float = 0.3  # share of the budget for the VAE (it limits how crisp small shapes can be)
    vae_minutes: float | None = None  # fixed VAE budget instead of the fraction (e.g. to resume only the UNet)
    n_scenes: int = 24_000
    batch_size: int = 32
    vae_lr: float = 1e-3
    unet_lr: float = 1e-3
    warmup_steps: int = 200
    caption_dropout: float = 0.1
    attribute_dropout: float = 0.1
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    kl_weight: float = 1e-6
    checkpoint_every_s: float = 120.0
    docs_dir: Path | None = None
    threads: int = 2
    # Continue from a trained model folder: its VAE is kept as is (no VAE phase, same latents) and its EMA UNet and
    # text encoder are the starting weights. The whole budget goes to the UNet. Used to train a shipped model longer
    # without redoing the phases it already paid for.
    init_from: Path | None = None
    # Layout emphasis: loss weight x this factor for t >= layout_t. Where a shape goes is decided at high noise,
    # where Min-SNR-weighted eps loss gives the x0 error very little weight (eps MSE = SNR x x0 MSE), so position
    # words get almost no gradient (measured: the shipped model's samples ignore them). 1.0 = off.
    layout_weight: float = 1.0
    layout_t: int = 600
    # With init_from: keep only its VAE (and latents) and train a fresh UNet + text encoder of ``unet_levels`` levels.
    fresh_unet: bool = False
    unet_levels: int = 3
    # What the UNet predicts. "v_prediction" trains on v = sqrt(abar) eps - sqrt(1 - abar) x0 with x0-error weight
    # min(SNR + 1, gamma), which never drops below 1: the high-noise steps that decide layout (where a shape goes,
    # i.e. position words) keep real weight. "epsilon" with Min-SNR gives them x0 weight SNR (~0.005 at t = 999).
    prediction_type: str = "epsilon"
    # Explicit absolute position (engine/position.py) for a fresh UNet: "cross_attention" adds fixed 2D sin/cos
    # codes to the cross-attention queries, "input" to conv_in's output. None = stock UNet (zero padding only).
    position_signal: str | None = None
    # Zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps Are Flawed"): rescale
    # SD's betas so t = 999 is pure noise, and sample with "trailing" timesteps that start there. SD's schedule
    # leaves sqrt(abar) = 0.07 of the image at t = 999: enough for a big shape's place to be read off the noise in
    # training, so the model learns to take layout from the noise and ignore position words. Needs v_prediction.
    zero_terminal_snr: bool = False


# --------------------------------------------------------------------------------------------------- components


def build_tokenizer():
    """Word-level tokenizer over ``world.VOCABULARY``: "<bos> words <eos>", padded with <pad> to MAX_TOKENS."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {SPECIAL_TOKENS[k]: i for i, k in enumerate(("pad", "unk", "bos", "eos"))}
    for w in world.VOCABULARY:
        vocab[w] = len(vocab)
    tok = Tokenizer(WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    bos, eos = SPECIAL_TOKENS["bos"], SPECIAL_TOKENS["eos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=SPECIAL_TOKENS["unk"],
        pad_token=SPECIAL_TOKENS["pad"], model_max_length=MAX_TOKENS, padding_side="right")


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MAX_TOKENS, projection_dim=64,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    return CLIPTextModel(cfg)


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=IMAGE_SIZE)


def build_unet(levels: int = 3):
    """The ShapesWorld UNet: 16x16 latents, cross-attention at 16x16 and 8x8 and in the mid block.

    ``levels`` = 3 (shipped): 16 -> 8 -> 4, mid block at 4x4. ``levels`` = 4 adds a 2x2 level: nothing in an SD UNet
    encodes absolute position except zero padding, and on a 2x2 map every pixel is a different corner, so the mid
    block's cross-attention can tell "left" from "right" (experiment for position words, see docs/shapesworld)."""
    from diffusers import UNet2DConditionModel

    if levels not in (3, 4):
        raise ValueError(f"levels must be 3 or 4, not {levels}")
    extra = levels - 3
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D") + ("DownBlock2D",) * (1 + extra),
        up_block_types=("UpBlock2D",) * (1 + extra) + ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64) + (64,) * extra, layers_per_block=1, cross_attention_dim=64,
        attention_head_dim=4, norm_num_groups=8)


PREDICTION_TYPES = ("epsilon", "v_prediction")


def build_scheduler(prediction_type: str = "epsilon", zero_terminal_snr: bool = False):
    """DDIM with Stable Diffusion's settings (SD 2.1-768 is the v_prediction one); optionally zero terminal SNR."""
    from diffusers import DDIMScheduler

    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, not {prediction_type!r}")
    if zero_terminal_snr and prediction_type != "v_prediction":
        raise ValueError("zero terminal SNR needs v_prediction (--prediction v_prediction): at pure noise the noise "
                         "itself is the input")
    extra = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", steps_offset=0) if zero_terminal_snr \
        else dict(steps_offset=1)
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False, **extra)


def loss_target_and_weight(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, sched, prediction_type: str,
                           gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Regression target and per-sample loss weight, written as a weight on the x0 error.

    eps MSE = SNR * x0 MSE, v MSE = (SNR + 1) * x0 MSE. Epsilon with Min-SNR-gamma: x0 weight min(SNR, gamma).
    v: x0 weight min(SNR + 1, gamma), so at high noise (SNR -> 0) the x0 error still counts fully."""
    alphas = sched.alphas_cumprod.float()[t]
    snr = alphas / (1 - alphas)
    if prediction_type == "v_prediction":
        return sched.get_velocity(x0, noise, t), torch.clamp(snr + 1, max=gamma) / (snr + 1)
    if bool((snr <= 0).any()):
        raise ValueError("epsilon prediction cannot train at zero SNR; use v_prediction")
    return noise, torch.clamp(snr, max=gamma) / snr


def model_index() -> dict:
    import diffusers

    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def save_model(out: Path, tokenizer, text_encoder, vae, unet, prediction_type: str = "epsilon",
               zero_terminal_snr: bool = False) -> None:
    """Write the diffusers SD folder layout, safetensors only."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out / "tokenizer")
    text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    build_scheduler(prediction_type, zero_terminal_snr).save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps(model_index(), indent=2) + "\n")


@dataclass
class Components:
    tokenizer: object
    text_encoder: object
    vae: object
    unet: object
    scheduler: object


def load_components(folder: str | Path) -> Components:
    """Load each component the way the engine does: ``from_pretrained(folder, subfolder=...)``."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    folder = str(folder)
    comps = Components(
        tokenizer=AutoTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
        vae=AutoencoderKL.from_pretrained(folder, subfolder="vae"),
        unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
        scheduler=DDIMScheduler.from_pretrained(folder, subfolder="scheduler"),
    )
    position.install_from_config(comps.unet)
    for m in (comps.text_encoder, comps.vae, comps.unet):
        m.eval().requires_grad_(False)
    return comps


# --------------------------------------------------------------------------------------------------- data


@dataclass
class SceneSet:
    """Rendered training scenes kept compactly: uint8 images and per-shape attribute tuples (for captions)."""

    images: np.ndarray  # N x H x W x 3 uint8
    shapes: list[list[tuple[str, str, str, str]]]  # per scene: (shape, colour, size word, position phrase)

    def caption(self, i: int, rng: np.random.Generator, attribute_dropout: float) -> str:
        parts = [world.describe_shape(s, c, z if rng.random() >= attribute_dropout else None,
                                      p if rng.random() >= attribute_dropout else None)
                 for s, c, z, p in self.shapes[i]]
        return world.join_descriptions(parts)


def render_scene_set(seeds: range | list[int], desc: str = "render") -> SceneSet:
    images, shapes = [], []
    for s in tqdm(seeds, desc=desc, mininterval=10):
        sc = world.render_scene(s, IMAGE_SIZE)
        images.append(np.asarray(sc.image))
        shapes.append([(x.shape, x.colour, x.size_word, x.position) for x in sc.shapes])
    return SceneSet(np.stack(images), shapes)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NxHxWx3 -> float NCHW in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


# --------------------------------------------------------------------------------------------------- helpers


def lr_at(progress: float, step: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of ``base`` over the time budget (progress in [0, 1])."""
    warm = min(1.0, (step + 1) / warmup)
    return base * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    d = min(decay, (1 + step) / (10 + step))  # warm-up so early EMA is not dominated by the random init
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.mul_(d).add_(pm.detach(), alpha=1 - d)


def smooth(values: list[float], k: int = 50) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if len(v) < k:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    return (c[k:] - c[:-k]) / k


# --------------------------------------------------------------------------------------------------- phases


def train_vae(cfg: TrainConfig, data: SceneSet, budget_s: float, state_path: Path, log: dict) -> object:
    """Phase 1; resumable from ``state_path``."""
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + 1)
    step, elapsed, losses = 0, 0.0, []
    if state_path.exists():
        st = load_checkpoint(state_path)
        vae.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        step, elapsed, losses = st["step"], st["elapsed"], st["losses"]
        if st.get("done") and elapsed >= budget_s:
            log["vae"] = st["log"]
            return vae.eval()
        # A finished phase resumed with a larger budget trains on (the time-based cosine schedule picks up at
        # elapsed / new budget, i.e. a warm restart at a moderate learning rate).
    n = len(data.images)
    vae.train()
    t0, last_ckpt = time.time() - elapsed, time.time()
    bar = tqdm(desc="vae", mininterval=10, initial=step)
    while (elapsed := time.time() - t0) < budget_s:
        for g in opt.param_groups:
            g["lr"] = lr_at(elapsed / budget_s, step, cfg.vae_lr, cfg.warmup_steps)
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        x = to_tensor(data.images[idx.numpy()])
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        loss = mse + cfg.kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(mse.item())
        step += 1
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(mse=f"{np.mean(losses[-50:]):.4f}", t=f"{elapsed / 60:.1f}m")
        if time.time() - last_ckpt > cfg.checkpoint_every_s:
            atomic_save({"model": vae.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                         "step": step, "elapsed": elapsed, "losses": losses}, state_path)
            last_ckpt = time.time()
    bar.close()
    vae.eval()
    log["vae"] = {"steps": step, "seconds": round(elapsed, 1), "losses": losses,
                  "final_mse_train_ema50": float(np.mean(losses[-50:])) if losses else None}
    atomic_save({"model": vae.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "step": step,
                 "elapsed": elapsed, "losses": losses, "done": True, "log": log["vae"]}, state_path)
    return vae


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """Posterior means of all images (unscaled)."""
    out = [vae.encode(to_tensor(images[i:i + batch])).latent_dist.mean
           for i in tqdm(range(0, len(images), batch), desc="encode", mininterval=10)]
    return torch.cat(out)


def train_unet(cfg: TrainConfig, data: SceneSet, latents: torch.Tensor, tokenizer, budget_s: float,
               state_path: Path, log: dict) -> tuple[object, object]:
    """Phase 3; returns the EMA text encoder and UNet. Resumable from ``state_path``."""
    import copy

    torch.manual_seed(cfg.seed * 1000 + 3)
    if cfg.init_from is not None and not cfg.fresh_unet:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        unet = UNet2DConditionModel.from_pretrained(str(cfg.init_from), subfolder="unet")
        text_encoder = CLIPTextModel.from_pretrained(str(cfg.init_from), subfolder="text_encoder")
    else:
        unet, text_encoder = build_unet(cfg.unet_levels), build_text_encoder(tokenizer)
        if cfg.position_signal is not None:
            position.mark(unet, cfg.position_signal)
    position.install_from_config(unet)  # before the EMA copy, which inherits the hooks
    ema_unet, ema_te = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-4)
    sched = build_scheduler(cfg.prediction_type, cfg.zero_terminal_snr)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + 4)
    cap_rng = np.random.default_rng(cfg.seed * 1000 + 5)
    step, elapsed, losses = 0, 0.0, []
    if state_path.exists():
        st = load_checkpoint(state_path)
        for m, k in ((unet, "unet"), (text_encoder, "te"), (ema_unet, "ema_unet"), (ema_te, "ema_te")):
            m.load_state_dict(st[k])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        cap_rng.bit_generator.state = st["cap_rng"]
        step, elapsed, losses = st["step"], st["elapsed"], st["losses"]
        if st.get("done") and elapsed >= budget_s:
            budget_s = elapsed  # nothing left to train; fall through to the EMA weights

    def state(done: bool = False) -> dict:
        return {"unet": unet.state_dict(), "te": text_encoder.state_dict(), "ema_unet": ema_unet.state_dict(),
                "ema_te": ema_te.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                "cap_rng": cap_rng.bit_generator.state, "step": step, "elapsed": elapsed, "losses": losses,
                "done": done}

    n = len(latents)
    unet.train()
    text_encoder.train()
    t0, last_ckpt = time.time() - elapsed, time.time()
    bar = tqdm(desc="unet", mininterval=10, initial=step)
    while (elapsed := time.time() - t0) < budget_s:
        for g in opt.param_groups:
            g["lr"] = lr_at(elapsed / budget_s, step, cfg.unet_lr, cfg.warmup_steps)
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        captions = ["" if cap_rng.random() < cfg.caption_dropout
                    else data.caption(int(i), cap_rng, cfg.attribute_dropout) for i in idx]
        ids = tokenize(tokenizer, captions)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), generator=gen)
        xt = sched.add_noise(x0, noise, t)
        cond = text_encoder(ids).last_hidden_state
        pred = unet(xt, t, encoder_hidden_states=cond).sample
        target, w = loss_target_and_weight(x0, noise, t, sched, cfg.prediction_type, cfg.min_snr_gamma)
        w = w * torch.where(t >= cfg.layout_t, cfg.layout_weight, 1.0)
        loss = (w * F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema_unet, unet, cfg.ema_decay, step)
        ema_update(ema_te, text_encoder, cfg.ema_decay, step)
        losses.append(loss.item())
        step += 1
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-200:]):.4f}", t=f"{elapsed / 60:.1f}m")
        if time.time() - last_ckpt > cfg.checkpoint_every_s:
            atomic_save(state(), state_path)
            last_ckpt = time.time()
    bar.close()
    atomic_save(state(done=True), state_path)
    log["unet"] = {"steps": step, "seconds": round(elapsed, 1), "losses": losses,
                   "final_loss_mean200": float(np.mean(losses[-200:])) if losses else None,
                   "params_unet": sum(p.numel() for p in unet.parameters()),
                   "params_text_encoder": sum(p.numel() for p in text_encoder.parameters())}
    return ema_te.eval(), ema_unet.eval()


# --------------------------------------------------------------------------------------------------- docs


def save_loss_curves(log: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key, title in ((axes[0], "vae", "VAE reconstruction MSE ([-1,1])"),
                           (axes[1], "unet", f"UNet loss ({log.get('unet_loss_name', 'weighted MSE')})")):
        losses = log.get(key, {}).get("losses", [])
        if losses:
            ax.plot(losses, alpha=0.25, lw=0.5, label="per step")
            s = smooth(losses)
            ax.plot(np.arange(len(s)) + len(losses) - len(s), s, lw=1.5, label="mean of 50")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------- driver


def _history(previous: dict | None):
    """The chain of earlier training records a continued model carries (newest first)."""
    while previous:
        yield previous
        previous = previous.get("previous")


def history_before(record: dict, run_id: str) -> dict | None:
    """What a continued run records as ``previous``, from the training record found in its docs folder.

    That record is normally the starting model's; a resumed run may find its own earlier record there (same
    ``run_id``, which lives in the work dir), whose ``previous`` is then the real history. Work dirs alone cannot
    tell: the default one depends only on the seed, so a model and its continuation often share it."""
    if record.get("run_id") == run_id:
        record = record.get("previous") or {}
    keys = ("run_id", "config", "seconds", "vae", "unet", "previous")
    return {k: record.get(k) for k in keys} if record else None


def cumulative_minutes(previous: dict | None, train_s: float, fresh_unet: bool) -> float:
    """Training minutes that went into the saved model: this run plus its history. A fresh UNet inherits only the
    VAE, so UNet minutes count only back to the newest run that started its UNet afresh (or from scratch)."""
    total, count_unet = train_s, not fresh_unet
    for r in _history(previous):
        secs, cfg = r.get("seconds") or {}, r.get("config") or {}
        total += float(secs.get("vae", 0.0)) + (float(secs.get("unet", 0.0)) if count_unet else 0.0)
        if cfg.get("fresh_unet") or not cfg.get("init_from"):
            count_unet = False  # that run's UNet was new: nothing older went into it
    return round(total / 60, 1)


def run_id_of(work_dir: Path, fresh: bool) -> str:
    """This run's id, kept in its work dir: new on a fresh start, the same when resumed."""
    import uuid

    path = work_dir / "run_id.txt"
    if fresh or not path.exists():
        path.write_text(uuid.uuid4().hex + "\n")
    return path.read_text().strip()


def default_work_dir(seed: int) -> Path:
    return Path(tempfile.gettempdir()) / f"luciddrag_shapesworld_seed{seed}"


def check_config(cfg: TrainConfig) -> None:
    """Refuse combinations that would waste a training run; raises ValueError with what to do instead."""
    build_scheduler(cfg.prediction_type, cfg.zero_terminal_snr)  # its own checks: known type, zero SNR needs v
    if cfg.init_from is None and cfg.vae_minutes is not None and cfg.vae_minutes >= cfg.minutes:
        raise ValueError(f"the VAE's {cfg.vae_minutes:g} min would leave nothing of --minutes {cfg.minutes:g} for the "
                         f"UNet; give a smaller --vae-minutes")
    if cfg.position_signal is not None:
        position.check_mode(cfg.position_signal)
    if cfg.init_from is not None and not cfg.fresh_unet:
        try:
            sched_cfg = json.loads((cfg.init_from / "scheduler" / "scheduler_config.json").read_text())
            unet_cfg = json.loads((cfg.init_from / "unet" / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{cfg.init_from} is not a complete model folder: {exc}") from None
        theirs = sched_cfg.get("prediction_type", "epsilon")
        if theirs != cfg.prediction_type:
            raise ValueError(f"{cfg.init_from} predicts {theirs!r}; continuing it with prediction_type "
                             f"{cfg.prediction_type!r} would retrain its output from scratch. Train a new UNet "
                             f"(--fresh-unet) or keep the same prediction type.")
        their_zero = bool(sched_cfg.get("rescale_betas_zero_snr", False))
        if their_zero != cfg.zero_terminal_snr:
            raise ValueError(f"{cfg.init_from} was trained {'with' if their_zero else 'without'} zero terminal SNR; "
                             f"continue it {'with' if their_zero else 'without'} --zero-terminal-snr (or train a new "
                             f"UNet with --fresh-unet)")
        their_signal = position.mode_of(unet_cfg)
        if cfg.position_signal is not None and cfg.position_signal != their_signal:
            raise ValueError(f"{cfg.init_from} has position signal {their_signal!r}; a different one changes what "
                             f"its UNet sees, so it needs a new UNet (--fresh-unet)")


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Run all phases and write the model folder, docs and training record. Returns the record."""
    check_config(cfg)  # before anything in the work dir is discarded
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    vae_state, unet_state = cfg.work_dir / "vae_state.safetensors", cfg.work_dir / "unet_state.safetensors"
    if not resume:
        for p in (vae_state, unet_state, cfg.work_dir / "latents.safetensors"):
            p.unlink(missing_ok=True)
    run_id = run_id_of(cfg.work_dir, fresh=not resume)
    wall0 = time.time()
    budget_s = cfg.minutes * 60
    vae_budget = cfg.vae_minutes * 60 if cfg.vae_minutes is not None else budget_s * cfg.vae_fraction
    if cfg.init_from is not None:
        vae_budget = 0.0
    unet_budget = budget_s - vae_budget
    print(f"[shapesworld] budget {cfg.minutes:.1f} min: VAE {vae_budget / 60:.1f} min, "
          f"UNet {unet_budget / 60:.1f} min; {cfg.n_scenes} scenes; seed {cfg.seed}", flush=True)

    t = time.time()
    seeds = range(cfg.seed * TRAIN_SEED_STRIDE, cfg.seed * TRAIN_SEED_STRIDE + cfg.n_scenes)
    data = render_scene_set(seeds)
    render_s = time.time() - t
    log: dict = {"unet_loss_name": ("v MSE, x0 weight min(SNR+1, 5)" if cfg.prediction_type == "v_prediction"
                                    else "eps MSE, Min-SNR-5")}
    previous: dict | None = None
    if cfg.init_from is not None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(str(cfg.init_from), subfolder="vae").eval()
        log["vae"] = {"steps": 0, "seconds": 0.0, "losses": [], "kept_from": str(cfg.init_from)}
        prev_path = (cfg.docs_dir or Path("/nonexistent")) / "training_record.json"
        if prev_path.exists():  # carry the history of the model we start from into the new record
            previous = history_before(json.loads(prev_path.read_text()), run_id)
    else:
        vae = train_vae(cfg, data, vae_budget, vae_state, log)

    t = time.time()
    lat_path = cfg.work_dir / "latents.safetensors"
    cached = load_checkpoint(lat_path) if lat_path.exists() else None
    vae_key = log["vae"].get("kept_from") or log["vae"]["steps"]
    if isinstance(cached, dict) and cached.get("vae_steps") == vae_key:
        latents = cached["latents"]
    else:
        latents = encode_latents(vae, data.images)
        atomic_save({"latents": latents, "vae_steps": vae_key}, lat_path)
        if unet_state.exists():  # trained on other latents: useless now
            print("[shapesworld] VAE changed: discarding the UNet state", flush=True)
            unet_state.unlink()
    # A kept VAE keeps its scaling factor: the UNet we continue from was trained on latents scaled by it.
    scaling = float(vae.config.scaling_factor) if cfg.init_from is not None else float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    latents = latents * scaling
    encode_s = time.time() - t

    tokenizer = build_tokenizer()
    text_encoder, unet = train_unet(cfg, data, latents, tokenizer, unet_budget, unet_state, log)
    save_model(cfg.out, tokenizer, text_encoder, vae, unet, cfg.prediction_type, cfg.zero_terminal_snr)
    train_s = log["vae"]["seconds"] + log["unet"]["seconds"]
    print(f"[shapesworld] saved {cfg.out}; training used {train_s / 60:.1f} of {cfg.minutes:.1f} min "
          f"(+{(render_s + encode_s) / 60:.1f} min rendering/encoding)", flush=True)


    t = time.time()
    comps = load_components(cfg.out)
    q = quality.evaluate(comps, docs_dir=cfg.docs_dir)
    eval_s = time.time() - t
    record = {
        "run_id": run_id,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "torch_threads": cfg.threads,
        "seconds": {"render": round(render_s, 1), "vae": log["vae"]["seconds"], "encode": round(encode_s, 1),
                    "unet": log["unet"]["seconds"], "evaluate": round(eval_s, 1),
                    "total_wall": round(time.time() - wall0, 1)},
        "vae": {k: v for k, v in log["vae"].items() if k != "losses"},
        "unet": {k: v for k, v in log["unet"].items() if k != "losses"},
        "latent_scaling_factor": scaling,
        "quality": q,
    }
    if previous is not None:
        record["previous"] = previous
        record["cumulative_training_minutes"] = cumulative_minutes(previous, train_s, cfg.fresh_unet)
    if cfg.docs_dir is not None:
        cfg.docs_dir.mkdir(parents=True, exist_ok=True)
        save_loss_curves(log, cfg.docs_dir / "loss_curves.png")
        (cfg.docs_dir / "training_record.json").write_text(json.dumps(record, indent=2) + "\n")
        np.savez_compressed(cfg.work_dir / "losses.npz", vae=np.asarray(log["vae"]["losses"]),
                            unet=np.asarray(log["unet"]["losses"]))
    print(json.dumps({k: v for k, v in record.items() if k != "config"}, indent=2), flush=True)
    return record

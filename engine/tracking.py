"""Point tracking with diffusion features (DIFT): where did the handle's content go?

Used by the agent's critic (drag-accuracy self-verification) and by the Mean Distance metric. The recipe follows
DragDiffusion's evaluation of DIFT: noise the image's latent to timestep t, run the UNet once with the prompt, read
one decoder block's output (a forward hook, no copied forward), average over an ensemble of noises, upsample
bilinearly to the image size and take, for each handle, the most cosine-similar location in the other image.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from luciddrag.engine.energies import sample_at
from luciddrag.engine.features import FeatureTap
from luciddrag.engine.loading import Components
from luciddrag.engine.preprocess import pil_to_tensor_array, scale_point, to_rgb, working_size


@torch.no_grad()
def dift_features(c: Components, image: Image.Image, prompt: str, t: int, up_block: int, ensemble: int,
                  seed: int = 42, latent: str = "mean", generator: torch.Generator | None = None) -> torch.Tensor:
    """(C, h, w) features of an RGB image already at a valid working size.

    ``latent="sample"`` draws each ensemble member's latent from the VAE posterior, as DIFT's own code (and so
    DragBench's Mean Distance) does; ``"mean"`` (the critic's default) uses the posterior mean for all members.
    ``generator``: draw the posterior samples and the DDPM noise from it (continuing its stream; ``seed`` unused),
    so that two images featurised one after the other get independent noise, as DragDiffusion's evaluation does
    (seeded once, consecutive draws). Without it the noise is re-seeded from ``seed`` on every call.
    """
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(c.scheduler_config)
    vae = c.vae
    x = torch.from_numpy(pil_to_tensor_array(image))[None].to(c.device, vae.dtype)
    gen = generator if generator is not None else torch.Generator(device="cpu").manual_seed(seed)
    dist = vae.encode(x).latent_dist
    if latent == "sample":
        eps = torch.randn((ensemble, *dist.mean.shape[1:]), generator=gen).to(c.device, dist.mean.dtype)
        z = ((dist.mean + dist.std * eps) * vae.config.scaling_factor).to(c.dtype)
    elif latent == "mean":
        z = (dist.mean * vae.config.scaling_factor).to(c.dtype).expand(ensemble, -1, -1, -1)
    else:
        raise ValueError(f"latent must be 'mean' or 'sample', not {latent!r}")
    tok = c.tokenizer
    max_len = tok.model_max_length if tok.model_max_length and tok.model_max_length < 10_000 else 77
    ids = tok([prompt], padding="max_length", max_length=max_len, truncation=True, return_tensors="pt").input_ids
    emb = c.text_encoder(ids.to(c.device))[0].to(c.dtype)
    if latent == "mean" and generator is None:  # same noise stream as before the "sample" option existed
        gen = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn((ensemble, *z.shape[1:]), generator=gen).to(c.device, c.dtype)
    tt = torch.full((ensemble,), int(t), device=c.device, dtype=torch.long)
    noisy = sched.add_noise(z, noise, tt)
    tap = FeatureTap(c.unet, [up_block])
    try:
        with tap.capture() as feats:
            c.unet(noisy, tt, encoder_hidden_states=emb.expand(ensemble, -1, -1))
        out = feats[up_block].float().mean(0)
    finally:
        tap.remove()
    return out


def within_radius(points: Sequence[tuple[float, float]], radii: Sequence[float], image_size: tuple[int, int]
                  ) -> torch.Tensor:
    """(P, H*W) boolean: which pixels lie within each point's search radius."""
    w, h = image_size
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    pts = torch.tensor(points, dtype=torch.float32).view(-1, 1, 2)
    d2 = (xx.flatten()[None] - pts[..., 0]) ** 2 + (yy.flatten()[None] - pts[..., 1]) ** 2
    return d2 <= torch.tensor(radii, dtype=torch.float32).view(-1, 1) ** 2


def nearest_match(src_feat: torch.Tensor, dst_feat: torch.Tensor, points: Sequence[tuple[float, float]],
                  image_size: tuple[int, int], radii: Sequence[float] | None = None) -> list[tuple[float, float]]:
    """For each point of the source image, the pixel of the destination whose feature is most cosine-similar.

    Destination features are upsampled bilinearly to the full image size, as DragDiffusion's evaluation does.
    `radii` (pixels, one per point): search only that far from the point, as drag methods' own point tracking
    does -- a look-alike elsewhere (another shape's edge) can then not win.
    """
    w, h = image_size
    q = sample_at(src_feat[None], torch.tensor(points, dtype=torch.float32, device=src_feat.device), image_size)[0]
    dst = F.interpolate(dst_feat[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    dst = F.normalize(dst.flatten(1), dim=0)  # (C, H*W)
    sims = F.normalize(q, dim=0).T @ dst  # (P, H*W)
    if radii is not None:
        sims = sims.masked_fill(~within_radius(points, radii, image_size).to(sims.device), float("-inf"))
    idx = sims.argmax(-1).tolist()
    return [(float(i % w), float(i // w)) for i in idx]


def track_points(c: Components, source: Image.Image, edited: Image.Image, handles: Sequence[tuple[float, float]],
                 prompt: str = "", t: int = 261, up_block: int = 1, ensemble: int = 8, seed: int = 42,
                 resolution: int | None = None, radii: Sequence[float] | None = None) -> list[tuple[float, float]]:
    """Where each handle of `source` is found in `edited` (both the same size), in the images' own pixels;
    `radii`: search only within that many of the images' pixels of each handle (None: everywhere)."""
    src, _ = to_rgb(source)
    dst, _ = to_rgb(edited)
    if src.size != dst.size:
        dst = dst.resize(src.size, Image.Resampling.LANCZOS)
    size = src.size
    wsize = working_size(*size, resolution or c.native_size, c.size_multiple)
    src_w = src.resize(wsize, Image.Resampling.LANCZOS) if wsize != size else src
    dst_w = dst.resize(wsize, Image.Resampling.LANCZOS) if wsize != size else dst
    fs = dift_features(c, src_w, prompt, t, up_block, ensemble, seed)
    fd = dift_features(c, dst_w, prompt, t, up_block, ensemble, seed)
    pts = [scale_point(p, size, wsize) for p in handles]
    scale = wsize[0] / size[0]
    found = nearest_match(fs, fd, pts, wsize, None if radii is None else [r * scale for r in radii])
    return [scale_point(p, wsize, size) for p in found]


def point_distances(found: Sequence[tuple[float, float]], targets: Sequence[tuple[float, float]]) -> list[float]:
    """L2 distance of each tracked point to its target, in pixels: the one distance behind every Mean Distance (the
    critic's, DragBench's, the ShapesWorld scores')."""
    if len(found) != len(targets):
        raise ValueError(f"{len(found)} tracked points for {len(targets)} targets")
    return [math.dist(a, b) for a, b in zip(found, targets)]


def mean_distance(found: Sequence[tuple[float, float]], targets: Sequence[tuple[float, float]]) -> float:
    """Mean of `point_distances` (one image's Mean Distance)."""
    return float(np.mean(point_distances(found, targets)))

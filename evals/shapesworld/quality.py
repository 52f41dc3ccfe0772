"""How good is a trained ShapesWorld model? Text-to-image accuracy and DDIM inversion fidelity on held-out scenes.

* Sampling accuracy: DDIM (diffusers' ``DDIMScheduler`` in a plain loop, classifier-free guidance) from captions of
  held-out scenes (seeds disjoint from training); ``segment_objects`` on the sample must find, for every described
  shape, a distinct object of the right class and colour whose centroid lies in (or within ``POSITION_SLACK`` of)
  the named grid cell. Size words and spurious extra objects are reported separately.
* Inversion: encode a held-out image, run ``DDIMInverseScheduler`` to noise with the caption as condition (no
  guidance), regenerate with DDIM, decode; PSNR against the original. VAE-only reconstruction PSNR is the ceiling.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from luciddrag.evals.shapesworld import world
from luciddrag.evals.shapesworld.segment import SegObject, segment_objects

POSITION_SLACK = 0.05  # fraction of the image side a centroid may lie outside the named cell and still count
HELDOUT_SEED_BASE = 900_000_000


# --------------------------------------------------------------------------------------------------- sampling


@torch.no_grad()
def encode_prompts(comps, prompts: list[str]) -> torch.Tensor:
    tok = comps.tokenizer(prompts, padding="max_length", max_length=comps.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt")
    return comps.text_encoder(tok.input_ids).last_hidden_state


def _scheduler(comps, kind: str = "ddim"):
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    cls = DDIMInverseScheduler if kind == "inverse" else DDIMScheduler
    return cls.from_config(comps.scheduler.config)


def _eps(comps, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
         guidance: float) -> torch.Tensor:
    if uncond is None or guidance == 1.0:
        return comps.unet(x, t, encoder_hidden_states=cond).sample
    e = comps.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
    eu, ec = e.chunk(2)
    return eu + guidance * (ec - eu)


@torch.no_grad()
def sample(comps, prompts: list[str], steps: int = 30, guidance: float = 4.0, seed: int = 0,
           latents: torch.Tensor | None = None) -> np.ndarray:
    """DDIM samples for ``prompts`` (or from given starting latents): uint8 N x H x W x 3."""
    sched = _scheduler(comps)
    sched.set_timesteps(steps)
    cond = encode_prompts(comps, prompts)
    uncond = encode_prompts(comps, [""] * len(prompts)) if guidance != 1.0 else None
    if latents is None:
        size = comps.unet.config.sample_size
        g = torch.Generator().manual_seed(seed)
        latents = torch.randn((len(prompts), comps.unet.config.in_channels, size, size), generator=g)
    x = latents * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(_eps(comps, x, t, cond, uncond, guidance), t, x).prev_sample
    return decode(comps, x)


@torch.no_grad()
def decode(comps, latents: torch.Tensor) -> np.ndarray:
    img = comps.vae.decode(latents / comps.vae.config.scaling_factor).sample
    return ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def encode(comps, images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return comps.vae.encode(x).latent_dist.mean * comps.vae.config.scaling_factor


@torch.no_grad()
def invert(comps, images: np.ndarray, prompts: list[str], steps: int = 50) -> torch.Tensor:
    """DDIM-inverted noise latents of ``images`` (conditioned on ``prompts``, no guidance)."""
    inv = _scheduler(comps, "inverse")
    inv.set_timesteps(steps)
    cond = encode_prompts(comps, prompts)
    x = encode(comps, images)
    for t in inv.timesteps:
        x = inv.step(_eps(comps, x, t, cond, None, 1.0), t, x).prev_sample
    return x


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


# --------------------------------------------------------------------------------------------------- accuracy


def heldout_scenes(n: int, n_shapes: int | None = None, offset: int = 0) -> list[world.Scene]:
    return [world.render_scene(HELDOUT_SEED_BASE + offset + i, 64, n_shapes) for i in range(n)]


def near_cell(obj: SegObject, phrase: str, width: int, height: int, slack: float = POSITION_SLACK) -> bool:
    """Whether an object's centroid lies in the grid cell ``phrase`` names, give or take ``slack`` x side."""
    row, col = world.cell_of_phrase(phrase)
    x, y = obj.centroid
    x0, x1 = col * width / 3 - 0.5 - slack * width, (col + 1) * width / 3 - 0.5 + slack * width
    y0, y1 = row * height / 3 - 0.5 - slack * height, (row + 1) * height / 3 - 0.5 + slack * height
    return x0 <= x <= x1 and y0 <= y <= y1


def judge(shapes: list[tuple[str, str, str, str]], objects: list[SegObject], width: int, height: int) -> dict:
    """Match described shapes (shape, colour, size word, position) to segmented objects, greedily and distinctly.

    Returns per-caption booleans: ``class_colour`` (every shape has a distinct object of its class and colour),
    ``position`` (... that is also near its cell; the headline metric), ``size`` (... and has the right size word),
    ``extra`` (objects left over beyond the described ones).
    """
    def match(require_pos: bool, require_size: bool) -> bool:
        free = list(objects)
        for shape, colour, size, pos in shapes:
            cands = [o for o in free if o.shape == shape and o.colour == colour
                     and (not require_pos or near_cell(o, pos, width, height))
                     and (not require_size or world.size_word(o.size, width) == size)]
            if not cands:
                return False
            free.remove(max(cands, key=lambda o: o.area))
        return True

    return {"class_colour": match(False, False), "position": match(True, False), "size": match(True, True),
            "extra": len(objects) > len(shapes)}


def sampling_accuracy(comps, scenes: list[world.Scene], steps: int = 30, guidance: float = 4.0, seed: int = 0,
                      batch: int = 48) -> tuple[dict, np.ndarray]:
    """Aggregate ``judge`` over samples of the scenes' captions; returns (rates, images)."""
    imgs = np.concatenate([sample(comps, [s.caption for s in scenes[i:i + batch]], steps, guidance, seed + i)
                           for i in range(0, len(scenes), batch)])
    verdicts = []
    for sc, img in zip(scenes, imgs):
        desc = [(x.shape, x.colour, x.size_word, x.position) for x in sc.shapes]
        verdicts.append(judge(desc, segment_objects(img), img.shape[1], img.shape[0]))
    rates = {k: float(np.mean([v[k] for v in verdicts])) for k in verdicts[0]}
    rates["n"] = len(scenes)
    return rates, imgs


def grid(images: np.ndarray, cols: int, scale: int = 2, pad: int = 2) -> Image.Image:
    n, h, w, _ = images.shape
    rows = -(-n // cols)
    out = Image.new("RGB", (cols * (w * scale + pad) + pad, rows * (h * scale + pad) + pad), (255, 255, 255))
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        out.paste(Image.fromarray(im).resize((w * scale, h * scale), Image.NEAREST),
                  (pad + c * (w * scale + pad), pad + r * (h * scale + pad)))
    return out


def evaluate(comps, docs_dir: Path | None = None, n_single: int = 96, n_mixed: int = 96, n_invert: int = 32,
             steps: int = 30, guidance: float = 4.0, invert_steps: int = 50) -> dict:
    """The numbers in training_record.json["quality"]; writes sample_grid.png / inversion.png to ``docs_dir``."""
    single = heldout_scenes(n_single, n_shapes=1)
    mixed = heldout_scenes(n_mixed, offset=100_000)
    acc1, imgs1 = sampling_accuracy(comps, single, steps, guidance, seed=1)
    accm, imgsm = sampling_accuracy(comps, mixed, steps, guidance, seed=2)

    inv_scenes = heldout_scenes(n_invert, offset=200_000)
    originals = np.stack([s.array() for s in inv_scenes])
    prompts = [s.caption for s in inv_scenes]
    vae_rec = decode(comps, encode(comps, originals))
    noise = invert(comps, originals, prompts, invert_steps)
    regen = sample(comps, prompts, invert_steps, guidance=1.0, latents=noise)
    def seg_rate(images: np.ndarray) -> float:
        """Share of images whose segmentation matches the scene exactly (class, colour, cell, size word)."""
        ok = [judge([(x.shape, x.colour, x.size_word, x.position) for x in sc.shapes], segment_objects(im), 64, 64)
              for sc, im in zip(inv_scenes, images)]
        return float(np.mean([v["size"] and not v["extra"] for v in ok]))

    result = {
        "sampling": {"steps": steps, "guidance": guidance, "position_slack": POSITION_SLACK,
                     "single_shape_captions": acc1, "mixed_captions_1_to_3_shapes": accm},
        "inversion": {"steps": invert_steps, "n": n_invert,
                      "vae_recon_psnr_db": float(np.mean([psnr(a, b) for a, b in zip(originals, vae_rec)])),
                      "ddim_inversion_recon_psnr_db": float(np.mean([psnr(a, b) for a, b in zip(originals, regen)])),
                      "inverted_latent_std": float(noise.std()),
                      "vae_recon_segmentation_exact_rate": seg_rate(vae_rec),
                      "ddim_inversion_recon_segmentation_exact_rate": seg_rate(regen)},
        "heldout_seed_base": HELDOUT_SEED_BASE,
    }
    if docs_dir is not None:
        docs_dir = Path(docs_dir)
        docs_dir.mkdir(parents=True, exist_ok=True)
        # Rows alternate: 8 held-out originals, then the 8 samples of their captions.
        pairs = []
        for i in range(0, 32, 8):
            pairs += [np.stack([s.array() for s in mixed[i:i + 8]]), imgsm[i:i + 8]]
        grid(np.concatenate(pairs), 8).save(docs_dir / "sample_grid.png")
        (docs_dir / "sample_grid_captions.txt").write_text(
            "Rows alternate: held-out original, then a DDIM sample of its caption "
            f"({steps} steps, CFG {guidance}).\n" + "\n".join(s.caption for s in mixed[:32]) + "\n")
        grid(np.concatenate([originals[:8], vae_rec[:8], regen[:8]]), 8).save(docs_dir / "inversion.png")
    return result

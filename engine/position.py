"""An explicit absolute-position signal for UNets trained with one (the ShapesWorld model).

A convolutional UNet knows where a pixel is only through zero padding, and SD's attention blocks carry no positional
embedding. On ShapesWorld that left position words ("a red circle on the left") ignored after every amount of
training a CPU allows; the shipped ShapesWorld model is trained with this signal ("cross_attention") and v prediction
and follows them (docs/shapesworld/README.md). A model trained with a position signal gets fixed 2D sine/cosine
features added where the mode says:

* ``"cross_attention"``: to the input of every cross-attention (so only to its queries): a pixel can then attend to
  the words that name its place. Raw coordinates never enter the residual stream; what the attention output adds
  there does depend on place (that is the point), so the features the engine matches are somewhat place-aware.
* ``"input"``: to the output of ``conv_in`` (CoordConv-like; every layer sees position).

The signal is fixed, not learned, so it adds no weights: the UNet stays a stock ``UNet2DConditionModel`` that plain
diffusers loads. The mode is recorded in the UNet's ``config.json`` (key ``CONFIG_KEY``) and every loader of ours
installs it with forward hooks (``install_from_config``). Plain diffusers ignores the key: the model then runs on
inputs unlike its training (not measured what it draws then; in "input" mode every layer is off).
"""

from __future__ import annotations

import functools
import logging
import math
import re
import threading
from typing import Any

import torch

CONFIG_KEY = "luciddrag_position_signal"
MODES = ("cross_attention", "input")


class _QuietAboutOurKey(logging.Filter):
    """diffusers warns that config keys its class does not know "will be ignored"; ours is read here, so that
    warning would only mislead."""

    def filter(self, record: logging.LogRecord) -> bool:
        # only when ours is the sole unexpected key: any other one is still worth the warning
        return re.search(r"\{'" + CONFIG_KEY + r"': '\w+'\}", record.getMessage()) is None


logging.getLogger("diffusers.configuration_utils").addFilter(_QuietAboutOurKey())


def check_mode(mode: str) -> str:
    """``mode`` if it is one this module knows; ValueError otherwise."""
    if mode not in MODES:
        raise ValueError(f"position_signal must be one of {MODES}, not {mode!r}")
    return mode


def sincos_2d(dim: int, height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(height * width, dim) position codes; see ``_sincos_2d``. Cached: hooks call this at every attention."""
    return _sincos_2d(dim, height, width, torch.device("cpu" if device is None else device), dtype).clone()


@functools.lru_cache(maxsize=64)
def _sincos_2d(dim: int, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(height * width, dim) features of each pixel centre's normalised (x, y) in [0, 1]: half the channels for x,
    half for y, sin and cos at frequencies pi/2 .. 8 pi (geometric), row-major like a flattened feature map.

    Normalised coordinates give the same code to the same image place at every feature-map resolution; the top
    frequency stays at a few periods per image so 16x16 maps do not alias it (on 8x8 it sits at Nyquist and on 4x4
    the top ones alias to constants: harmless, the lowest frequencies keep every code distinct)."""
    if dim % 4:
        raise ValueError(f"position signal needs a channel count divisible by 4, not {dim}")
    k = dim // 4
    freqs = math.pi * 0.5 * torch.pow(16.0, torch.arange(k, dtype=torch.float64) / max(k - 1, 1))
    ys = (torch.arange(height, dtype=torch.float64) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float64) + 0.5) / width
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")

    def code(c: torch.Tensor) -> torch.Tensor:
        a = c.reshape(-1, 1) * freqs
        return torch.cat([a.sin(), a.cos()], dim=1)

    return torch.cat([code(xx), code(yy)], dim=1).to(device=device, dtype=dtype)


class _FeatureMapSize:
    """Remembers the (height, width) of the last 4D input of a transformer block, for its attention hooks (which see
    only flattened tokens). Per thread: the agent's critic may run the shared down blocks while an edit runs."""

    def __init__(self) -> None:
        self._local = threading.local()

    @property
    def hw(self) -> tuple[int, int] | None:
        return getattr(self._local, "hw", None)

    def record(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        if x is not None and x.ndim == 4:
            self._local.hw = (int(x.shape[-2]), int(x.shape[-1]))

    def __reduce__(self):  # thread-locals cannot be copied or pickled: a copy starts empty (deepcopy, torch.save)
        return (_FeatureMapSize, ())


class _AddToQueries:
    def __init__(self, size: _FeatureMapSize) -> None:
        self.size = size

    def __call__(self, module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        if x.ndim != 3:
            return None
        n = x.shape[1]
        h, w = self.size.hw if self.size.hw is not None else (math.isqrt(n), math.isqrt(n))
        if h * w != n:
            raise RuntimeError(f"position signal: cannot lay {n} tokens out as a {h}x{w} map")
        x = x + _sincos_2d(x.shape[-1], h, w, x.device, x.dtype)  # cached, shared: never modified in place
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x}


def _add_to_output(module, args, out):
    return out + _sincos_2d(out.shape[1], out.shape[-2], out.shape[-1], out.device, out.dtype).T.reshape(
        1, out.shape[1], out.shape[-2], out.shape[-1])


def install(unet: torch.nn.Module, mode: str) -> list[Any]:
    """Add the position signal to ``unet`` with forward hooks; returns the hook handles (``.remove()`` undoes it).

    Hooks, not a patched ``forward``: the engine's attention processors and feature hooks compose with them."""
    if check_mode(mode) == "input":
        return [unet.conv_in.register_forward_hook(_add_to_output)]
    from diffusers.models.attention_processor import Attention
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    handles, n_attn = [], 0
    for block in unet.modules():
        if not isinstance(block, Transformer2DModel):
            continue
        cross = [m for m in block.modules() if isinstance(m, Attention) and m.is_cross_attention]
        if not cross:
            continue
        size = _FeatureMapSize()
        handles.append(block.register_forward_pre_hook(size.record, with_kwargs=True))
        for m in cross:
            handles.append(m.register_forward_pre_hook(_AddToQueries(size), with_kwargs=True))
            n_attn += 1
    if n_attn == 0:
        raise ValueError("position signal 'cross_attention' needs a UNet with cross-attention transformer blocks")
    return handles


def mark(unet: torch.nn.Module, mode: str) -> None:
    """Record ``mode`` in the UNet's config so ``save_pretrained`` writes it and our loaders reinstall it."""
    unet.register_to_config(**{CONFIG_KEY: check_mode(mode)})


def mode_of(config: dict) -> str | None:
    """The position-signal mode a UNet config (``config.json`` contents) records, if any."""
    mode = dict(config).get(CONFIG_KEY)
    if mode is not None and mode not in MODES:
        raise ValueError(f"unknown position signal {mode!r} in the UNet config; this LucidDrag knows {MODES}")
    return mode


def install_from_config(unet: torch.nn.Module, config: dict | None = None) -> str | None:
    """Install what ``config`` (default: the UNet's own) records; returns the mode or None. Idempotent per UNet."""
    mode = mode_of(config if config is not None else unet.config)
    installed = getattr(unet, "_luciddrag_position_signal", None)
    if mode is None or installed == mode:
        return mode
    if installed is not None:
        raise ValueError(f"this UNet already has the {installed!r} position signal; cannot add {mode!r} on top")
    install(unet, mode)
    unet._luciddrag_position_signal = mode
    return mode

"""The memory bank: decoder self-attention K/V recorded during inversion and injected during sampling.

Implemented as a diffusers attention processor installed on the UNet decoder's self-attention layers (`attn1` under
`up_blocks`), never by touching the UNet's forward. We store the *normalised hidden states* that enter the layer rather
than K and V: K = to_k(h) and V = to_v(h) are recomputed on use, which halves the bank's memory for the cost of two
small matmuls per layer and step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

Mode = Literal["off", "record", "inject"]


@dataclass
class MemoryBank:
    """Per (timestep, layer) hidden states of the inverted image(s); row i = inversion i."""

    store: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    device: torch.device | None = None  # None: keep on the UNet's device; "cpu" to spare GPU memory

    def put(self, t: int, layer: str, h: torch.Tensor) -> None:
        h = h.detach()
        self.store[(t, layer)] = h.to(self.device) if self.device is not None else h

    def get(self, t: int, layer: str, device: torch.device) -> torch.Tensor | None:
        h = self.store.get((t, layer))
        return None if h is None else h.to(device, non_blocking=True)

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.store.values())

    def clear(self) -> None:
        self.store.clear()


@dataclass
class AttentionControl:
    """Shared switchboard read by every memory processor during one UNet call."""

    bank: MemoryBank = field(default_factory=MemoryBank)
    mode: Mode = "off"
    timestep: int = -1
    rows: torch.Tensor | None = None  # for each batch row of the current call, the bank row it reads
    kv_mode: Literal["concat", "replace"] = "concat"
    record_timesteps: set[int] | None = None  # None: record every timestep
    # K/V of the memory for the current timestep: the guided and the unconditional pass of one step attend to the
    # same memory rows, so to_k / to_v of it are computed once per step and layer (frozen weights: no graph)
    kv_cache: dict = field(default_factory=dict)
    kv_cache_timestep: int | None = None

    def memory_kv(self, attn, name: str, device: torch.device, dtype: torch.dtype):
        """(K, V) of the memory bank's rows for this call, or None when nothing was recorded for this step."""
        if self.kv_cache_timestep != self.timestep:
            self.kv_cache.clear()
            self.kv_cache_timestep = self.timestep
        key = (name, None if self.rows is None else id(self.rows), dtype)
        if key not in self.kv_cache:
            mem = self.bank.get(self.timestep, name, device)
            if mem is None:
                return None
            mem = mem.to(dtype)
            if self.rows is not None:
                mem = mem.index_select(0, self.rows.to(mem.device))
            with torch.no_grad():
                self.kv_cache[key] = (attn.to_k(mem), attn.to_v(mem))
        return self.kv_cache[key]


class MemoryAttnProcessor:
    """Self-attention that can record its input to, or attend to, the memory bank."""

    def __init__(self, name: str, control: AttentionControl) -> None:
        self.name = name
        self.control = control

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        c = self.control
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
            b, ch, hh, ww = hidden_states.shape
            hidden_states = hidden_states.view(b, ch, hh * ww).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        batch = hidden_states.shape[0]

        if c.mode == "record" and (c.record_timesteps is None or c.timestep in c.record_timesteps):
            c.bank.put(c.timestep, self.name, hidden_states)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        if c.mode == "inject":
            kv = c.memory_kv(attn, self.name, hidden_states.device, hidden_states.dtype)
            if kv is not None:
                mk, mv = kv
                if c.kv_mode == "replace":
                    key, value = mk, mv
                else:
                    key, value = torch.cat([key, mk], dim=1), torch.cat([value, mv], dim=1)

        head_dim = key.shape[-1] // attn.heads
        q = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        k = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        v = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(b, ch, hh, ww)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def decoder_self_attention_names(unet) -> list[str]:
    """Processor keys of the decoder's self-attention layers (e.g. 'up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor')."""
    return [k for k in unet.attn_processors if k.startswith("up_blocks.") and ".attn1." in k]


def install_memory(unet, control: AttentionControl) -> list[str]:
    """Install memory processors on the decoder's self-attention; other layers keep their processors.

    Returns the layer names; `uninstall_memory` restores the previous processors.
    """
    names = decoder_self_attention_names(unet)
    if not names:
        raise ValueError("this UNet has no self-attention in its decoder (no CrossAttnUpBlock2D): K/V injection needs one")
    procs = dict(unet.attn_processors)
    unet._luciddrag_saved_processors = dict(procs)  # noqa: SLF001 - our own attribute, for uninstall
    for n in names:
        procs[n] = MemoryAttnProcessor(n, control)
    unet.set_attn_processor(procs)
    return names


def uninstall_memory(unet) -> None:
    saved = getattr(unet, "_luciddrag_saved_processors", None)
    if saved is not None:
        unet.set_attn_processor(saved)
        del unet._luciddrag_saved_processors

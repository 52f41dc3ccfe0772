"""Tiny SD-architecture models built in code, for tests and CPU benchmarks (no downloads).

Real diffusers/transformers classes with a few hundred thousand random parameters, saved as a standard diffusers
folder so the `from_pretrained` path is exercised exactly as for a hub checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

TINY_WORDS = ("a", "an", "the", "photo", "of", "red", "green", "blue", "circle", "square", "small", "big", "cat",
              "dog", "left", "right", "on", "moved", "longer", "shorter", "head", "raised")


def build_word_tokenizer(words: Sequence[str], max_length: int = 16):
    """A word-level fast tokenizer (lower-cased, whitespace/punctuation split) with CLIP-like special tokens."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|unk|>", "<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(w.lower() for w in words)))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 2), ("<|endoftext|>", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<|pad|>", unk_token="<|unk|>", bos_token="<|startoftext|>",
        eos_token="<|endoftext|>", model_max_length=max_length,
    )


def tiny_configs(vocab_size: int, sample_size: int = 8, cross_dim: int = 32) -> dict:
    """Configs of a tiny SD-like model: VAE 4x down (2 downsamples), UNet with attention in the decoder."""
    return {
        "unet": dict(
            sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(16, 32, 32), norm_num_groups=8, cross_attention_dim=cross_dim,
            attention_head_dim=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        ),
        "vae": dict(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
            norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            sample_size=sample_size * 4,
        ),
        "text_encoder": dict(
            vocab_size=vocab_size, hidden_size=cross_dim, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        ),
        "scheduler": dict(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
        ),
    }


def build_tiny_model(folder: str | Path, seed: int = 0, sample_size: int = 8,
                     prediction_type: str = "epsilon") -> Path:
    """Write a random tiny SD-architecture checkpoint to `folder` (diffusers layout, safetensors)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    tok = build_word_tokenizer(TINY_WORDS)
    cfg = tiny_configs(len(tok), sample_size)
    cfg["scheduler"]["prediction_type"] = prediction_type
    torch.manual_seed(seed)
    UNet2DConditionModel(**cfg["unet"]).save_pretrained(folder / "unet")
    AutoencoderKL(**cfg["vae"]).save_pretrained(folder / "vae")
    CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])).save_pretrained(folder / "text_encoder")
    tok.save_pretrained(folder / "tokenizer")
    DDIMScheduler(**cfg["scheduler"]).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }, indent=2))
    return folder

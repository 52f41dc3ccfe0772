"""The engine's speed/memory switches and batching: exact where the maths is unchanged, a stated tolerance where
the arithmetic changes (reduced precision)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import luciddrag.engine.pipeline as pipeline
from luciddrag.engine.memory import MemoryAttnProcessor, install_memory, uninstall_memory
from luciddrag.engine.pipeline import DragEditor, EngineOptions, request_schedule, scale_schedule
from luciddrag.engine.request import GuidanceConfig
from tests.engine_inputs import blocky_image, small_request

PAIRS = [("a red circle", "a big red circle"), ("a red circle", "a small red circle"), ("a cat", "a cat moved left")]


def _image(w=48, h=40, seed=0):
    return blocky_image(w, h, seed)


def _req(**kw):
    return small_request(**{"steps": 8, **kw})


def _editor(tiny_model_dir, **options) -> DragEditor:
    return DragEditor.from_pretrained(str(tiny_model_dir), device="cpu", show_progress=False,
                                      options=EngineOptions(**options))


@pytest.mark.slow
def test_pruned_tail_and_gradient_checkpointing_are_exact(tiny_editor, tiny_model_dir):
    """Both change what autograd keeps, not the numbers: latents bit-identical to the default editor's."""
    ref = tiny_editor.edit(_req())
    full_graph = DragEditor(tiny_editor.c, show_progress=False, options=EngineOptions(prune_tail=False)).edit(_req())
    assert torch.equal(full_graph.latents, ref.latents)
    ckpt = _editor(tiny_model_dir, gradient_checkpointing=True)
    assert ckpt.c.unet.is_gradient_checkpointing
    out = ckpt.edit(_req())
    assert torch.equal(out.latents, ref.latents)
    assert out.stats["unet_backward"] == ref.stats["unet_backward"] > 0


def test_pruned_tail_restores_grad_mode_and_keeps_the_features_graph(tiny_editor):
    from luciddrag.engine.features import FeatureTap

    unet = tiny_editor.c.unet
    tap = FeatureTap(unet, (1,))  # up_blocks[2] and conv_out form the tail
    try:
        x = torch.randn(1, 4, 8, 8, requires_grad=True)
        with torch.enable_grad(), tap.capture() as feats:
            out = unet(x, 500, encoder_hidden_states=torch.zeros(1, 16, 32)).sample
            assert torch.is_grad_enabled()  # switched off for the tail only, back on when the UNet returns
        assert feats[1].requires_grad and not out.requires_grad
    finally:
        tap.remove()


@pytest.mark.slow
def test_reduced_precision_unet_keeps_fp32_energies_and_a_bank_in_its_dtype(tiny_editor, tiny_model_dir):
    """bf16 UNet (the CPU stand-in for fp16 on CUDA): energies and the DDIM step stay fp32. Stated tolerance: final
    latents within 30% relative L2 of the fp32 run (measured 20%: a random UNet's epsilon swings wildly between
    neighbouring latents, so bf16's ~3 digits compound over 8 inversion + 8 sampling steps), drag energies within
    5%."""
    ref = tiny_editor.edit(_req())
    low = DragEditor.from_pretrained(str(tiny_model_dir), device="cpu", dtype="bf16", show_progress=False)
    res = low.edit(_req())
    assert low.c.unet.dtype == torch.bfloat16
    assert res.latents.dtype == torch.float32 and torch.isfinite(res.latents).all()
    rel = float((res.latents - ref.latents).norm() / ref.latents.norm())
    assert rel < 0.3, rel
    assert res.stats["memory_bank_mb"] == pytest.approx(ref.stats["memory_bank_mb"] / 2)  # stored in bf16
    drag = [d["drag"][0] for d in res.diagnostics if "drag" in d]
    ref_drag = [d["drag"][0] for d in ref.diagnostics if "drag" in d]
    assert np.allclose(drag, ref_drag, rtol=0.05)


def test_every_attention_layer_runs_sdpa_with_the_memory_bank_installed(tiny_editor):
    unet = tiny_editor.c.unet
    from luciddrag.engine.memory import AttentionControl

    install_memory(unet, AttentionControl())
    try:
        kinds = {type(p).__name__ for p in unet.attn_processors.values()}
    finally:
        uninstall_memory(unet)
    # AttnProcessor2_0 is diffusers' F.scaled_dot_product_attention processor; ours calls SDPA too
    assert kinds == {"AttnProcessor2_0", MemoryAttnProcessor.__name__}


def test_out_of_memory_splits_the_intention_batch_with_a_message(tiny_editor, monkeypatch, caplog):
    batched = tiny_editor.edit(_req(), intentions=PAIRS)
    real = pipeline.collaborative_guidance_sample
    tried = []

    def small_device(unet_call, latents, plan, terms, callback=None, progress=False):
        tried.append(latents.shape[0])
        if latents.shape[0] > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(unet_call, latents, plan, terms, callback, progress)

    monkeypatch.setattr(pipeline, "collaborative_guidance_sample", small_device)
    with caplog.at_level(logging.WARNING, logger="luciddrag.engine"):
        split = tiny_editor.edit(_req(), intentions=PAIRS)
    assert tried == [3, 2, 1, 1, 1]
    assert split.stats["sample_batches"] == [1, 1, 1] and split.stats["inversions"] == 2  # inversion not redone
    assert "out of memory sampling 3 intentions" in caplog.text and "batches of 2" in caplog.text
    assert torch.allclose(split.latents, batched.latents, rtol=1e-3, atol=1e-3)
    assert [len(d["drag"]) for d in split.diagnostics if "drag" in d] == [3] * 8


def test_one_intention_out_of_memory_is_a_resource_error(tiny_editor, monkeypatch):
    from luciddrag.engine.errors import ResourceError

    def no_memory(*a, **k):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(pipeline, "collaborative_guidance_sample", no_memory)
    with pytest.raises(ResourceError, match="out of memory"):
        tiny_editor.edit(_req())


def test_max_batch_samples_in_chunks(tiny_editor):
    batched = tiny_editor.edit(_req(), intentions=PAIRS)
    chunked = DragEditor(tiny_editor.c, show_progress=False, options=EngineOptions(max_batch=2)).edit(
        _req(), intentions=PAIRS)
    assert chunked.stats["sample_batches"] == [2, 1]
    assert torch.allclose(chunked.latents, batched.latents, rtol=1e-3, atol=1e-3)


def test_fast_mode_scales_the_guidance_schedule(tiny_editor):
    g = GuidanceConfig(edit_steps=30, kv_start_step=5)
    assert (scale_schedule(g, 50, 25).edit_steps, scale_schedule(g, 50, 25).kv_start_step) == (15, 3)
    assert request_schedule(_req(steps=50))[0] == 50
    steps, cfg = request_schedule(_req(steps=50, fast=True, guidance=g))
    assert steps == 25 and (cfg.edit_steps, cfg.kv_start_step) == (15, 3)
    assert request_schedule(_req(steps=10, fast=True))[0] == 10  # already fewer steps than the preset
    fast = tiny_editor.edit(_req(steps=50, fast=True, guidance=g))
    same = tiny_editor.edit(_req(steps=25, guidance=GuidanceConfig(edit_steps=15, kv_start_step=3)))
    assert fast.stats["steps"] == 25 and len(fast.diagnostics) == 25
    assert torch.equal(fast.latents, same.latents)
    assert fast.stats["unet_backward"] == 15

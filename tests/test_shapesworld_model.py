"""The shipped ShapesWorld model: standard SD folder layout, loads per component, samples the right shapes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from luciddrag.evals.shapesworld import MODEL_DIR, world
from luciddrag.evals.shapesworld.segment import segment_objects

FOLDER = Path(os.environ.get("LUCIDDRAG_SHAPESWORLD_MODEL", MODEL_DIR))
pytestmark = pytest.mark.skipif(not (FOLDER / "model_index.json").exists(),
                                reason=f"no trained ShapesWorld model at {FOLDER}")


@pytest.fixture(scope="module")
def comps():
    from luciddrag.evals.shapesworld.train import load_components

    torch.set_num_threads(2)
    return load_components(FOLDER)


def test_folder_layout_is_a_stable_diffusion_folder() -> None:
    index = json.loads((FOLDER / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert name in index and (FOLDER / name).is_dir()
    weights = [p.name for p in FOLDER.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".safetensors")]
    assert weights and all(w.endswith(".safetensors") for w in weights)


def test_components_and_architecture(comps) -> None:
    from diffusers import DDIMScheduler
    from diffusers.models.unets.unet_2d_blocks import CrossAttnUpBlock2D

    unet = comps.unet
    for i in (1, 2):  # the engine hooks these blocks' outputs and their self-attention K/V
        block = unet.up_blocks[i]
        assert isinstance(block, CrossAttnUpBlock2D)
        tb = block.attentions[0].transformer_blocks[0]
        assert tb.attn1.is_cross_attention is False and tb.attn2.is_cross_attention is True
    assert unet.config.cross_attention_dim == comps.text_encoder.config.hidden_size
    assert isinstance(comps.scheduler, DDIMScheduler)
    cfg = comps.scheduler.config
    assert (cfg.num_train_timesteps, cfg.beta_schedule, cfg.prediction_type, cfg.steps_offset) == \
        (1000, "scaled_linear", "v_prediction", 1)
    assert cfg.beta_start == pytest.approx(0.00085) and cfg.beta_end == pytest.approx(0.012)
    assert not cfg.clip_sample and not cfg.set_alpha_to_one


def test_tokenizer_is_word_level_and_consistent(comps) -> None:
    tok, te = comps.tokenizer, comps.text_encoder
    caption = world.render_scene(1).caption
    ids = tok(caption, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    words = caption.split()
    assert len(ids) == tok.model_max_length
    assert ids[0] == tok.bos_token_id and ids[len(words) + 1] == tok.eos_token_id
    assert tok.unk_token_id not in ids and ids[-1] == tok.pad_token_id
    assert tok.convert_ids_to_tokens(ids[1:len(words) + 1]) == words
    assert all(w in tok.get_vocab() for w in world.VOCABULARY)
    assert (te.config.eos_token_id, te.config.bos_token_id, te.config.pad_token_id) == \
        (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id)
    assert te.config.max_position_embeddings >= tok.model_max_length


def test_latents_have_about_unit_std(comps) -> None:
    from luciddrag.evals.shapesworld.quality import encode

    imgs = np.stack([world.render_scene(900_500_000 + i).array() for i in range(16)])
    z = encode(comps, imgs)
    assert z.shape == (16, 4, 16, 16)
    assert 0.6 < float(z.std()) < 1.6


def test_few_step_samples_draw_the_prompted_shapes(comps) -> None:
    """4 DDIM steps must give images; 8 steps must give the prompted class and colour (measured: 89% over all
    15 class/colour pairs and 3 seeds at 8 steps, 69% at 4 steps, 91% at 20 steps, for "a big ... in the center")."""
    from luciddrag.evals.shapesworld.quality import sample

    pairs = (("circle", "red"), ("square", "blue"), ("triangle", "green"), ("circle", "yellow"),
             ("square", "purple"), ("triangle", "red"))
    prompts = [world.describe_shape(s, c, "big", "in the center") for s, c in pairs]
    quick = sample(comps, prompts[:2], steps=4, guidance=4.0, seed=0)
    assert quick.shape == (2, 64, 64, 3) and quick.dtype == np.uint8
    assert all(segment_objects(img) for img in quick)  # something saturated was drawn
    imgs = sample(comps, prompts, steps=8, guidance=4.0, seed=0)
    hits = sum(any(o.shape == s and o.colour == c for o in segment_objects(img)) for (s, c), img in zip(pairs, imgs))
    assert hits >= 5, f"only {hits}/6 eight-step samples show the prompted shape"


def test_shipped_model_predicts_v_on_sd_schedule_with_the_position_signal(comps) -> None:
    cfg = comps.scheduler.config
    # v prediction + a position signal on the cross-attention queries: what makes position words work
    # (docs/shapesworld/README.md); SD's own schedule (no zero terminal SNR), which the drag engine needs
    assert (cfg.num_train_timesteps, cfg.beta_schedule, cfg.prediction_type) == (1000, "scaled_linear", "v_prediction")
    assert not cfg.get("rescale_betas_zero_snr", False) and float(comps.scheduler.alphas_cumprod[-1]) > 1e-3
    assert getattr(comps.unet, "_luciddrag_position_signal", None) == "cross_attention"  # installed on load


def test_shipped_model_puts_the_shape_where_the_caption_says(comps) -> None:
    """Position words work: one prompt per grid cell, the drawn circle must land in (or next to) the named cell for
    most of them (a model without the position signal scores at chance here, ~2/9)."""
    from luciddrag.evals.shapesworld.quality import near_cell, sample

    phrases = world.POSITION_PHRASES
    images = sample(comps, [world.describe_shape("circle", "red", "big", p) for p in phrases], steps=10,
                    guidance=4.0, seed=0)
    placed = [bool(objs := segment_objects(img)) and near_cell(objs[0], p, 64, 64) for p, img in zip(phrases, images)]
    assert sum(placed) >= 7, f"only {sum(placed)}/9 circles in the named cell: {dict(zip(phrases, placed))}"


@pytest.mark.slow
def test_loads_as_a_whole_stable_diffusion_pipeline() -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(FOLDER))
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a big red circle in the center", num_inference_steps=3, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 64, 64, 3)


def test_training_checkpoints_are_safetensors_and_resume_exactly(tmp_path: Path) -> None:
    """The trainer's resume state (weights, Adam, RNGs, progress) round-trips through one safetensors file."""
    from safetensors import safe_open

    from luciddrag.engine.checkpoint import atomic_save, load_checkpoint

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    gen, rng = torch.Generator().manual_seed(3), np.random.default_rng(5)
    state = {"model": net.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
             "rng": rng.bit_generator.state, "step": 7, "losses": [0.5, 0.25], "done": False}
    path = tmp_path / "state.safetensors"
    atomic_save(state, path)
    with safe_open(str(path), framework="pt") as f:  # a plain safetensors file: nothing in it can run code
        assert len(list(f.keys())) >= 4
    back = load_checkpoint(path)

    net2 = torch.nn.Linear(3, 2)
    net2.load_state_dict(back["model"])
    assert torch.equal(net2.weight, net.weight)
    opt2 = torch.optim.AdamW(net2.parameters(), lr=1e-3)
    opt2.load_state_dict(back["opt"])  # integer keys of Adam's state survive
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    gen2, rng2 = torch.Generator(), np.random.default_rng(0)
    gen2.set_state(back["gen"])
    rng2.bit_generator.state = back["rng"]
    assert torch.equal(torch.rand(3, generator=gen2), torch.rand(3, generator=gen))
    assert rng2.random() == rng.random()
    assert (back["step"], back["losses"], back["done"]) == (7, [0.5, 0.25], False)
    with pytest.raises(TypeError, match="cannot checkpoint"):
        atomic_save({"x": object()}, tmp_path / "bad.safetensors")


def test_four_level_unet_reaches_a_2x2_map_and_keeps_the_sd_interface() -> None:
    """The position-word experiment's UNet: same classes and I/O as the shipped one, one more level (2x2 mid)."""
    from luciddrag.evals.shapesworld.train import build_unet

    unet = build_unet(4)
    seen = {}
    unet.mid_block.register_forward_hook(lambda m, i, o: seen.update(shape=tuple(o.shape)))
    out = unet(torch.randn(2, 4, 16, 16), 500, encoder_hidden_states=torch.randn(2, 8, 64)).sample
    assert out.shape == (2, 4, 16, 16) and seen["shape"][-2:] == (2, 2)
    assert [type(b).__name__ for b in unet.up_blocks][-2:] == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
    with pytest.raises(ValueError, match="levels"):
        build_unet(5)


def test_v_prediction_loss_keeps_weight_at_high_noise_and_inverts_to_x0() -> None:
    """v target: x0 recovers exactly from (x_t, v); its x0-error weight never drops below 1, Min-SNR eps's does."""
    from luciddrag.evals.shapesworld.train import build_scheduler, loss_target_and_weight

    sched = build_scheduler("v_prediction")
    x0, noise = torch.randn(3, 4, 16, 16), torch.randn(3, 4, 16, 16)
    t = torch.tensor([10, 500, 999])
    v, w_v = loss_target_and_weight(x0, noise, t, sched, "v_prediction", 5.0)
    ab = sched.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    xt = sched.add_noise(x0, noise, t)
    torch.testing.assert_close(ab.sqrt() * xt - (1 - ab).sqrt() * v, x0, atol=1e-5, rtol=1e-5)
    eps, w_eps = loss_target_and_weight(x0, noise, t, sched, "epsilon", 5.0)
    assert torch.equal(eps, noise)
    snr = (ab / (1 - ab)).flatten()
    x0_weight_v, x0_weight_eps = w_v * (snr + 1), w_eps * snr  # v MSE = (SNR+1) x0 MSE, eps MSE = SNR x0 MSE
    assert x0_weight_v.min() >= 1.0 - 1e-5 and x0_weight_v.max() <= 5.0 + 1e-5
    assert x0_weight_eps[2] < 0.01  # t = 999: epsilon + Min-SNR all but ignores the step that places shapes
    with pytest.raises(ValueError, match="prediction_type"):
        build_scheduler("sample")


def test_trainer_refuses_to_continue_a_model_with_another_prediction_type(tmp_path: Path) -> None:
    from luciddrag.evals.shapesworld.train import TrainConfig, check_config

    theirs = json.loads((FOLDER / "scheduler" / "scheduler_config.json").read_text())["prediction_type"]
    other = "epsilon" if theirs == "v_prediction" else "v_prediction"
    cfg = TrainConfig(out=tmp_path / "o", work_dir=tmp_path / "w", init_from=FOLDER, prediction_type=other)
    with pytest.raises(ValueError, match=f"predicts '{theirs}'"):
        check_config(cfg)
    cfg.fresh_unet = True  # a new UNet may predict what it likes; only the VAE is kept
    check_config(cfg)


def test_trainer_refuses_a_position_signal_on_a_continued_unet(tmp_path: Path) -> None:
    from luciddrag.evals.shapesworld.train import TrainConfig, check_config

    cfg = TrainConfig(out=tmp_path / "o", work_dir=tmp_path / "w", init_from=FOLDER, position_signal="input",
                      prediction_type="v_prediction")
    with pytest.raises(ValueError, match="needs a new UNet"):  # the shipped model's signal is cross_attention
        check_config(cfg)
    cfg.position_signal = "cross_attention"  # the same signal: continuing is fine
    check_config(cfg)
    cfg.zero_terminal_snr = True
    with pytest.raises(ValueError, match="trained without zero terminal SNR"):
        check_config(cfg)
    cfg.fresh_unet, cfg.position_signal, cfg.prediction_type = True, "input", "epsilon"
    cfg.zero_terminal_snr = False
    check_config(cfg)
    cfg.position_signal = "diagonal"
    with pytest.raises(ValueError, match="position_signal must be one of"):
        check_config(cfg)


def test_zero_terminal_snr_schedule_hides_the_image_at_the_last_step_and_needs_v() -> None:
    """SD's schedule leaves 7% of the image at t = 999 (enough to read a big shape's place off the noise); the
    rescaled one leaves none, sampling starts there, and the v loss stays finite with x0 weight 1."""
    from luciddrag.evals.shapesworld.train import TrainConfig, build_scheduler, check_config, loss_target_and_weight

    sd, zero = build_scheduler("v_prediction"), build_scheduler("v_prediction", zero_terminal_snr=True)
    assert float(sd.alphas_cumprod[999].sqrt()) > 0.05 and float(zero.alphas_cumprod[999]) == 0.0
    zero.set_timesteps(30)
    assert int(zero.timesteps[0]) == 999
    x0, noise, t = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16), torch.tensor([999, 999])
    assert torch.equal(zero.add_noise(x0, noise, t), noise)  # nothing of the image left to read
    v, w = loss_target_and_weight(x0, noise, t, zero, "v_prediction", 5.0)
    torch.testing.assert_close(v, -x0)  # at pure noise the model must produce the image from the caption alone
    assert torch.allclose(w, torch.ones(2))
    with pytest.raises(ValueError, match="needs v_prediction"):
        build_scheduler("epsilon", zero_terminal_snr=True)
    with pytest.raises(ValueError, match="cannot train at zero SNR"):
        loss_target_and_weight(x0, noise, t, zero, "epsilon", 5.0)
    with pytest.raises(ValueError, match="zero terminal SNR needs"):
        check_config(TrainConfig(out=Path("o"), work_dir=Path("w"), zero_terminal_snr=True))


def test_training_history_counts_only_what_went_into_the_model() -> None:
    from luciddrag.evals.shapesworld.train import cumulative_minutes, history_before

    run1 = {"run_id": "r1", "config": {"init_from": None, "fresh_unet": False},
            "seconds": {"vae": 600.0, "unet": 1200.0}}
    run2 = {"run_id": "r2", "config": {"init_from": "m1", "fresh_unet": False},
            "seconds": {"vae": 0.0, "unet": 1800.0}, "previous": run1}
    # continuing run 2's UNet: all of it counts; a fresh UNet on run 2's VAE: only the VAE minutes
    prev = history_before(run2, run_id="r3")
    assert cumulative_minutes(prev, 600.0, fresh_unet=False) == 70.0
    assert cumulative_minutes(prev, 600.0, fresh_unet=True) == 20.0
    # resuming run 2 itself (its own record in the docs folder): its history is run 1, not run 2 twice
    again = history_before(run2, run_id="r2")
    assert again["run_id"] == "r1" and cumulative_minutes(again, 2400.0, fresh_unet=False) == 70.0
    assert history_before({"run_id": "x"}, run_id="x") is None
    # a run continuing a fresh-UNet run: UNet minutes count back to that run only, VAE minutes all the way
    run3 = {"run_id": "r3", "config": {"init_from": "m2", "fresh_unet": True},
            "seconds": {"vae": 0.0, "unet": 900.0}, "previous": run2}
    assert cumulative_minutes(history_before(run3, run_id="r4"), 300.0, fresh_unet=False) == 30.0


def test_run_id_is_new_per_fresh_start_and_kept_on_resume(tmp_path: Path) -> None:
    from luciddrag.evals.shapesworld.train import run_id_of

    first = run_id_of(tmp_path, fresh=True)
    assert run_id_of(tmp_path, fresh=False) == first
    assert run_id_of(tmp_path, fresh=True) != first

"""The explicit position signal (engine/position.py): codes, hooks, persistence through save / our loaders."""

import copy
import json

import pytest
import torch

from luciddrag.engine import position


def test_sincos_codes_tell_every_pixel_apart_and_left_from_right():
    code = position.sincos_2d(32, 16, 16)
    assert code.shape == (256, 32)
    d = torch.cdist(code, code) + torch.eye(256) * 1e9
    assert d.min() > 0.05  # no two pixels share a code
    grid = code.reshape(16, 16, 32)
    x_lo, y_lo = grid[:, :, :16], grid[:, :, 16:]
    # x channels vary along columns only, y channels along rows only
    assert torch.allclose(x_lo[0], x_lo[7]) and not torch.allclose(x_lo[:, 0], x_lo[:, 15])
    assert torch.allclose(y_lo[:, 0], y_lo[:, 9]) and not torch.allclose(y_lo[0], y_lo[15])
    with pytest.raises(ValueError, match="divisible by 4"):
        position.sincos_2d(30, 4, 4)


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    from luciddrag.engine.tiny import tiny_configs

    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny_configs(vocab_size=20)["unet"]).eval()


def _query_inputs(unet, x, t, cond):
    """The hidden states every cross-attention receives (after any pre-hooks)."""
    from diffusers.models.attention_processor import Attention

    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, a, k: seen.append((a[0] if a else k["hidden_states"]).clone()),
                                         with_kwargs=True)
             for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention]
    # the recorder must run after the position hook: register it last on the same modules
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=cond)
    for h in hooks:
        h.remove()
    return seen


def test_cross_attention_signal_reaches_queries_only_and_is_undone_by_removing_it():
    unet = _tiny_unet()
    x, t, cond = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 5, 32)
    with torch.no_grad():
        before = unet(x, t, encoder_hidden_states=cond).sample
    plain = _query_inputs(unet, x, t, cond)

    handles = position.install(unet, "cross_attention")
    signalled = _query_inputs(unet, x, t, cond)
    assert len(signalled) == len(plain) >= 3
    # the first cross-attention (16 channels, 8x8) gets exactly the code on top of what it got before
    assert torch.allclose(signalled[0] - plain[0], position.sincos_2d(16, 8, 8)[None], atol=1e-5)
    with torch.no_grad():
        after = unet(x, t, encoder_hidden_states=cond).sample
    assert (after - before).abs().max() > 1e-4
    for h in handles:
        h.remove()
    with torch.no_grad():
        assert torch.allclose(unet(x, t, encoder_hidden_states=cond).sample, before)


def test_signal_survives_deepcopy_and_non_square_latents():
    unet = _tiny_unet()
    position.install(unet, "cross_attention")
    twin = copy.deepcopy(unet)  # the trainer's EMA copy, the discriminator's mid block
    x, t, cond = torch.randn(2, 4, 8, 12), torch.tensor([10, 900]), torch.randn(2, 5, 32)
    with torch.no_grad():
        a = unet(x, t, encoder_hidden_states=cond).sample
        b = twin(x, t, encoder_hidden_states=cond).sample
    assert a.shape == (2, 4, 8, 12) and torch.equal(a, b)
    # 8 rows x 12 columns, not 12 x 8 or a square guess: the first cross-attention got exactly that code
    plain = _tiny_unet()
    before = _query_inputs(plain, x, t, cond)
    position.install(plain, "cross_attention")
    after = _query_inputs(plain, x, t, cond)
    assert torch.allclose(after[0] - before[0], position.sincos_2d(16, 8, 12)[None], atol=1e-5)


def test_input_mode_adds_the_code_to_conv_in():
    unet = _tiny_unet()
    x = torch.randn(1, 4, 8, 12)  # 8 rows, 12 columns: a swapped H and W would not fit
    with torch.no_grad():
        plain = unet.conv_in(x)
        position.install(unet, "input")
        added = (unet.conv_in(x) - plain)[0]  # C x H x W
    # the first half of the channels codes x (constant down each column, varying along a row), the rest y
    assert added.shape == (16, 8, 12)
    assert torch.allclose(added[:8], added[:8, :1, :].expand(8, 8, 12), atol=1e-6)  # same in every row
    assert torch.allclose(added[8:], added[8:, :, :1].expand(8, 8, 12), atol=1e-6)  # same in every column
    assert not torch.allclose(added[:8, :, 0], added[:8, :, 11]) and not torch.allclose(added[8:, 0], added[8:, 7])
    # x codes at the left and right edges differ from those of an 8-wide map: columns are normalised by the width
    assert not torch.allclose(added[:8, 0, 0], position.sincos_2d(16, 8, 8)[0, :8])
    with pytest.raises(ValueError, match="must be one of"):
        position.install(unet, "everywhere")


def test_marked_model_gets_its_signal_back_from_our_loader(tmp_path):
    from diffusers import UNet2DConditionModel

    from luciddrag.engine.loading import load_components
    from luciddrag.engine.tiny import build_tiny_model

    folder = build_tiny_model(tmp_path / "m")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    position.mark(unet, "cross_attention")
    unet.save_pretrained(folder / "unet")
    assert json.loads((folder / "unet" / "config.json").read_text())[position.CONFIG_KEY] == "cross_attention"

    comps = load_components(str(folder), device="cpu")
    assert getattr(comps.unet, "_luciddrag_position_signal", None) == "cross_attention"
    assert position.install_from_config(comps.unet) == "cross_attention"  # idempotent: no second set of hooks
    n_hooks = sum(len(m._forward_pre_hooks) for m in comps.unet.modules())
    position.install_from_config(comps.unet)
    assert sum(len(m._forward_pre_hooks) for m in comps.unet.modules()) == n_hooks
    with pytest.raises(ValueError, match="already has"):
        position.install_from_config(comps.unet, {position.CONFIG_KEY: "input"})
    # a stock SD config has no key: nothing installed
    plain = load_components(str(build_tiny_model(tmp_path / "plain")), device="cpu")
    assert getattr(plain.unet, "_luciddrag_position_signal", None) is None
    with pytest.raises(ValueError, match="unknown position signal"):
        position.mode_of({position.CONFIG_KEY: "diagonal"})

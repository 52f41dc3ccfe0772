"""Engine behaviour on a tiny random SD-architecture model loaded from a diffusers folder."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from luciddrag.engine import energies as E
from luciddrag.engine.errors import InputError, ModelLoadError
from luciddrag.engine.memory import decoder_self_attention_names
from luciddrag.engine.request import GuidanceConfig
from tests.engine_inputs import blocky_image, small_request

OFF = dict(w_edit=0.0, w_content=0.0, w_inpaint=0.0, kv_injection=False, init_copy=False)


def _image(w=48, h=40, seed=0):
    return blocky_image(w, h, seed)


def _req(**kw):
    return small_request(**{"steps": 8, **kw})


def test_loads_through_from_pretrained(tiny_editor):
    c = tiny_editor.c
    assert c.native_size == 32 and c.size_multiple == 16
    assert len(decoder_self_attention_names(c.unet)) == 4  # two CrossAttnUpBlock2D x two layers


@pytest.fixture(scope="module")
def smooth_editor(tiny_model_dir):
    """A tiny model whose noise prediction is a constant (non-zero) field.

    A random UNet's epsilon swings wildly between neighbouring latents, so DDIM inversion (which assumes
    eps(z_t) ~ eps(z_{t-1})) cannot reconstruct on it. With a constant epsilon the assumption holds exactly, so
    inversion followed by sampling must return the input latents to float precision -- unless the two walk
    different timesteps, pair the wrong alphas, or add the noise with the wrong sign.
    """
    from luciddrag.engine.pipeline import DragEditor

    ed = DragEditor.from_pretrained(str(tiny_model_dir), device="cpu", show_progress=False)
    with torch.no_grad():
        ed.c.unet.conv_out.weight.zero_()
        ed.c.unet.conv_out.bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.5]))
    return ed


def test_reconstruction_without_edit_stays_close(smooth_editor):
    """Inversion + sampling with source == target, CFG 1 and no guidance returns (nearly) the encoded latents."""
    req = _req(target_prompt="a red circle", guidance_scale=1.0, steps=20, guidance=GuidanceConfig(**OFF))
    res = smooth_editor.edit(req)
    z0 = smooth_editor._encode_image(tiny_editor_prepared(smooth_editor, req)).float()
    err = float((res.latents - z0).norm() / z0.norm())
    assert err < 1e-4, f"relative latent error {err:.2e}"
    # and the editing guidance moves the latents far more than the reconstruction error
    edited = smooth_editor.edit(_req(steps=20, guidance_scale=1.0, target_prompt="a red circle"))
    assert float((edited.latents - z0).norm() / z0.norm()) > 1e-2


def tiny_editor_prepared(editor, req):
    from luciddrag.engine.preprocess import prepare

    return prepare(req.image, req.drags, req.mask, editor.c.native_size, editor.c.size_multiple).image


def test_kv_injection_changes_output_and_switches_off(tiny_editor):
    on = tiny_editor.edit(_req(guidance=GuidanceConfig(**{**OFF, "kv_injection": True, "kv_start_step": 0})))
    off = tiny_editor.edit(_req(guidance=GuidanceConfig(**OFF)))
    assert on.stats["memory_bank_mb"] > 0 and off.stats["memory_bank_mb"] == 0
    assert not torch.allclose(on.latents, off.latents, atol=1e-4)
    # the UNet is left exactly as found: plain processors restored, no hooks
    assert not any(type(p).__name__ == "MemoryAttnProcessor" for p in tiny_editor.c.unet.attn_processors.values())
    assert not tiny_editor.c.unet.up_blocks[1]._forward_hooks


def test_batched_intentions_equal_one_by_one(tiny_editor):
    pairs = [("a red circle", "a big red circle"), ("a red circle", "a small red circle"),
             ("a cat", "a cat moved left")]
    batched = tiny_editor.edit(_req(), intentions=pairs)
    assert batched.stats["inversions"] == 2 and len(batched.images) == 3
    for i, pair in enumerate(pairs):
        single = tiny_editor.edit(_req(), intentions=[pair])
        assert torch.allclose(batched.latents[i], single.latents[0], rtol=1e-3, atol=1e-3), pair


def test_guidance_counts_and_diagnostics(tiny_editor):
    res = tiny_editor.edit(_req(steps=10, guidance=GuidanceConfig(edit_steps=4)))
    guided = [d for d in res.diagnostics if "drag" in d]
    assert len(guided) == 4 and all(len(d["drag"]) == 1 for d in guided)
    # inversion 10 + sampling 10x(cond + uncond); with the outside blend the content gradient is overwritten, so one
    # backward per guided step; without it the two regions (edit, content) need two
    assert res.stats["unet_forward"] == 30 and res.stats["unet_backward"] == 4
    res = tiny_editor.edit(_req(steps=10, guidance=GuidanceConfig(edit_steps=4, blend_outside=False)))
    assert res.stats["unet_forward"] == 30 and res.stats["unet_backward"] == 8


def test_drag_energy_falls_when_target_matches_handle_reference():
    torch.manual_seed(0)
    ref = torch.randn(1, 8, 16, 16)
    size = (32, 32)
    # 16x16 features over 32 px: cell k is centred on pixel 2k + 0.5
    handles, targets = torch.tensor([[8.5, 8.5]]), torch.tensor([[20.5, 14.5]])
    offs = E.patch_offsets(1, 2.0)
    cur = torch.randn(1, 8, 16, 16)
    before = E.drag_energy(cur, ref, handles, targets, offs, size)
    moved = cur.clone()
    # write the handle's reference features at the target cells: target = cell (x10, y7), handle = cell (4, 4)
    moved[:, :, 6:9, 9:12] = ref[:, :, 3:6, 3:6]
    after = E.drag_energy(moved, ref, handles, targets, offs, size)
    assert after < before
    assert math.isclose(float(after), 0.2, abs_tol=1e-3)  # s = 1 -> 1 / (1 + 4)


def test_drag_energy_gradient_is_local_to_target_patch():
    torch.manual_seed(1)
    ref = torch.randn(1, 8, 16, 16)
    cur = torch.randn(1, 8, 16, 16, requires_grad=True)
    handles, targets = torch.tensor([[6.0, 6.0]]), torch.tensor([[22.0, 20.0]])
    E.drag_energy(cur, ref, handles, targets, E.patch_offsets(1, 2.0), (32, 32)).sum().backward()
    g = cur.grad.abs().sum(1)[0]
    nz = torch.nonzero(g > 0)
    # target (22, 20) px -> feature cell (11, 10) (x, y); patch +-1 cell plus bilinear neighbours
    assert nz[:, 0].min() >= 8 and nz[:, 0].max() <= 11 and nz[:, 1].min() >= 9 and nz[:, 1].max() <= 12
    assert g[:5, :5].sum() == 0  # nothing near the handle: the drag term only moves content *to* the target


def test_content_energy_minimal_when_unchanged():
    torch.manual_seed(2)
    ref = torch.randn(2, 8, 8, 8)
    weight = torch.zeros(32, 32)
    weight[:, :16] = 1
    same = E.content_energy(ref.clone(), ref, weight)
    other = E.content_energy(torch.randn(2, 8, 8, 8), ref, weight)
    assert torch.allclose(same, torch.full((2,), 0.2)) and (other > same).all()
    # changes inside the editable half do not count
    edited = ref.clone()
    edited[:, :, :, 4:] = torch.randn(2, 8, 8, 4)
    assert torch.allclose(E.content_energy(edited, ref, weight), same, atol=1e-5)


def test_result_returned_at_input_size_with_alpha(tiny_editor):
    rgba = _image(70, 50).convert("RGBA")
    a = np.full((50, 70), 255, np.uint8)
    a[:5] = 0
    rgba.putalpha(Image.fromarray(a))
    res = tiny_editor.edit(_req(image=rgba, points=[(30, 20), (45, 30)], steps=4))
    assert res.image.size == (70, 50) and res.image.mode == "RGBA"
    assert np.array_equal(np.asarray(res.image)[..., 3], a)
    assert res.stats["working_size"][0] % 16 == 0 and res.stats["working_size"][1] % 16 == 0


def test_init_copy_moves_handle_latent():
    from luciddrag.engine.pipeline import copy_patches

    z = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    out = copy_patches(z, torch.tensor([[9.0, 9.0]]), torch.tensor([[21.0, 17.0]]), scale=4, radius=1)
    assert torch.equal(out[:, :, 3:6, 4:7], z[:, :, 1:4, 1:4])
    assert torch.equal(out[:, :, 0, :], z[:, :, 0, :])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(points=[(10, 10), (100, 10)]), "outside"),
        (dict(points=[(10, 10)]), "odd"),
        (dict(points=[]), "no drag points"),
        (dict(points=[(10, 10), (10, 10)]), "same point"),
        (dict(points=[(float("nan"), 10), (12, 10)]), "NaN"),
        (dict(points=[(10, float("inf")), (12, 10)]), "NaN or infinite"),
        (dict(mask=np.ones((10, 10), np.uint8)), "must match"),
        (dict(mask=np.zeros((40, 48), np.uint8)), "empty"),
        (dict(image=np.zeros((8, 8, 3), np.uint8), points=[(1, 1), (3, 3)]), "too small"),
        (dict(image="/nonexistent/x.png"), "not found"),
        (dict(steps=1), "steps"),
    ],
)
def test_bad_input_gives_one_clear_error(tiny_editor, kwargs, message):
    with pytest.raises(InputError, match=message) as info:
        tiny_editor.edit(_req(**kwargs))
    assert "\n" not in str(info.value)


def test_corrupt_image_file(tiny_editor, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(InputError, match="not a readable image"):
        tiny_editor.edit(_req(image=str(bad)))


def test_not_a_checkpoint_and_missing_weights(tmp_path, monkeypatch):
    from luciddrag.engine.loading import load_components

    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelLoadError, match="not a Stable Diffusion diffusers checkpoint: missing vae/"):
        load_components(str(tmp_path), device="cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="hf download"):
        load_components("nobody/no-such-model-luciddrag", device="cpu")


# --- handle regions, vacated noise, pinned outside -------------------------------------------------------------


def test_region_offsets_cover_the_region_on_the_cell_grid():
    region = torch.zeros(32, 32, dtype=torch.bool)
    region[8:16, 4:20] = True  # 8 x 16 px
    off = E.region_offsets(region, torch.tensor([10.0, 10.0]), cell=2.0, max_cells=1000)
    assert off.shape == (4 * 8, 2)  # one cell per 2x2 px block
    pts = off + torch.tensor([10.0, 10.0])
    assert bool(((pts[:, 0] >= 4) & (pts[:, 0] < 20) & (pts[:, 1] >= 8) & (pts[:, 1] < 16)).all())
    capped = E.region_offsets(region, torch.tensor([10.0, 10.0]), cell=2.0, max_cells=5)
    assert capped.shape == (5, 2)


def test_vacated_cells_are_the_handle_cells_the_moved_region_does_not_cover():
    off = torch.tensor([[x, 0.0] for x in (0.0, 2.0, 4.0, 6.0)])  # a 4-cell bar, cells 2 px apart
    left = E.vacated_cells(torch.tensor([[0.0, 0.0]]), torch.tensor([[4.0, 0.0]]), off, cell=2.0)
    assert sorted(left[:, 0].tolist()) == [0.0, 2.0]  # the bar moved 2 cells right: its first two cells are empty
    assert E.vacated_cells(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 0.0]]), off, cell=2.0).shape[0] == 0


def test_region_drag_energy_compares_the_whole_region():
    ref = torch.randn(1, 8, 16, 16)
    shifted = torch.roll(ref, shifts=3, dims=-1)  # content moved 3 feature cells (= 6 px) right
    region = torch.zeros(32, 32, dtype=torch.bool)
    region[10:20, 6:14] = True
    h = torch.tensor([[10.0, 14.0]])
    off = E.region_offsets(region, h[0], cell=2.0, max_cells=500)[None]
    w = torch.ones(off.shape[:2])
    moved = E.drag_energy(shifted, ref, h, h + torch.tensor([6.0, 0.0]), off, (32, 32), w)
    stayed = E.drag_energy(ref, ref, h, h + torch.tensor([6.0, 0.0]), off, (32, 32), w)
    assert float(moved) < float(stayed)
    assert float(moved) == pytest.approx(0.2, abs=1e-4)  # perfect correspondence: 1 / (1 + 4)


def test_copy_region_moves_every_cell_and_renoises_what_it_left():
    from luciddrag.engine.pipeline import copy_patches

    z = torch.arange(64, dtype=torch.float32).view(1, 1, 8, 8)
    region = np.zeros((32, 32), bool)
    region[4:12, 4:12] = True  # latent cells (1..2, 1..2) at scale 4
    out = copy_patches(z, torch.tensor([[6.0, 6.0]]), torch.tensor([[14.0, 6.0]]), scale=4, radius=1,
                       regions=[region], vacate=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[0, 0, 1:3, 3:5], z[0, 0, 1:3, 1:3])  # moved 2 latent cells right
    assert not torch.equal(out[0, 0, 1:3, 1:3], z[0, 0, 1:3, 1:3])  # the vacated cells got fresh noise
    untouched = torch.ones(8, 8, dtype=torch.bool)
    untouched[1:3, 1:5] = False
    assert torch.equal(out[0, 0][untouched], z[0, 0][untouched])


def test_blend_outside_pins_the_unedited_region_to_the_input_latent(tiny_editor):
    mask = np.zeros((40, 48), np.uint8)
    mask[4:28, 4:32] = 255
    req = _req(mask=mask, guidance=GuidanceConfig(w_edit=300, edit_steps=4), steps=6)
    res = tiny_editor.edit(req)
    prep_image = tiny_editor_prepared(tiny_editor, req)
    z0 = tiny_editor._encode_image(prep_image).float().cpu()
    free = torch.nn.functional.adaptive_max_pool2d(torch.from_numpy(mask.astype(np.float32))[None, None],
                                                   z0.shape[-2:])[0, 0] == 0
    assert bool(free.any())
    assert torch.allclose(res.latents[0][:, free], z0[0][:, free], atol=1e-5)
    loose = tiny_editor.edit(_req(mask=mask, guidance=GuidanceConfig(w_edit=300, edit_steps=4, blend_outside=False),
                                  steps=6))
    assert not torch.allclose(loose.latents[0][:, free], z0[0][:, free], atol=1e-3)


def test_handle_masks_are_validated_and_change_the_edit(tiny_editor):
    region = np.zeros((40, 48), np.uint8)
    region[4:18, 4:18] = 255
    with pytest.raises(InputError, match="handle masks for 1 drags"):
        tiny_editor.edit(_req(handle_masks=[region, region]))
    with pytest.raises(InputError, match="handle mask 1 is 10x10"):
        tiny_editor.edit(_req(handle_masks=[np.full((10, 10), 255, np.uint8)]))
    a = tiny_editor.edit(_req(steps=4, guidance=GuidanceConfig(edit_steps=3)))
    b = tiny_editor.edit(_req(steps=4, guidance=GuidanceConfig(edit_steps=3), handle_masks=[region]))
    assert not torch.allclose(a.latents, b.latents)


def test_scaling_a_region_carries_the_handle_along_its_ray():
    from luciddrag.engine.pipeline import copy_patches, latent_cells, scaled_region

    c = torch.tensor([16.0, 16.0])
    assert E.drag_scale(torch.tensor([20.0, 16.0]), torch.tensor([24.0, 16.0]), c) == pytest.approx(2.0)
    assert E.drag_scale(torch.tensor([20.0, 16.0]), torch.tensor([18.0, 30.0]), c) == pytest.approx(0.5)
    assert E.drag_scale(torch.tensor([16.2, 16.0]), torch.tensor([30.0, 16.0]), c) == 1.0  # handle on the centre
    region = np.zeros((32, 32), bool)
    region[12:20, 12:20] = True  # 8 x 8 around (15.5, 15.5)
    big = scaled_region(region, (15.5, 15.5), 2.0)
    assert abs(int(big.sum()) - 4 * 64) <= 40 and big[15, 15] and not big[2, 2]
    z = torch.arange(64, dtype=torch.float32).view(1, 1, 8, 8)
    out = copy_patches(z, torch.tensor([[19.0, 15.0]]), torch.tensor([[23.0, 15.0]]), scale=4, radius=1,
                       regions=[region], scales=[((15.5, 15.5), 2.0)])
    grown = latent_cells(big, 4)
    assert grown.sum() > latent_cells(region, 4).sum()
    changed = (out != z)[0, 0].numpy()
    assert changed.any() and not changed[~grown].any()  # only the new footprint was written


def test_zero_terminal_snr_checkpoint_edits_without_nan(tmp_path):
    """A v-prediction checkpoint with zero terminal SNR (alpha_bar = 0 at t = 999, sampling starts there): the
    epsilon form the engine guides in would divide by zero there without the floor."""
    import json

    from luciddrag.engine.pipeline import ALPHA_BAR_FLOOR, DragEditor, floor_alpha_bar
    from luciddrag.engine.tiny import build_tiny_model

    folder = build_tiny_model(tmp_path / "zsnr", prediction_type="v_prediction")
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(rescale_betas_zero_snr=True, timestep_spacing="trailing", steps_offset=0)
    cfg_path.write_text(json.dumps(cfg))
    ed = DragEditor.from_pretrained(str(folder), device="cpu", show_progress=False)
    res = ed.edit(_req(steps=6))
    assert torch.isfinite(res.latents).all()
    floored = floor_alpha_bar(torch.tensor([0.0, 0.5]))
    assert floored[0] == ALPHA_BAR_FLOOR and floored[1] == 0.5


def test_tracking_search_radius_keeps_a_far_look_alike_from_winning():
    """nearest_match: the best match anywhere is a far look-alike; within a radius the nearby, slightly weaker match
    wins, and a radius that holds both still picks the best."""
    from luciddrag.engine.tracking import nearest_match, within_radius

    src = torch.zeros(3, 8, 8)
    src[:, 2, 2] = torch.tensor([1.0, 0.0, 0.0])  # the handle's feature, at pixel (2, 2)
    dst = torch.full((3, 8, 8), 0.0)
    dst[2] = 1.0  # everywhere else: orthogonal to the handle's feature
    dst[:, 3, 4] = torch.tensor([0.9, 0.3, 0.0])  # near the handle: similar
    dst[:, 7, 7] = torch.tensor([1.0, 0.0, 0.0])  # far away: identical
    assert nearest_match(src, dst, [(2.0, 2.0)], (8, 8)) == [(7.0, 7.0)]
    assert nearest_match(src, dst, [(2.0, 2.0)], (8, 8), radii=[3.0]) == [(4.0, 3.0)]
    assert nearest_match(src, dst, [(2.0, 2.0)], (8, 8), radii=[20.0]) == [(7.0, 7.0)]
    m = within_radius([(0.0, 0.0)], [1.0], (4, 4)).view(4, 4)
    assert m.sum() == 3 and m[0, 0] and m[0, 1] and m[1, 0] and not m[1, 1]


class _RecordRefs:
    """A zero-weight term that records the reference features it is handed (what the energies compare against)."""

    name, region = "record", "edit"

    def __init__(self, steps):
        self.steps, self.seen = steps, {}

    def active(self, step, num_steps):
        return step < self.steps

    def energy(self, ctx):
        self.seen[ctx.timestep] = {b: f.detach().clone() for b, f in ctx.ref_features.items()}
        return 0.0 * sum(f.float().mean() for f in ctx.features.values()).reshape(1)


def test_inversion_reference_features_are_the_default_and_matched_ones_are_the_unet_at_z_t(tiny_editor):
    unet = tiny_editor.c.unet
    calls = []
    hook = unet.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((args[0].detach().clone(), int(args[1]))), with_kwargs=True)
    try:
        base = dict(steps=8, guidance=dict(edit_steps=3, init_copy=False))
        default = tiny_editor.edit(_req(**base))
        explicit = tiny_editor.edit(_req(steps=8, guidance=dict(edit_steps=3, init_copy=False,
                                                                reference_features="inversion")))
        rec = _RecordRefs(3)
        calls.clear()
        matched = tiny_editor.edit(_req(steps=8, guidance=dict(edit_steps=3, init_copy=False,
                                                               reference_features="matched")), extra_terms=[rec])
    finally:
        hook.remove()
    assert torch.equal(default.latents, explicit.latents)
    # one extra no-grad forward per guided step, nothing else
    assert matched.stats["unet_forward"] == default.stats["unet_forward"] + 3
    assert not torch.equal(matched.latents, default.latents)
    # z_t of timestep t: what the inversion produced at t (the input of the next inversion call, or z_T)
    inversion, sampling = calls[:8], calls[8:]
    z_at = {t: z for (_, t), (z, _) in zip(inversion[:-1], inversion[1:])}
    z_at[inversion[-1][1]] = sampling[0][0]
    tgt = tiny_editor._encode(["a big red circle"])
    assert len(rec.seen) == 3
    for t, refs in rec.seen.items():
        feats = {}
        hooks = [unet.up_blocks[b].register_forward_hook(
            lambda m, i, o, b=b: feats.__setitem__(b, o[0] if isinstance(o, tuple) else o)) for b in refs]
        with torch.no_grad():
            unet(z_at[t], t, encoder_hidden_states=tgt)
        for h in hooks:
            h.remove()
        for b, f in refs.items():
            assert torch.allclose(f, feats[b], atol=1e-5), (t, b)


def test_dragon_schedule_repeats_its_steps_deterministically(tiny_editor):
    from luciddrag.engine.pipeline import dragon_repeats

    assert dragon_repeats(50) == {22: 3, 24: 3, 26: 3, 28: 3}
    assert dragon_repeats(25) == {11: 3, 12: 3, 13: 3, 14: 3}
    assert dragon_repeats(8) == {4: 3}  # 3.5, 3.8, 4.2, 4.5 all round to step 4
    g = dict(edit_steps=6)
    plain = tiny_editor.edit(_req(steps=8, guidance=g))
    a = tiny_editor.edit(_req(steps=8, guidance={**g, "schedule": "dragon"}))
    b = tiny_editor.edit(_req(steps=8, guidance={**g, "schedule": "dragon"}))
    # step 4 runs 3 passes: 2 more guided (cond + uncond) forwards each, and 2 more backwards
    assert a.stats["unet_forward"] == plain.stats["unet_forward"] + 2 * 2
    assert a.stats["unet_backward"] == plain.stats["unet_backward"] + 2
    assert a.diagnostics[4]["passes"] == 3 and "passes" not in a.diagnostics[3]
    assert torch.equal(a.latents, b.latents) and not torch.equal(a.latents, plain.latents)
    c = tiny_editor.edit(_req(steps=8, seed=1, guidance={**g, "schedule": "dragon"}))
    d = tiny_editor.edit(_req(steps=8, seed=1, guidance=g))
    assert not torch.allclose(c.latents - d.latents, a.latents - plain.latents)  # the re-noise follows the seed
    # outside its guided steps the schedule repeats nothing
    e = tiny_editor.edit(_req(steps=8, guidance={"edit_steps": 2, "schedule": "dragon"}))
    assert e.stats["unet_forward"] == tiny_editor.edit(_req(steps=8, guidance={"edit_steps": 2})).stats["unet_forward"]


def test_sd_presets_use_matched_reference_features_and_shapesworld_keeps_the_inversion_ones():
    from pathlib import Path

    from luciddrag.engine.presets import family_settings, recommended_settings

    for family in ("sd1", "sd2"):
        cfg = GuidanceConfig(**family_settings(family)["guidance"])
        assert cfg.reference_features == "matched" and cfg.schedule == "default"
    world = Path(__file__).resolve().parents[1] / "evals" / "shapesworld" / "model"
    cfg = GuidanceConfig(**recommended_settings(world).get("guidance", {}))
    assert cfg.reference_features == "inversion" and cfg.schedule == "default"

"""Algorithm 1 (engine/sampling.py) against a frozen copy of the sampler it replaced, on the tiny model.

`legacy_sample` is the loop that lived in DragEditor._sample before the refactor, arithmetic unchanged: every term
differentiated, one backward per region. The new sampler must give the same latents bit for bit wherever it
skips work (content gradient under the outside blend), and within a stated tolerance where it merges backwards.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import luciddrag.engine.pipeline as pipeline
from luciddrag.engine.guidance import GuidanceContext
from luciddrag.engine.request import GuidanceConfig
from luciddrag.engine.sampling import backward_groups, guidance_gradient, to_epsilon
from tests.engine_inputs import blocky_image, small_request


def legacy_sample(unet_call, latents, plan, terms):
    """The pre-refactor sampling loop (two backwards per guided step), kept verbatim in its arithmetic."""
    n = len(plan.timesteps)
    edit_mask = plan.edit_mask
    backwards = 0
    for i, t in enumerate(plan.timesteps):
        mode = "inject" if t in plan.kv_timesteps else "off"
        a_t = float(plan.alphas_cumprod[t])
        active = [term for term in terms if term.active(i, n)]
        grad = None
        if active and t in plan.ref_features:
            with torch.enable_grad():
                x = latents.detach().requires_grad_(True)
                eps_c, feats = unet_call(x, t, plan.text_embeddings, mode, capture=True)
                ref = {b: f.index_select(0, plan.rows) for b, f in plan.ref_features[t].items()}
                ctx = GuidanceContext(i, n, t, a_t, x, feats, ref, plan.text_embeddings, plan.geometry)
                by_region: dict[str, list[torch.Tensor]] = {}
                for term in active:
                    by_region.setdefault(term.region, []).append(term.energy(ctx).sum())
                total = torch.zeros_like(x)
                regions = list(by_region)
                for k, region in enumerate(regions):
                    g, = torch.autograd.grad(torch.stack(by_region[region]).sum(), x,
                                             retain_graph=k < len(regions) - 1, allow_unused=True)
                    backwards += 1
                    if g is None:
                        continue
                    if region == "edit":
                        g = g * edit_mask
                    elif region == "content":
                        g = g * (1.0 - edit_mask)
                    total = total + g
                grad = total.detach()
            eps_c = eps_c.detach()
        else:
            with torch.no_grad():
                eps_c, _ = unet_call(latents, t, plan.text_embeddings, mode)
        with torch.no_grad():
            x32 = latents.float()
            eps_c = to_epsilon(eps_c.float(), x32, a_t, plan.prediction_type)
            eps = eps_c
            if plan.guidance_scale != 1.0:
                eps_u, _ = unet_call(latents, t, plan.null_embeddings, mode)
                eps_u = to_epsilon(eps_u.float(), x32, a_t, plan.prediction_type)
                eps = eps_u + plan.guidance_scale * (eps_c - eps_u)
            if grad is not None:
                eps = eps + math.sqrt(1.0 - a_t) * grad.float()
            latents = plan.scheduler.step(eps, t, x32).prev_sample.to(latents.dtype)
            if plan.trajectory is not None:
                keep = plan.trajectory[n - 1 - i]
                latents = torch.where(edit_mask.bool()[None, None], latents, keep.to(latents.dtype))
    return latents, backwards


@pytest.fixture()
def both(monkeypatch):
    """Run every edit's sampling twice, with the legacy loop and with Algorithm 1, on the same plan and bank."""
    runs: list[dict] = []
    new = pipeline.collaborative_guidance_sample

    def twice(unet_call, latents, plan, terms, callback=None, progress=False):
        old, old_backwards = legacy_sample(unet_call, latents.clone(), plan, terms)
        out = new(unet_call, latents, plan, terms, callback, progress)
        runs.append({"old": old, "new": out.latents, "old_backwards": old_backwards,
                     "new_backwards": out.backward_passes})
        return out

    monkeypatch.setattr(pipeline, "collaborative_guidance_sample", twice)
    return runs


def _image(w=48, h=40, seed=0):
    return blocky_image(w, h, seed)


def _req(**kw):
    return small_request(**{"steps": 10, **kw})


REGION = np.zeros((40, 48), bool)
REGION[6:16, 6:15] = True


@pytest.mark.parametrize("name,kwargs,intentions", [
    ("default", {}, None),
    ("cfg 1, three intentions, two inversions", dict(guidance_scale=1.0),
     [("a red circle", "a big red circle"), ("a red circle", "a small red circle"), ("a cat", "a cat moved left")]),
    ("region moved", dict(handle_masks=[REGION]), None),
    ("region scaled, no blend, replace K/V",
     dict(handle_masks=[REGION], region_motion="scale",
          guidance=GuidanceConfig(blend_outside=False, kv_mode="replace")), None),
    ("no blend", dict(guidance=GuidanceConfig(blend_outside=False)), None),
])
def test_algorithm_1_reproduces_the_legacy_sampler_bit_for_bit(tiny_editor, both, name, kwargs, intentions):
    req = _req(**kwargs)
    res = tiny_editor.edit(req, intentions=intentions)
    run, = both
    assert torch.equal(run["new"], run["old"]), name
    guided = sum(1 for d in res.diagnostics if "drag" in d)
    assert run["old_backwards"] == 2 * guided  # edit + content regions
    # under the blend the content gradient is masked to what the blend overwrites: not computed
    assert run["new_backwards"] == (guided if req.guidance.blend_outside else 2 * guided)
    assert res.stats["unet_backward"] == run["new_backwards"]


def test_quality_term_shares_the_edit_backward_under_the_blend(tiny_editor, both):
    """An 'all'-region term (quality guidance) and the edit terms: one backward instead of three, same latents up
    to float rounding (stated tolerance: atol 1e-5 on latents of magnitude ~1)."""
    from luciddrag.engine.discriminator import QualityTerm, build_discriminator

    torch.manual_seed(0)
    disc = build_discriminator(tiny_editor.c, seed=0)
    res = tiny_editor.edit(_req(), extra_terms=[QualityTerm(disc, weight=5.0, steps=4)])
    run, = both
    guided = sum(1 for d in res.diagnostics if "drag" in d)
    assert guided == 10 and sum(1 for d in res.diagnostics if "quality" in d) == 4
    assert run["old_backwards"] == 2 * guided + 4 and run["new_backwards"] == guided
    assert torch.allclose(run["new"], run["old"], atol=1e-5, rtol=0)


def test_one_backward_equals_the_sum_of_per_region_backwards():
    """guidance_gradient's merged backward (edit + all under the blend) against one backward per term: equal up to
    fp32 summation order (stated tolerance: rtol 1e-5, atol 1e-6 on gradients of magnitude <= 1)."""
    from luciddrag.engine.guidance import Geometry

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    mask = torch.zeros(8, 8)
    mask[2:6, 1:5] = 1.0
    geom = Geometry(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(16, 16), (16, 16), torch.zeros(1, 2))

    def fresh() -> GuidanceContext:  # a new forward graph (each guidance_gradient call frees its own)
        feats = net(x)
        return GuidanceContext(0, 10, 500, 0.5, x, {0: feats}, {0: feats.detach()}, torch.zeros(2, 1, 1), geom)

    class T:
        def __init__(self, name, region, fn):
            self.name, self.region, self.fn = name, region, fn

        def active(self, step, n):
            return True

        def energy(self, c):
            return self.fn(c.features[0])

    terms = [T("a", "edit", lambda f: (f ** 2).flatten(1).mean(1)), T("b", "all", lambda f: f.sin().flatten(1).sum(1)),
             T("c", "content", lambda f: f.abs().flatten(1).mean(1))]
    assert [r for r, _ in backward_groups(terms, blend_outside=True)] == ["edit"]
    merged, energies, used = guidance_gradient(terms, fresh(), mask, blend_outside=True)
    assert used == 1 and set(energies) == {"a", "b", "c"}
    ctx = fresh()
    ga, = torch.autograd.grad(terms[0].energy(ctx).sum(), x, retain_graph=True)
    gb, = torch.autograd.grad(terms[1].energy(ctx).sum(), x, retain_graph=True)
    gc, = torch.autograd.grad(terms[2].energy(ctx).sum(), x)
    inside = mask.bool()
    expected = ga * mask + gb
    assert torch.allclose(merged[..., inside], expected[..., inside], rtol=1e-5, atol=1e-6)
    # without the blend each region keeps its own backward and mask
    split, _, used = guidance_gradient(terms, fresh(), mask, blend_outside=False)
    assert used == 3
    assert torch.allclose(split, ga * mask + gb + gc * (1 - mask), rtol=1e-5, atol=1e-6)


def test_terms_not_differentiated_are_evaluated_without_a_graph():
    """Under the blend the content term only feeds the diagnostics: its energy is computed with grad off (no graph
    recorded), while the edit terms keep theirs; the reported values are the energies themselves."""
    from luciddrag.engine.guidance import Geometry

    torch.manual_seed(0)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    geom = Geometry(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(16, 16), (16, 16), torch.zeros(1, 2))
    ctx = GuidanceContext(0, 10, 500, 0.5, x, {0: x * 2}, {0: x.detach()}, torch.zeros(1, 1, 1), geom)
    seen: dict[str, bool] = {}

    class Spy:
        def __init__(self, name, region):
            self.name, self.region = name, region

        def active(self, step, n):
            return True

        def energy(self, c):
            seen[self.name] = torch.is_grad_enabled()
            return (c.features[0] ** 2).flatten(1).mean(1)

    grad, report, used = guidance_gradient([Spy("e", "edit"), Spy("c", "content")], ctx, torch.ones(8, 8),
                                           blend_outside=True)
    assert seen == {"e": True, "c": False} and used == 1
    expected = float((4 * x.detach() ** 2).mean())
    assert report["e"] == pytest.approx([expected]) and report["c"] == pytest.approx([expected])
    assert grad.abs().sum() > 0


def test_cached_grids_give_the_energies_of_the_pure_functions():
    """Geometry.grids() (computed once per edit) fed to the *_at energies equals the pure functions that recompute
    every position from the drags, bit for bit; whole-image editable: no unrelated region."""
    from luciddrag.engine import energies as E
    from luciddrag.engine.guidance import Geometry

    torch.manual_seed(0)
    handles, targets = torch.tensor([[6.0, 9.0], [20.0, 12.0]]), torch.tensor([[12.0, 9.0], [18.0, 22.0]])
    offsets = torch.randn(2, 5, 2) * 3
    weights = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    dst = offsets * 1.5
    editable = torch.zeros(32, 32)
    editable[4:28, 2:26] = 1
    geom = Geometry(handles, targets, editable, (32, 32), offsets, cell=2.0, weights=weights, dst_offsets=dst)
    cur, ref = torch.randn(2, 8, 16, 16), torch.randn(2, 8, 16, 16)
    g = geom.grids()
    assert geom.grids() is g  # kept
    assert torch.equal(E.drag_energy_at(cur, ref, g.target, g.handle, weights),
                       E.drag_energy(cur, ref, handles, targets, offsets, (32, 32), weights, dst))
    assert torch.equal(E.inpaint_energy_at(cur, ref, g.vacated),
                       E.inpaint_energy(cur, ref, handles, targets, offsets, (32, 32), 2.0, weights, dst))
    assert torch.equal(E.content_energy_at(cur, ref, g.unrelated_weight(cur)),
                       E.content_energy(cur, ref, 1.0 - editable))
    assert g.has_unrelated
    whole = Geometry(handles, targets, torch.ones(32, 32), (32, 32), offsets)
    assert not whole.grids().has_unrelated
    assert torch.equal(E.content_energy(cur, ref, torch.zeros(32, 32)), torch.zeros(2))


def test_whole_image_editable_without_blend_runs_no_content_backward(tiny_editor):
    """With a mask covering the whole image and no blend, the content term has no region: no backward is run or
    counted for it, and the result is the edit without a content term, bit for bit."""
    mask = np.ones((40, 48), bool)
    res = tiny_editor.edit(_req(mask=mask, guidance=GuidanceConfig(blend_outside=False)))
    without = tiny_editor.edit(_req(mask=mask, guidance=GuidanceConfig(blend_outside=False, w_content=0)))
    guided = sum(1 for d in res.diagnostics if "drag" in d)
    assert guided > 0 and all(d["content"] == [0.0] for d in res.diagnostics if "content" in d)
    assert res.stats["unet_backward"] == guided == without.stats["unet_backward"]
    assert torch.equal(res.latents, without.latents)

"""Collaborative guidance sampling: the paper's Algorithm 1 as one function over a frozen plan.

`collaborative_guidance_sample` is the sampling loop and nothing else: the editor (engine/pipeline.py) inverts the
image, fills the memory bank, builds a `SamplingPlan` and the guidance terms, and hands them over. The loop knows the
terms only through their `GuidanceTerm` protocol (engine/guidance.py), so semantic guidance (the target prompts in
the plan), editing guidance (drag, inpaint, content terms) and quality guidance (the discriminator term) are all
plain inputs here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from luciddrag.engine.guidance import Geometry, GuidanceContext, GuidanceTerm

KVMode = Literal["off", "record", "inject"]


@dataclass
class StepEvent:
    """Progress report for callbacks (the agent streams these)."""

    phase: str  # "invert" | "sample"
    step: int
    total: int
    energies: dict[str, list[float]] = field(default_factory=dict)


class UNetCall(Protocol):
    """One UNet evaluation: noise prediction (the checkpoint's own parameterisation) and, when `capture`, the
    decoder features the energies read, carrying the autograd graph when grad is enabled."""

    def __call__(self, latents: torch.Tensor, timestep: int, embeddings: torch.Tensor, kv: KVMode,
                 capture: bool = False) -> tuple[torch.Tensor, dict[int, torch.Tensor]]: ...


@dataclass(frozen=True)
class SamplingPlan:
    """Everything Algorithm 1 reads besides the latents and the terms, fixed before the loop starts."""

    timesteps: tuple[int, ...]  # sampling order, noisy -> clean
    scheduler: object  # a DDIM scheduler set to `timesteps`; its step() is pure
    alphas_cumprod: torch.Tensor  # floored, so every step is defined (see pipeline.floor_alpha_bar)
    prediction_type: str  # what the UNet predicts; guidance and CFG act on epsilon
    text_embeddings: torch.Tensor  # (B, L, D) target prompts: semantic guidance
    null_embeddings: torch.Tensor  # (B, L, D) empty prompt, for classifier-free guidance
    guidance_scale: float  # CFG scale; 1 skips the unconditional pass
    rows: torch.Tensor  # (B,) for each intention, its inversion row (memory bank, reference features)
    ref_features: Mapping[int, Mapping[int, torch.Tensor]]  # timestep -> block -> inversion features
    kv_timesteps: frozenset[int]  # steps that read the memory bank's K/V
    geometry: Geometry
    edit_mask: torch.Tensor  # (h, w) 0/1 at latent resolution: where editing guidance may act
    trajectory: tuple[torch.Tensor, ...] | None = None  # z_0..z_T per intention: outside-blend target, or None
    # "matched" reference features: timestep -> the inverted latent z_t per intention; the reference features of step
    # t are then the UNet's at z_t with the target prompt (one no-grad forward), not the inversion pass's
    reference_latents: Mapping[int, torch.Tensor] | None = None
    repeats: Mapping[int, int] = field(default_factory=dict)  # step index -> passes (re-noised back to t in between)
    noise: torch.Generator | None = None  # CPU generator for the re-noising of repeated steps (seeded: deterministic)


@dataclass
class SampleOutput:
    latents: torch.Tensor
    diagnostics: list[dict]  # per step: timestep and each active term's energy per intention
    backward_passes: int


def to_epsilon(model_output: torch.Tensor, sample: torch.Tensor, alpha_bar: float,
               prediction_type: str) -> torch.Tensor:
    """Express any UNet parameterisation as a noise prediction, so guidance is always added to epsilon."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return math.sqrt(alpha_bar) * model_output + math.sqrt(1 - alpha_bar) * sample
    if prediction_type == "sample":
        return (sample - math.sqrt(alpha_bar) * model_output) / math.sqrt(1 - alpha_bar)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def backward_groups(terms: Sequence[GuidanceTerm], blend_outside: bool) -> list[tuple[str, list[GuidanceTerm]]]:
    """Which terms need a backward pass, grouped by the mask their gradient gets (one backward per group).

    With the outside blend every step's latents outside the editable mask are overwritten by the inversion's, so a
    gradient only counts inside it: "content" terms (masked to the outside) are dropped, and "all" terms share the
    "edit" group's backward (both end up multiplied by the mask). Without the blend the masks differ per region and
    a shared backward would mix them: J^T a masked by M plus J^T b masked by 1 - M is not J^T (a + b) masked by
    anything, so each region keeps its own backward.
    """
    groups: dict[str, list[GuidanceTerm]] = {}
    for term in terms:
        region = term.region
        if blend_outside:
            if region == "content":
                continue
            region = "edit"
        groups.setdefault(region, []).append(term)
    return list(groups.items())


def _mask_for(region: str, edit_mask: torch.Tensor) -> torch.Tensor | None:
    if region == "edit":
        return edit_mask
    if region == "content":
        return 1.0 - edit_mask
    return None


def guidance_gradient(terms: Sequence[GuidanceTerm], ctx: GuidanceContext, edit_mask: torch.Tensor,
                      blend_outside: bool) -> tuple[torch.Tensor, dict[str, list[float]], int]:
    """Sum of the active terms' gradients w.r.t. the latents, each masked to its region (paper Eq. 11-12).

    Every term's energy is evaluated (for the diagnostics; they share the one UNet forward that produced
    `ctx.features`); only groups from `backward_groups` are differentiated. Returns (gradient, energies, backwards).
    """
    groups = backward_groups(terms, blend_outside)
    differentiated = {id(m) for _, members in groups for m in members}
    energies: dict[str, torch.Tensor] = {}
    for term in terms:
        # a term no backward reads (content under the blend) is evaluated for the diagnostics only: no graph
        with torch.set_grad_enabled(id(term) in differentiated):
            energies[term.name] = term.energy(ctx)
    # one device-to-host copy per step for all the diagnostics, not one per term
    values = torch.stack([e.detach().float() for e in energies.values()]).cpu().tolist() if energies else []
    report = dict(zip(energies, values))
    total = torch.zeros_like(ctx.latents)
    pending = [(region, torch.stack([energies[m.name].sum() for m in members]).sum()) for region, members in groups]
    # a group whose energy has no graph (content with the whole image editable) has nothing to pull: no backward
    pending = [(region, energy) for region, energy in pending if energy.requires_grad]
    for k, (region, energy) in enumerate(pending):
        g, = torch.autograd.grad(energy, ctx.latents, retain_graph=k < len(pending) - 1, allow_unused=True)
        if g is None:
            continue
        mask = _mask_for(region, edit_mask)
        total = total + (g if mask is None else g * mask)
    return total.detach(), report, len(pending)


def reference_features(unet_call: UNetCall, plan: SamplingPlan, t: int) -> dict[int, torch.Tensor]:
    """The reference features the energies compare against at timestep t, per intention.

    "inversion" (no `plan.reference_latents`): those captured while inverting, at the source prompt, one step less
    noisy. "matched": the UNet's features at the inverted latent z_t of the same timestep with the intention's target
    prompt, as DragonDiffusion computes them (no K/V injection: a plain evaluation of the reference)."""
    if plan.reference_latents is None:
        return {b: f.index_select(0, plan.rows) for b, f in plan.ref_features[t].items()}
    with torch.no_grad():
        _, feats = unet_call(plan.reference_latents[t], t, plan.text_embeddings, "off", capture=True)
    return {b: f.detach() for b, f in feats.items()}


def renoise(latents: torch.Tensor, a_t: float, a_prev: float, generator: torch.Generator | None) -> torch.Tensor:
    """z_{t-1} -> z_t by the forward process q(z_t | z_{t-1}) = N(sqrt(a_t/a_prev) z, (1 - a_t/a_prev) I), so a
    repeated step starts again from its own noise level (DragonDiffusion's repeated guided steps)."""
    ratio = a_t / a_prev
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device)
    return (math.sqrt(ratio) * latents.float() + math.sqrt(1.0 - ratio) * noise).to(latents.dtype)


def collaborative_guidance_sample(unet_call: UNetCall, latents: torch.Tensor, plan: SamplingPlan,
                                  terms: Sequence[GuidanceTerm],
                                  callback: Callable[[StepEvent], None] | None = None,
                                  progress: bool = False) -> SampleOutput:
    """Algorithm 1 of LucidDrag (Cui et al., NeurIPS 2024): collaborative guidance sampling.

    From z_T (the inverted latents, the handle content already copied to the target), each DDIM step t:

    1. *Semantic guidance*: the UNet is conditioned on the intention's target prompt (`plan.text_embeddings`,
       classifier-free guidance with `plan.guidance_scale`) while the decoder's self-attention also attends to the
       inversion's K/V from the memory bank (steps in `plan.kv_timesteps`), which keeps the identity of the input.
    2. *Editing guidance* (Eq. 9-11): on guided steps the same forward's decoder features are compared with the
       inversion's (`plan.ref_features`): the drag term pulls the target region toward the handle's features, the
       inpaint term pushes the vacated region away from them, the content term keeps the rest unchanged.
    3. *Quality guidance* (Eq. 8): a discriminator term, w_q * -log D(real | z_t), when the engine added one.
    4. The energies' gradients, each masked to its region, are added to the noise estimate as classifier guidance
       (Eq. 5/12, 16): eps~ = eps_cfg + sqrt(1 - alpha_bar_t) * grad E, and the DDIM step is taken in fp32.
    5. Outside the editable mask the latents are pinned to the inversion's trajectory (`plan.trajectory`), when the
       plan has one, so the unedited part reproduces the input.
    6. Steps in `plan.repeats` (DragonDiffusion's schedule) run several passes: after each but the last, z_{t-1} is
       re-noised back to t and the step is taken again, giving the guidance more iterations where it matters.

    Terms whose gradient cannot change the result are not differentiated (see `backward_groups`).
    """
    n = len(plan.timesteps)
    alphas = plan.alphas_cumprod
    blend = plan.trajectory is not None
    keep_outside = plan.edit_mask.bool()[None, None]
    diagnostics: list[dict] = []
    backwards = 0
    guided_ts = plan.reference_latents.keys() if plan.reference_latents is not None else plan.ref_features.keys()
    for i, t in enumerate(tqdm(plan.timesteps, desc="sample", disable=not progress, leave=False)):
        kv: KVMode = "inject" if t in plan.kv_timesteps else "off"
        a_t = float(alphas[t])
        active = [term for term in terms if term.active(i, n)]
        record: dict = {"step": i, "timestep": t}
        passes = plan.repeats.get(i, 1)
        for p in range(passes):
            if p > 0:  # step 6: back to t's noise level for another pass
                nxt = plan.timesteps[i + 1] if i + 1 < n else None
                a_prev = float(alphas[nxt] if nxt is not None else plan.scheduler.final_alpha_cumprod)
                latents = renoise(latents, a_t, a_prev, plan.noise)
                record["passes"] = p + 1
            grad = None
            if active and t in guided_ts:
                # steps 1-3: one forward with grad; every term reads its features, one backward per mask group
                ref = reference_features(unet_call, plan, t)
                with torch.enable_grad():
                    x = latents.detach().requires_grad_(True)
                    eps_c, feats = unet_call(x, t, plan.text_embeddings, kv, capture=True)
                    ctx = GuidanceContext(i, n, t, a_t, x, feats, ref, plan.text_embeddings, plan.geometry)
                    grad, energies, used = guidance_gradient(active, ctx, plan.edit_mask, blend)
                    backwards += used
                record.update(energies)
                eps_c = eps_c.detach()
            else:
                with torch.no_grad():
                    eps_c, _ = unet_call(latents, t, plan.text_embeddings, kv)
            with torch.no_grad():
                # CFG, guidance and the DDIM step in fp32 whatever the UNet's dtype: near zero terminal SNR the step
                # divides by sqrt(alpha_bar) ~ 1e-3, and fp16 rounding of eps would be amplified 1000x
                x32 = latents.float()
                eps = to_epsilon(eps_c.float(), x32, a_t, plan.prediction_type)
                if plan.guidance_scale != 1.0:  # at scale 1 CFG is the conditional prediction: skip the unconditional
                    eps_u, _ = unet_call(latents, t, plan.null_embeddings, kv)
                    eps_u = to_epsilon(eps_u.float(), x32, a_t, plan.prediction_type)
                    eps = eps_u + plan.guidance_scale * (eps - eps_u)
                if grad is not None:
                    # step 4: classifier guidance on epsilon (paper Eq. 16): eps + sqrt(1 - alpha_bar) * grad E
                    eps = eps + math.sqrt(1.0 - a_t) * grad.float()
                latents = plan.scheduler.step(eps, t, x32).prev_sample.to(latents.dtype)
                if blend:
                    # step 5: outside the editable region, follow the inversion's own path back to the input
                    latents = torch.where(keep_outside, latents, plan.trajectory[n - 1 - i].to(latents.dtype))
        diagnostics.append(record)
        if callback:
            callback(StepEvent("sample", i + 1, n, {k: v for k, v in record.items() if isinstance(v, list)}))
    return SampleOutput(latents, diagnostics, backwards)

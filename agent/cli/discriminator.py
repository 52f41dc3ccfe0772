"""CLI of the fidelity discriminator, mounted by agent/cli/main.py:

- ``luciddrag discriminator synthesize``: training data (simulated drags, editing guidance only, scored);
- ``luciddrag discriminator eval``: held-out accuracy / ROC-AUC per timestep bucket of a trained discriminator;
- ``luciddrag discriminator info``: a discriminator's config (base, threshold, recommended guidance);
- ``luciddrag train-discriminator``: training (`train_command`, a plain function mounted as one command).

Worlds with exact ground truth plug in by name (``--world shapesworld``): the module in ``WORLDS`` provides
``make(n, seed_base) -> (items, scorer, name)``. This CLI is the top layer; the engine never imports evals.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from luciddrag.agent.cli.common import fail as _fail
from luciddrag.engine.errors import InputError, LucidDragError
from luciddrag.evals.shapesworld import MODEL_DIR as SHAPES_MODEL_DIR
from luciddrag.evals.shapesworld import discriminator_data as shapes_discriminator_data

app = typer.Typer(help="Quality discriminator: synthesise training data, evaluate, inspect.", no_args_is_help=True)

WORLDS = {"shapesworld": shapes_discriminator_data}


def _world(name: str, n: int, seed_base: Optional[int]):
    if name not in WORLDS:
        raise InputError(f"unknown world {name!r}: one of {', '.join(WORLDS)}")
    mod = WORLDS[name]
    return mod.make(n) if seed_base is None else mod.make(n, seed_base)


@app.command("synthesize")
def synthesize_command(
    out: Path = typer.Option(..., help="Data folder to write (resumed when it exists)."),
    base: Optional[str] = typer.Option(None, envvar="LUCIDDRAG_MODEL", help="Base model (hub id or folder)."),
    images: Optional[Path] = typer.Option(None, help="Folder of real images with captions (<name>.txt or captions.json)."),
    world: Optional[str] = typer.Option(None, help="Synthetic world with an exact scorer instead of --images: shapesworld."),
    n: int = typer.Option(1000, min=1, help="Items (real image + one edit) for --world."),
    seed_base: Optional[int] = typer.Option(None, help="Scene seed base for --world (default: the world's)."),
    scorer: str = typer.Option("auto", help="auto (world's exact score / LAION aesthetic for --images) or aesthetic."),
    aesthetic_weights: Optional[Path] = typer.Option(None, help="LAION aesthetic MLP weights (.safetensors)."),
    threshold: Optional[float] = typer.Option(None, help="Low-fidelity threshold (default: the scorer's; aesthetic 5)."),
    steps: int = typer.Option(20, min=2, help="DDIM steps per edit (the paper's 50 costs 2.5x more)."),
    seed: int = typer.Option(0, help="Seed of the simulated drags and guidance settings."),
    shard: str = typer.Option("0/1", help="k/n: this process edits items i with i % n == k (run n in parallel)."),
    minutes: Optional[float] = typer.Option(None, min=0.01, help="Stop cleanly after this wall time (resume later)."),
    device: Optional[str] = typer.Option(None, envvar="LUCIDDRAG_DEVICE"),
    threads: Optional[int] = typer.Option(None, min=1, help="torch CPU threads (1 per shard is fastest on CPU)."),
) -> None:
    """Simulate drags on real images, edit with editing guidance only, score each edit, write a manifest."""
    import torch

    from luciddrag.engine.training.data import AestheticScorer, folder_source, read_manifest, summarize, synthesize
    from luciddrag.engine.pipeline import DragEditor

    if threads:
        torch.set_num_threads(threads)
    try:
        k, nsh = (int(v) for v in shard.split("/"))
        if not 0 <= k < nsh:
            raise ValueError
    except ValueError:
        _fail(f"--shard {shard!r}: expected k/n with 0 <= k < n")
    try:
        if (images is None) == (world is None):
            raise InputError("give exactly one of --images DIR or --world NAME")
        if world:
            items, sc, source_name = _world(world, n, seed_base)
            total = n
        else:
            items, source_name = folder_source(images), f"folder:{images}"
            total = None
        if scorer == "aesthetic" or (scorer == "auto" and images is not None):
            if aesthetic_weights is None:
                raise InputError("the aesthetic scorer needs --aesthetic-weights (LAION MLP, .safetensors)")
            sc = AestheticScorer(aesthetic_weights, device=device or "cpu")
        elif scorer != "auto":
            raise InputError(f"unknown --scorer {scorer!r}: auto or aesthetic")
        if threshold is not None:
            sc.threshold = threshold
        editor = DragEditor.from_pretrained(base or (None if world is None else _world_model(world)), device=device,
                                            show_progress=False)
        counts = synthesize(editor, items, sc, out, steps=steps, seed=seed, source_name=source_name,
                            shard=(k, nsh), total=total, minutes=minutes)
    except LucidDragError as exc:
        _fail(str(exc))
    typer.echo(f"this run: {counts}; folder: {json.dumps(summarize(read_manifest(out)))}")


def _world_model(world: str) -> str:
    if world == "shapesworld":
        return str(SHAPES_MODEL_DIR)
    raise InputError(f"no default base model for world {world!r}: pass --base")


def train_command(
    base: Optional[str] = typer.Option(None, envvar="LUCIDDRAG_MODEL", help="Base model (hub id or folder)."),
    data: Path = typer.Option(..., help="Data folder from `luciddrag discriminator synthesize`."),
    out: Path = typer.Option(..., help="Output folder (discriminator.safetensors, discriminator.json, record, plots)."),
    epochs: int = typer.Option(100, min=1, help="Epochs (paper: 100)."),
    batch: int = typer.Option(128, min=2, help="Batch size (paper: 128)."),
    lr: float = typer.Option(1e-4, min=0.0, help="Adam learning rate (paper: 1e-4)."),
    minutes: Optional[float] = typer.Option(None, min=0.01, help="Wall-time budget; stops after the running epoch."),
    holdout: float = typer.Option(0.15, min=0.0, max=0.9, help="Fraction of items held out for evaluation."),
    good_edits: bool = typer.Option(False, help="Also use edits scoring above the threshold as positives (good and bad edits then weigh the same, so "
                    "'was it edited' is no cue)."),
    roundtrip: bool = typer.Option(True, help="Also use VAE round-trips of the real images as positives."),
    corruptions: int = typer.Option(0, min=0, help="Locally corrupted copies (blur, smear, noise, hue, ghost, blob "
                                    "near the drag) of each real image and good edit, as negatives: makes damage, not "
                                    "'was it regenerated', the cue. 0 = the paper's recipe."),
    pooling: str = typer.Option("mean", help="Head pooling: 'mean' (global average, the paper's), 'mean_max' "
                                "(average and max: local damage moves the max), 'multiscale' ('mean' plus average "
                                "and max of every down block's output, down to the finest map) or 'multiscale_conv' "
                                "('multiscale' with a trainable 3x3 convolution on each level first)."),
    flip: bool = typer.Option(False, help="Also train on every example mirrored left-right, its caption's "
                              "'left'/'right' swapped: twice the data for no synthesis (not in the paper)."),
    val: float = typer.Option(0.0, min=0.0, max=0.5, help="Fraction of items set apart to pick the best epoch by "
                              "validation ROC-AUC at t<500 (0: keep the last epoch, the paper's)."),
    eval_every: int = typer.Option(5, min=1, help="Epochs between validation scores (with --val)."),
    ema: float = typer.Option(0.0, min=0.0, max=0.9999, help="Keep a moving average of the weights with this decay "
                              "per step (e.g. 0.999) and validate and save the average: smooths out the epoch-to-"
                              "epoch noise of a small data set (0: off, the paper's)."),
    init: Optional[Path] = typer.Option(None, help="Start from this discriminator folder (same base and pooling) "
                                        "instead of the base's mid block: fine-tune one on more data."),
    resume: bool = typer.Option(False, help="Continue from the checkpoint in --out."),
    seed: int = typer.Option(0),
    device: Optional[str] = typer.Option(None, envvar="LUCIDDRAG_DEVICE"),
    threads: Optional[int] = typer.Option(None, min=1, help="torch CPU threads."),
) -> None:
    """Train the fidelity discriminator (frozen down blocks, fine-tuned mid block + linear head) on noisy latents."""
    import torch

    from luciddrag.engine.discriminator import POOLINGS
    from luciddrag.engine.training.train import TrainConfig, train

    if pooling not in POOLINGS:
        _fail(f"--pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
    if threads:
        torch.set_num_threads(threads)
    try:
        cfg = TrainConfig(base=base, data=data, out=out, epochs=epochs, batch=batch, lr=lr, minutes=minutes,
                          holdout=holdout, good_edits=good_edits, roundtrip=roundtrip, corruptions=corruptions,
                          pooling=pooling, flip=flip, val=val, eval_every=eval_every, ema=ema, init=init, seed=seed,
                          device=device)
        train(cfg, resume=resume, log=typer.echo)
    except LucidDragError as exc:
        _fail(str(exc))


@app.command("info")
def info_command(path: Path = typer.Argument(..., help="Discriminator folder.")) -> None:
    """Print a discriminator's config: its base, critic threshold and timesteps, recommended guidance."""
    from luciddrag.engine.discriminator import read_config

    try:
        cfg = read_config(path)
    except LucidDragError as exc:
        _fail(str(exc))
    d = cfg.model_dump()
    d["base"]["probe"] = f"<{len(cfg.base.probe)} values>"
    typer.echo(json.dumps(d, indent=1))


@app.command("eval")
def eval_command(
    path: Path = typer.Argument(..., help="Discriminator folder."),
    data: Path = typer.Option(..., help="Data folder (its held-out split is evaluated)."),
    base: Optional[str] = typer.Option(None, help="Base model (default: the one the data was synthesised with)."),
    holdout: Optional[float] = typer.Option(None, help="Held-out fraction (default: the one used in training)."),
    draws: int = typer.Option(4, min=1, help="Noise draws per example and timestep bucket."),
    paper_split: bool = typer.Option(False, "--paper-split", help="Score the paper's examples (real images and "
                                     "their VAE round-trips vs low-fidelity edits) whatever this discriminator was "
                                     "trained on, so one trained with --good-edits / --corruptions is compared with "
                                     "others on the same examples."),
    device: Optional[str] = typer.Option(None, envvar="LUCIDDRAG_DEVICE"),
) -> None:
    """Held-out accuracy and ROC-AUC per timestep bucket of a trained discriminator.

    By default on the examples it was trained with (its --good-edits / --corruptions); --paper-split for the paper's.
    """
    import torch

    from luciddrag.engine.discriminator import alphas_cumprod, load_discriminator, read_config
    from luciddrag.engine.training.data import DataMeta, read_manifest
    from luciddrag.engine.training.train import (caption_index, encode_examples, evaluate_buckets, examples_from,
                                            format_buckets, is_heldout)
    from luciddrag.engine.loading import load_components

    try:
        cfg = read_config(path)
        meta_path = data / "meta.json"
        meta = DataMeta.model_validate_json(meta_path.read_text()) if meta_path.is_file() else None
        comps = load_components(base or (meta.base if meta else None), device)
        disc = load_discriminator(path, comps)
        frac = holdout if holdout is not None else float(cfg.notes.get("holdout", 0.15))
        notes = cfg.notes
        good_edits, corruptions = ((False, 0) if paper_split else
                                   (bool(notes.get("good_edits", False)), int(notes.get("corruptions", 0))))
        exs = [e for e in examples_from(read_manifest(data), good_edits, corruptions)
               if is_heldout(e.key, frac)]
        if not exs:
            raise InputError(f"no held-out examples in {data} at fraction {frac}")
        lat, exs = encode_examples(comps, data, exs, bool(notes.get("roundtrip", True)))
        labels = torch.tensor([e.label for e in exs], dtype=torch.float32)
        emb, idx = caption_index(comps, [e.caption for e in exs])
        ab = alphas_cumprod(comps.scheduler_config)
        res = evaluate_buckets(disc.model, lat, emb, idx, labels, ab, (0, 250, 500, 750, len(ab)), draws, 0,
                               comps.device, comps.dtype)
    except LucidDragError as exc:
        _fail(str(exc))
    typer.echo(format_buckets(res))


@app.command("calibrate")
def calibrate_command(
    path: Path = typer.Argument(..., help="Discriminator folder (its config gets the calibrated threshold)."),
    world: str = typer.Option("shapesworld", help="World with good / deliberately broken edits."),
    n: int = typer.Option(60, min=4, help="Tasks (each gives one good and one broken edit)."),
    write: bool = typer.Option(True, help="Store the threshold in the discriminator's config."),
    engine_edits: int = typer.Option(0, min=0, help="Also check the critic on this many real engine edits."),
    critic_timesteps: Optional[str] = typer.Option(None, help="Comma-separated timesteps the critic scores at."),
    good_from: str = typer.Option("renders", help="Where the good edits come from: 'renders' (ground-truth "
                                  "renderings) or 'engine' (faithful engine results under the model's settings, "
                                  "what the critique node judges in use); the broken ones are those, damaged."),
) -> None:
    """Calibrate the critic's threshold on a world's good vs broken edits and report accept/reject rates."""
    if world not in WORLDS:
        _fail(f"unknown world {world!r}: one of {', '.join(WORLDS)}")
    if good_from not in ("renders", "engine"):
        _fail(f"--good-from must be 'renders' or 'engine', not {good_from!r}")
    mod = WORLDS[world]
    try:
        if critic_timesteps:
            from luciddrag.engine.discriminator import read_config, write_config

            cfg = read_config(path)
            try:
                cfg.critic_timesteps = [int(v) for v in critic_timesteps.split(",") if v.strip()]
            except ValueError:
                raise InputError(f"--critic-timesteps {critic_timesteps!r}: expected integers like 50,150,250")
            write_config(path, cfg)
        report = mod.calibrate_critic(path, n=n, write=write, engine_edits=engine_edits, log=typer.echo,
                                      good_from=good_from)
    except LucidDragError as exc:
        _fail(str(exc))
    typer.echo(json.dumps({k: v for k, v in report.items() if k != "per_item"}, indent=1))


@app.command("set")
def set_command(
    path: Path = typer.Argument(..., help="Discriminator folder."),
    w_quality: Optional[float] = typer.Option(None, min=0.0, help="Recommended quality-guidance weight w_q."),
    quality_steps: Optional[int] = typer.Option(None, min=0, help="Recommended n2 (guided steps)."),
    threshold: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Critic threshold on P(real)."),
    quality_motions: Optional[str] = typer.Option(
        None, help="Comma-separated kinds of drag the recommended w_q is for: translate, scale, patch "
                   "(e.g. 'translate' where quality guidance helped moves but hurt resizes)."),
) -> None:
    """Store recommended settings (measured elsewhere) in a discriminator's config."""
    from luciddrag.engine.discriminator import MOTIONS, read_config, write_config

    try:
        cfg = read_config(path)
        motions = None
        if quality_motions is not None:
            motions = [m.strip() for m in quality_motions.split(",") if m.strip()]
            bad = [m for m in motions if m not in MOTIONS]
            if bad or not motions:
                raise InputError(f"--quality-motions: {', '.join(bad) or 'empty'}; choose from {', '.join(MOTIONS)}")
        upd = {k: v for k, v in dict(w_quality=w_quality, quality_steps=quality_steps, threshold=threshold,
                                     quality_motions=motions).items() if v is not None}
        write_config(path, cfg.model_copy(update=upd))
    except LucidDragError as exc:
        _fail(str(exc))
    typer.echo(f"updated {', '.join(f'{k}={v}' for k, v in upd.items()) or 'nothing'}")

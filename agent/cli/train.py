"""``luciddrag train shapesworld``: the ShapesWorld commands, as a typer app the main CLI mounts.

Mounted by agent/cli/main.py as ``luciddrag train shapesworld [--out DIR] [--minutes N] [--seed S] [--resume]``.
"""

from __future__ import annotations

from pathlib import Path

import typer

from luciddrag.evals.shapesworld import MODEL_DIR

app = typer.Typer(help="ShapesWorld: train the tiny test-bed diffusion model.", no_args_is_help=True)

DOCS_DIR = Path(__file__).resolve().parents[2] / "docs" / "shapesworld"


@app.command("shapesworld")
def shapesworld(
    out: Path = typer.Option(MODEL_DIR, help="Model folder to write (diffusers SD layout)."),
    minutes: float = typer.Option(41.0, min=0.1, help="Training wall-clock budget (VAE + UNet), in minutes; "
                                  "rendering and encoding add ~3 min on 2 cores."),
    seed: int = typer.Option(0, min=0, max=89, help="Seed for data, initialisation and noise."),
    resume: bool = typer.Option(False, help="Continue from the state in --work-dir instead of starting over."),
    work_dir: Path | None = typer.Option(None, help="Where resumable state lives (default: a temp folder)."),
    docs: Path = typer.Option(DOCS_DIR, help="Where loss curves, sample grid and training record go."),
    scenes: int = typer.Option(48_000, min=100, help="Number of training scenes to render."),
    vae_minutes: float | None = typer.Option(6.0, min=0.0, help="VAE budget in minutes, out of --minutes (6 min "
                                             "reaches recon MSE 0.0065, the VAE's plateau here)."),
    init_from: Path | None = typer.Option(
        None, help="Continue training a trained model folder (e.g. the shipped one): keep its VAE, start the UNet and "
                   "text encoder from its weights and spend all of --minutes on them."),
    layout_weight: float = typer.Option(1.0, min=0.0, help="Loss weight for noise levels t >= --layout-t (where "
                                        "layout, i.e. position words, is decided); 1 = plain Min-SNR weighting."),
    layout_t: int = typer.Option(600, min=0, max=999, help="Timestep from which --layout-weight applies."),
    fresh_unet: bool = typer.Option(False, help="With --init-from: keep only its VAE (same latents) and train a new "
                                    "UNet and text encoder from scratch."),
    threads: int = typer.Option(2, min=1, help="torch CPU threads (use 1 when another job shares a 2-core machine: "
                                "oversubscribed threads run ~3x slower)."),
    prediction: str = typer.Option(
        "v_prediction", help="What a new UNet predicts: epsilon (SD 1.x / 2.1-base) or v_prediction (SD 2.1-768), whose "
                        "loss keeps full weight at high noise, where layout and position words are decided."),
    unet_levels: int = typer.Option(3, min=3, max=4, help="UNet resolution levels for a new UNet: 3 (16-8-4, the "
                                    "shipped model) or 4 (adds a 2x2 level, whose zero padding tells every position "
                                    "apart: for position words)."),
    position_signal: str = typer.Option(
        "cross_attention", help="Give a new UNet explicit absolute position (engine/position.py): cross_attention "
                                "(fixed 2D sin/cos codes on the cross-attention queries, so pixels can attend to the "
                                "words naming their place), input (added to conv_in's output) or none (like SD: "
                                "zero padding only; position words are then ignored)."),
    zero_terminal_snr: bool = typer.Option(
        False, help="Rescale the noise schedule so t = 999 is pure noise and sample from there (needs --prediction "
                    "v_prediction). SD's schedule leaves 7% of the image at t = 999, from which a model learns to "
                    "take layout from the noise instead of the caption's position words."),
) -> None:
    """Train the ShapesWorld VAE, text encoder and UNet on the CPU and save them like a Stable Diffusion folder.

    The defaults reproduce the shipped model (44 min on 2 cores, seed 0): `luciddrag train shapesworld --out DIR
    --docs DIR2` (without --out / --docs it overwrites the shipped model and its record)."""
    from luciddrag.evals.shapesworld.train import TrainConfig, check_config, default_work_dir, train

    cfg = TrainConfig(out=out, work_dir=work_dir or default_work_dir(seed), seed=seed, minutes=minutes,
                      n_scenes=scenes, docs_dir=docs, vae_minutes=vae_minutes,
                      init_from=init_from, layout_weight=layout_weight, layout_t=layout_t,
                      fresh_unet=fresh_unet, unet_levels=unet_levels, threads=threads, prediction_type=prediction,
                      position_signal=None if position_signal == "none" else position_signal,
                      zero_terminal_snr=zero_terminal_snr)
    if init_from is not None and not (init_from / "unet").is_dir():
        raise typer.BadParameter(f"{init_from} is not a model folder (no unet/ inside)", param_hint="--init-from")
    if fresh_unet and init_from is None:
        raise typer.BadParameter("--fresh-unet keeps the VAE of --init-from; give --init-from", param_hint="--fresh-unet")
    try:
        check_config(cfg)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    train(cfg, resume=resume)


@app.callback()
def _group() -> None:
    """Training commands (a group, so that `shapesworld` stays a sub-command when mounted)."""

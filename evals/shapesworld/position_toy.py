"""The position-words toy: does a training recipe make the UNet put a shape where the caption says?

One big red circle at a random place on a ShapesWorld background; captions differ *only* in the position phrase
("a red circle at the top left"). A fresh UNet + text encoder is trained on the shipped VAE's latents for a few
minutes with the chosen recipe, then 45 samples (5 per phrase) are segmented and scored with the same cell test as
the model's quality report. Chance with the centre bias is about 20%. The experiment behind the recipe choice in
docs/shapesworld/README.md; 12 minutes per run on one CPU thread.

    python -m luciddrag.evals.shapesworld.position_toy OUT [--minutes 12] [--prediction v_prediction] [--zero-terminal-snr]
        [--position-signal cross_attention|input] [--levels 3|4]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from luciddrag.evals.shapesworld import quality, world
from luciddrag.evals.shapesworld import train as T
from luciddrag.evals.shapesworld.segment import segment_objects

SHIPPED = Path(__file__).resolve().parent / "model"


def toy_scene(seed: int) -> world.Scene:
    rng = np.random.default_rng(seed)
    bg = world.render_background(rng, T.IMAGE_SIZE, T.IMAGE_SIZE)
    spec = world.sample_spec(rng, T.IMAGE_SIZE, shape="circle", colour="red", size_class="big")
    return world.scene_from_specs(bg, [spec], seed)


def toy_config(out: Path, prediction: str, zero_terminal_snr: bool, position_signal: str | None, levels: int,
               threads: int) -> T.TrainConfig:
    """A fresh UNet on the shipped VAE with the recipe under test."""
    return T.TrainConfig(out=out / "model", work_dir=out / "work", init_from=SHIPPED, fresh_unet=True,
                         unet_levels=levels, prediction_type=prediction, zero_terminal_snr=zero_terminal_snr,
                         position_signal=position_signal, threads=threads)


def run(out: Path, minutes: float = 12.0, prediction: str = "epsilon", zero_terminal_snr: bool = False,
        position_signal: str | None = None, levels: int = 3, n_scenes: int = 6000, threads: int = 1) -> dict:
    cfg = toy_config(out, prediction, zero_terminal_snr, position_signal, levels, threads)
    T.check_config(cfg)  # before minutes of rendering
    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    state = cfg.work_dir / "unet.safetensors"
    state.unlink(missing_ok=True)  # a leftover state may be another recipe's: always start fresh
    scenes = [toy_scene(i) for i in range(n_scenes)]
    # size word left out: the caption varies in position only
    data = T.SceneSet(np.stack([s.array() for s in scenes]),
                      [[(x.shape, x.colour, None, x.position) for x in s.shapes] for s in scenes])
    base = T.load_components(SHIPPED)
    latents = T.encode_latents(base.vae, data.images) * base.vae.config.scaling_factor
    log: dict = {}
    tokenizer = T.build_tokenizer()
    text_encoder, unet = T.train_unet(cfg, data, latents, tokenizer, minutes * 60, state, log)
    T.save_model(cfg.out, tokenizer, text_encoder, base.vae, unet, prediction, zero_terminal_snr)
    comps = T.load_components(cfg.out)
    phrases = world.POSITION_PHRASES
    prompts = [f"a red circle {phrases[i % len(phrases)]}" for i in range(45)]
    images = quality.sample(comps, prompts, steps=30, guidance=4.0, seed=123)
    drawn = placed = 0
    for prompt, image in zip(prompts, images):
        objects = segment_objects(image)
        if objects:
            drawn += 1
            placed += quality.near_cell(objects[0], prompt.split("circle ", 1)[1], T.IMAGE_SIZE, T.IMAGE_SIZE)
    result = {"prediction": prediction, "zero_terminal_snr": zero_terminal_snr, "position_signal": position_signal,
              "levels": levels, "steps": log["unet"]["steps"], "minutes": minutes,
              "circle_drawn": drawn / len(prompts), "in_named_cell": placed / len(prompts)}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    quality.grid(images, len(phrases)).save(out / "grid.png")  # one column per phrase, grid order
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder for the toy model, result.json and grid.png")
    p.add_argument("--minutes", type=float, default=12.0)
    p.add_argument("--prediction", choices=T.PREDICTION_TYPES, default="epsilon")
    p.add_argument("--zero-terminal-snr", action="store_true")
    p.add_argument("--position-signal", choices=("cross_attention", "input"), default=None)
    p.add_argument("--levels", type=int, choices=(3, 4), default=3)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    try:
        T.check_config(toy_config(a.out, a.prediction, a.zero_terminal_snr, a.position_signal, a.levels, a.threads))
    except ValueError as e:  # a recipe the trainer refuses (e.g. zero SNR with epsilon)
        p.error(str(e))
    print(json.dumps(run(a.out, a.minutes, a.prediction, a.zero_terminal_snr, a.position_signal, a.levels,
                         threads=a.threads)))


if __name__ == "__main__":
    main()

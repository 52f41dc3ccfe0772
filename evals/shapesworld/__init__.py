"""ShapesWorld: a procedurally generated test bed (coloured shapes on pastel backgrounds, with captions) and a tiny
text-conditioned latent diffusion model trained on it, loadable exactly like a Stable Diffusion folder."""

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"
DISCRIMINATOR_DIR = Path(__file__).resolve().parent / "discriminator"  # the trained one shipped with the model

"""Training the fidelity discriminator (paper §4.1: Adam, lr 1e-4, 100 epochs, batch 128).

Examples come from a data folder written by `luciddrag.engine.training.data.synthesize`: real images (label 1), edits
scoring below the scorer's threshold (label 0), and optionally
- VAE round-trips of the real images (label 1, on by default): every edit has been through the VAE decoder, so
  without decoded positives the decoder's signature alone would separate the classes (a shortcut unrelated to
  fidelity that would make the critic reject every edit);
- edits scoring above the threshold (label 1, off by default, not in the paper's recipe).

Two options beyond the paper, both off by default: `flip` adds every example mirrored left-right (its caption's
"left" and "right" swapped), which doubles the data at no synthesis cost; `val` sets a validation split apart
(by key, like the held-out one), scores it every few epochs, and keeps the epoch that scored best -- on small data
the discriminator overfits well before the last epoch, and choosing on the reported held-out split would flatter it.
Two more, also off by default: `ema` validates and saves a moving average of the weights rather than the last step's
(smooths the step-to-step noise; the shipped ShapesWorld run's validation AUC rose every epoch), and `init` starts
from an existing discriminator, to fine-tune one on more data.

Each step draws t uniformly from the base's training timesteps and noises the clean latents with the base's own
schedule, so one discriminator serves every sampling step. Classes are balanced by per-sample loss weights.
Items (a real image and its edit) are split into train / held-out by a hash of their key, so no scene is on both sides.

Resumable: `out/checkpoint/` holds the trainable weights, Adam's state, the moving average if any (safetensors)
and progress (JSON), written after every epoch; epoch e shuffles with seed (seed, e), so a resumed run is the run
that was not interrupted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from luciddrag.engine.checkpoint import atomic_save
from luciddrag.engine.checkpoint import load_checkpoint as read_checkpoint
from luciddrag.engine.discriminator import (
    Discriminator,
    alphas_cumprod,
    build_discriminator,
    discrimination_loss,
    encode_prompts,
    image_to_latents,
    load_discriminator,
    noisy,
    read_config,
    save_discriminator,
)
from luciddrag.engine.errors import InputError
from luciddrag.engine.loading import load_components
from luciddrag.engine.metrics import roc_auc, roc_curve
from luciddrag.engine.training.data import DataMeta, SynthRecord, read_manifest

DEFAULT_BUCKETS = (0, 250, 500, 750, 1000)


class TrainConfig(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    base: str | None = None
    data: Path
    out: Path
    epochs: int = Field(100, ge=1)
    batch: int = Field(128, ge=2)
    lr: float = Field(1e-4, ge=0)
    minutes: float | None = None
    holdout: float = Field(0.15, ge=0, lt=1)
    good_edits: bool = False
    roundtrip: bool = True
    corruptions: int = Field(0, ge=0, description="Locally corrupted copies per item (of the real image, and of "
                                                  "the edit when it is faithful and good_edits is on), as negatives.")
    pooling: Literal["mean", "mean_max", "multiscale", "multiscale_conv"] = "mean"
    flip: bool = Field(False, description="Also train on every example mirrored left-right (caption mirrored too).")
    val: float = Field(0.0, ge=0, lt=1, description="Fraction of items for a validation split that picks the best "
                                                   "epoch (0: keep the last epoch).")
    eval_every: int = Field(5, ge=1, description="Epochs between validation scores.")
    ema: float = Field(0.0, ge=0, lt=1, description="Decay of an exponential moving average of the trainable "
                                                  "weights, which are then the ones validated and saved (0: off).")
    init: Path | None = Field(None, description="A discriminator folder (same base, same pooling) to start from "
                                                "instead of the base's mid block: fine-tune it on more data.")
    seed: int = 0
    device: str | None = None
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    eval_draws: int = Field(4, ge=1, description="Noise draws per held-out example and timestep bucket.")


class Example(BaseModel):
    key: str
    path: str
    caption: str
    label: int
    kind: str  # real | roundtrip | low | high | corrupt
    drag: list[float] | None = None  # [hx, hy, tx, ty] that a corruption is placed by
    corrupt_seed: int | None = None  # set: this example is the image at `path` corrupted with this seed
    corrupt_at: str = "target"
    flipped: bool = False  # mirrored left-right (the caption is stored mirrored)


# -- small pure functions ------------------------------------------------------------------------------------------


def _key_hash(key: str) -> float:
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def is_heldout(key: str, fraction: float) -> bool:
    """Deterministic split by key (stable across runs, machines and data-set growth)."""
    return _key_hash(key) < fraction


def split_of(key: str, holdout: float, val: float = 0.0) -> Literal["heldout", "val", "train"]:
    """Which split an item belongs to: the same hash as `is_heldout`, so adding a validation split never moves an
    item into or out of the reported held-out split."""
    h = _key_hash(key)
    return "heldout" if h < holdout else "val" if h < holdout + val else "train"


_MIRRORED = {"left": "right", "right": "left", "Left": "Right", "Right": "Left", "LEFT": "RIGHT", "RIGHT": "LEFT"}


def mirror_caption(caption: str) -> str:
    """The caption of the left-right mirrored image: "left" and "right" swap (whole words, case kept)."""
    import re

    return re.sub(r"\b(left|right|Left|Right|LEFT|RIGHT)\b", lambda m: _MIRRORED[m.group(1)], caption)


def class_weights(labels: torch.Tensor) -> torch.Tensor:
    """Per-sample weights giving both classes equal total weight."""
    pos = labels.float().mean().clamp(1e-6, 1 - 1e-6)
    return torch.where(labels > 0.5, 0.5 / pos, 0.5 / (1 - pos))


EDIT_BALANCED_SHARES = {"low": 0.4, "high": 0.4, "real": 0.1, "roundtrip": 0.1}
# With local corruptions: within each class, the share of each kind (each class totals one half).
CORRUPTION_SHARES = {"low": 0.5, "corrupt": 0.5, "high": 0.5, "real": 0.25, "roundtrip": 0.25}


def kind_weights(kinds: Sequence[str], shares: dict[str, float]) -> torch.Tensor:
    """Per-sample weights giving each kind of example its share of the total weight (renormalised over the kinds
    present). With good edits as positives, equal shares for good and bad *edits* leave "was this image edited"
    worthless as a cue, so the discriminator has to judge fidelity itself."""
    counts = {k: sum(x == k for x in kinds) for k in set(kinds)}
    total = sum(shares.get(k, 0.0) for k in counts)
    w = [shares.get(k, 0.0) / total / counts[k] * len(kinds) for k in kinds]
    return torch.tensor(w, dtype=torch.float32)


# -- data ------------------------------------------------------------------------------------------------------------


def class_kind_weights(kinds: Sequence[str], labels: Sequence[int], shares: dict[str, float]) -> torch.Tensor:
    """Per-sample weights: each class totals half the weight, split among the kinds present in it by `shares`
    (renormalised within the class), equally among the examples of a kind."""
    kinds, labels = list(kinds), [int(x) for x in labels]
    w = torch.zeros(len(kinds))
    for c in (0, 1):
        present = {k for k, l in zip(kinds, labels) if l == c}
        total = sum(shares.get(k, 1.0) for k in present)
        for k in present:
            idx = [i for i, (kk, l) in enumerate(zip(kinds, labels)) if kk == k and l == c]
            w[idx] = 0.5 * shares.get(k, 1.0) / total / len(idx) * len(kinds)
    return w


def examples_from(records: Sequence[SynthRecord], good_edits: bool, corruptions: int = 0,
                  flip: bool = False) -> list[Example]:
    """Positives: the real images (+ good edits if asked); negatives: the low-fidelity edits, and `corruptions`
    locally damaged copies of each real image (around the handle) and of each positive edit (around the target).
    `flip`: every example once more, mirrored left-right with its caption mirrored (same key, so the same split)."""
    out = _examples(records, good_edits, corruptions)
    if flip:
        out += [e.model_copy(update={"flipped": True, "caption": mirror_caption(e.caption)}) for e in out]
    return out


def _examples(records: Sequence[SynthRecord], good_edits: bool, corruptions: int) -> list[Example]:
    out: list[Example] = []
    for r in records:
        out.append(Example(key=r.key, path=r.real, caption=r.caption, label=1, kind="real"))
        if r.label == "low":
            out.append(Example(key=r.key, path=r.edit, caption=r.caption, label=0, kind="low"))
        elif good_edits:
            out.append(Example(key=r.key, path=r.edit, caption=r.caption, label=1, kind="high"))
        if not r.drags:
            continue
        seed = int(hashlib.sha1(r.key.encode()).hexdigest()[:8], 16)
        for j in range(corruptions):
            out.append(Example(key=r.key, path=r.real, caption=r.caption, label=0, kind="corrupt", drag=r.drags[0],
                               corrupt_seed=seed * 31 + 2 * j, corrupt_at="handle"))
            if r.label != "low" and good_edits:
                out.append(Example(key=r.key, path=r.edit, caption=r.caption, label=0, kind="corrupt",
                                   drag=r.drags[0], corrupt_seed=seed * 31 + 2 * j + 1, corrupt_at="target"))
    return out


def load_example_image(data: Path, e: Example) -> Image.Image:
    """The example's image, corrupted as the example says."""
    im = Image.open(data / e.path).convert("RGB")
    if e.corrupt_seed is not None:
        from luciddrag.engine.training.data import corrupt_locally

        im, _ = corrupt_locally(im, e.drag, np.random.default_rng(e.corrupt_seed), at=e.corrupt_at)
    if e.flipped:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return im


def encode_examples(components, data: Path, examples: Sequence[Example], roundtrip: bool, batch: int = 64,
                    progress: bool = True) -> tuple[torch.Tensor, list[Example]]:
    """Clean latents of every example (and, for real images, of their VAE round-trip), in CPU float32."""
    lat, exs = [], []
    for i in tqdm(range(0, len(examples), batch), desc="encode", disable=not progress, leave=False):
        chunk = examples[i:i + batch]
        ims = [load_example_image(data, e) for e in chunk]
        z = image_to_latents(components, ims)
        lat.append(z.float().cpu())
        exs += chunk
        if roundtrip:
            reals = [k for k, e in enumerate(chunk) if e.kind == "real"]
            if reals:
                vae = components.vae
                with torch.no_grad():
                    x = vae.decode(z[reals].to(vae.dtype) / vae.config.scaling_factor).sample.clamp(-1, 1)
                    x = ((x + 1) * 127.5).round() / 127.5 - 1  # through 8-bit pixels, like a saved edit
                    z2 = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
                lat.append(z2.float().cpu())
                exs += [chunk[k].model_copy(update={"kind": "roundtrip"}) for k in reals]
    return torch.cat(lat), exs


def cached_latents(components, cfg: TrainConfig, examples: list[Example], log: Callable[[str], None]):
    """encode_examples, cached in out/latents.safetensors keyed by the examples, the base and the options."""
    from safetensors.torch import load_file, save_file

    ident = hashlib.sha256(json.dumps([[e.key, e.path, e.label, e.corrupt_seed, e.flipped] for e in examples] + [
        components.name, cfg.roundtrip, str(components.unet.config.get("block_out_channels"))]).encode()).hexdigest()
    path = cfg.out / "latents.safetensors"
    meta_path = cfg.out / "latents.json"
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("ident") == ident:
            log(f"latents: cached ({path})")
            return load_file(str(path))["latents"], [Example(**e) for e in meta["examples"]]
    t0 = time.perf_counter()
    lat, exs = encode_examples(components, cfg.data, examples, cfg.roundtrip)
    save_file({"latents": lat.contiguous()}, str(path))
    meta_path.write_text(json.dumps({"ident": ident, "examples": [e.model_dump() for e in exs]}))
    log(f"latents: encoded {len(exs)} in {time.perf_counter() - t0:.1f}s")
    return lat, exs


def caption_index(components, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique captions' text embeddings (U, L, D) on CPU, and each example's row in them."""
    uniq = sorted(set(captions))
    pos = {c: i for i, c in enumerate(uniq)}
    embs = torch.cat([encode_prompts(components, uniq[i:i + 256]).float().cpu() for i in range(0, len(uniq), 256)])
    return embs, torch.tensor([pos[c] for c in captions])


# -- evaluation ----------------------------------------------------------------------------------------------------


def evaluate_buckets(model, lat: torch.Tensor, emb: torch.Tensor, emb_idx: torch.Tensor, labels: torch.Tensor,
                     ab: torch.Tensor, buckets: Sequence[int], draws: int, seed: int, device, dtype,
                     batch: int = 256) -> dict[str, dict]:
    """Per timestep bucket [lo, hi): accuracy at P = 0.5, balanced accuracy and ROC-AUC over `draws` noise draws
    per example (t uniform in the bucket), with fixed seeds so numbers are comparable across epochs and runs."""
    model.eval()
    gen = torch.Generator().manual_seed(seed + 12345)
    out: dict[str, dict] = {}
    y = labels.numpy().astype(bool)
    for lo, hi in zip(buckets[:-1], buckets[1:]):
        scores, ys = [], []
        for _ in range(draws):
            t = torch.randint(lo, hi, (len(lat),), generator=gen)
            eps = torch.randn(lat.shape, generator=gen)
            for i in range(0, len(lat), batch):
                sl = slice(i, i + batch)
                zt = noisy(lat[sl], eps[sl], ab[t[sl]]).to(device, dtype)
                with torch.no_grad():
                    scores.append(model(zt, t[sl].to(device), emb[emb_idx[sl]].to(device, dtype)).float().cpu())
            ys.append(y)
        s = torch.cat(scores).numpy()
        yy = np.concatenate(ys)
        pred = s > 0
        tpr = float(pred[yy].mean()) if yy.any() else float("nan")
        tnr = float((~pred[~yy]).mean()) if (~yy).any() else float("nan")
        fpr_c, tpr_c = roc_curve(s, yy)
        out[f"{lo}-{hi}"] = {"n": int(len(yy)), "accuracy": float((pred == yy).mean()),
                             "balanced_accuracy": (tpr + tnr) / 2, "tpr": tpr, "tnr": tnr,
                             "auc": roc_auc(s, yy), "roc": [fpr_c[:: max(1, len(fpr_c) // 200)].tolist(),
                                                            tpr_c[:: max(1, len(tpr_c) // 200)].tolist()]}
    return out


def format_buckets(metrics: dict[str, dict]) -> str:
    rows = ["| t bucket | n | ROC-AUC | accuracy | balanced acc. | TPR (real) | TNR (low-fid.) |",
            "|---|---|---|---|---|---|---|"]
    for b, m in metrics.items():
        rows.append(f"| {b} | {m['n']} | {m['auc']:.3f} | {m['accuracy']:.3f} | {m['balanced_accuracy']:.3f} | "
                    f"{m['tpr']:.3f} | {m['tnr']:.3f} |")
    return "\n".join(rows)


def plot_record(record: dict, path: Path) -> None:
    """ROC curves per timestep bucket and the training loss, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.2))
    for bucket, m in record["heldout"].items():
        a.plot(m["roc"][0], m["roc"][1], label=f"t {bucket}: AUC {m['auc']:.3f}")
    a.plot([0, 1], [0, 1], "k:", lw=0.8)
    a.set(xlabel="false positive rate (low-fidelity called real)", ylabel="true positive rate (real called real)",
          title="held-out ROC per timestep bucket")
    a.legend(fontsize=8, loc="lower right")
    hist = record["history"]
    b.plot([h["epoch"] for h in hist], [h["loss"] for h in hist], label="train loss")
    if any("heldout_auc_0_500" in h for h in hist):
        b2 = b.twinx()
        b2.plot([h["epoch"] for h in hist if "heldout_auc_0_500" in h],
                [h["heldout_auc_0_500"] for h in hist if "heldout_auc_0_500" in h], "r-", label="held-out AUC t<500")
        if any("val_auc_0_500" in h for h in hist):
            b2.plot([h["epoch"] for h in hist if "val_auc_0_500" in h],
                    [h["val_auc_0_500"] for h in hist if "val_auc_0_500" in h], "g--", label="validation AUC t<500")
        if record.get("kept_epoch") and record.get("best_val_auc_0_500") is not None:
            b2.axvline(record["kept_epoch"], color="g", lw=0.8, ls=":")
        b2.set_ylabel("AUC")
        b2.legend(fontsize=8, loc="center right")
    b.set(xlabel="epoch", ylabel="weighted BCE", title="training")
    b.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- checkpoints ---------------------------------------------------------------------------------------------------


def save_checkpoint(folder: Path, disc: Discriminator, opt: torch.optim.Optimizer, progress: dict,
                    ema: dict[str, torch.Tensor] | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model = {k: v.float() for k, v in disc.model.trainable_state().items()}
    state = {"model": model, "opt": opt.state_dict(), "progress": progress}
    if ema is not None:
        state["ema"] = {k: v.float() for k, v in ema.items()}
    atomic_save(state, folder / "state.safetensors")


def save_best(folder: Path, disc: Discriminator) -> None:
    """The weights of the best epoch so far (by validation score), beside the running checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save({"model": {k: v.float() for k, v in disc.model.trainable_state().items()}}, folder / "best.safetensors")


def ema_update(ema: dict[str, torch.Tensor], current: dict[str, torch.Tensor], decay: float, step: int) -> None:
    """ema <- decay * ema + (1 - decay) * current, with the usual warm-up (the decay grows from 0.1 towards `decay`
    over the first steps) so the average does not drag the initial weights along for thousands of steps."""
    d = min(decay, (1 + step) / (10 + step))
    for k, v in ema.items():
        v.lerp_(current[k].detach().to(v.dtype), 1 - d)


@contextlib.contextmanager
def weights_swapped(disc: Discriminator, weights: dict[str, torch.Tensor] | None):
    """Run the body with `weights` (e.g. the moving average) loaded into the trainable parts; restore afterwards."""
    if weights is None:
        yield
        return
    model = disc.model
    saved = {k: v.detach().clone() for k, v in model.trainable_state().items()}
    model.load_state_dict(weights, strict=False)
    try:
        yield
    finally:
        model.load_state_dict(saved, strict=False)


def check_init(folder: Path, pooling: str) -> None:
    """Fail before minutes of latent encoding when --init names no discriminator or one with another head."""
    theirs = read_config(folder).pooling
    if theirs != pooling:
        raise InputError(f"--init {folder} uses pooling {theirs!r}, this run {pooling!r}: pass --pooling {theirs}")


def init_from(disc: Discriminator, folder: Path, components, pooling: str) -> None:
    """Start from another discriminator's trained weights (checked against this base like any load)."""
    check_init(folder, pooling)
    src = load_discriminator(folder, components, use_cache=False)
    disc.model.load_state_dict({k: v.clone() for k, v in src.model.trainable_state().items()}, strict=False)


def load_best(folder: Path, disc: Discriminator) -> None:
    disc.model.load_state_dict(read_checkpoint(folder / "best.safetensors")["model"], strict=False)


def load_checkpoint(folder: Path, disc: Discriminator, opt: torch.optim.Optimizer,
                    ema: dict[str, torch.Tensor] | None = None) -> dict:
    state = read_checkpoint(folder / "state.safetensors")
    disc.model.load_state_dict(state["model"], strict=False)
    opt.load_state_dict(state["opt"])
    if ema is not None:  # a checkpoint written without an average starts one from its weights
        for k, v in ema.items():
            v.copy_(state.get("ema", state["model"])[k])
    return state["progress"]


# -- the training run ----------------------------------------------------------------------------------------------


def train(cfg: TrainConfig, resume: bool = False, log: Callable[[str], None] = print, components=None) -> dict:
    """Train, evaluate per timestep bucket, save discriminator + training_record.json + roc.png in cfg.out."""
    records = read_manifest(cfg.data)
    if not records:
        raise InputError(f"no training data in {cfg.data}: run `luciddrag discriminator synthesize --out {cfg.data}`")
    meta_path = Path(cfg.data) / "meta.json"
    meta = DataMeta.model_validate_json(meta_path.read_text()) if meta_path.is_file() else None
    base = cfg.base or (meta.base if meta else None)
    if components is None:
        components = load_components(base, cfg.device, "fp32")  # train in fp32 whatever the device
    if meta and str(Path(meta.base).resolve() if Path(meta.base).exists() else meta.base) != str(
            Path(components.name).resolve() if Path(components.name).exists() else components.name):
        log(f"warning: the data was synthesised with base {meta.base!r}, training for {components.name!r}")
    cfg.out.mkdir(parents=True, exist_ok=True)
    ckpt = cfg.out / "checkpoint"
    if not resume and (ckpt / "state.safetensors").is_file():
        raise InputError(f"{ckpt} holds a checkpoint: pass --resume to continue it, or use another --out")

    if cfg.init is not None:
        check_init(cfg.init, cfg.pooling)
    examples = examples_from(records, cfg.good_edits, cfg.corruptions, cfg.flip)
    lat, examples = cached_latents(components, cfg, examples, log)
    labels = torch.tensor([e.label for e in examples], dtype=torch.float32)
    emb, emb_idx = caption_index(components, [e.caption for e in examples])
    split = [split_of(e.key, cfg.holdout, cfg.val) for e in examples]
    # mirrored copies train only: the held-out and validation scores stay comparable with runs without --flip
    tr = torch.tensor([i for i, s in enumerate(split) if s == "train"], dtype=torch.long)
    ho = torch.tensor([i for i, s in enumerate(split) if s == "heldout" and not examples[i].flipped], dtype=torch.long)
    va = torch.tensor([i for i, s in enumerate(split) if s == "val" and not examples[i].flipped], dtype=torch.long)
    counts = {k: sum(e.kind == k for e in examples) for k in ("real", "roundtrip", "low", "high", "corrupt")}
    counts["flipped"] = sum(e.flipped for e in examples)
    log(f"examples: {counts}; train {len(tr)}, validation {len(va)}, held-out {len(ho)} "
        f"({int(labels[ho].sum())} positive / {int((1 - labels[ho]).sum())} negative)")
    if cfg.val and (len(va) == 0 or labels[va].min() == labels[va].max()):
        raise InputError(f"the validation split ({cfg.val:.0%} of items) holds {len(va)} examples, not both classes: "
                         "synthesise more data or raise --val")
    if len(tr) < 2 or labels[tr].min() == labels[tr].max():
        raise InputError("training needs both real and low-fidelity examples: synthesise more data")

    disc = build_discriminator(components, cfg.seed, cfg.pooling)
    if cfg.init is not None:
        init_from(disc, cfg.init, components, cfg.pooling)
        log(f"starting from {cfg.init}")
    model = disc.model
    opt = torch.optim.Adam(model.trainable_parameters(), lr=cfg.lr)
    ema = {k: v.detach().clone() for k, v in model.trainable_state().items()} if cfg.ema else None
    progress = {"epoch": 0, "history": [], "seconds": 0.0, "best_epoch": None, "best_val_auc": None, "step": 0}
    if resume and (ckpt / "state.safetensors").is_file():
        progress = {**progress, **load_checkpoint(ckpt, disc, opt, ema)}
        log(f"resumed at epoch {progress['epoch']} ({progress['seconds'] / 60:.1f} min trained)")

    ab = alphas_cumprod(components.scheduler_config)
    T = len(ab)
    dev, dt = components.device, components.dtype
    if cfg.corruptions:
        weights = class_kind_weights([examples[i].kind for i in tr.tolist()], labels[tr].tolist(), CORRUPTION_SHARES)
    elif cfg.good_edits and counts["high"]:
        weights = kind_weights([examples[i].kind for i in tr.tolist()], EDIT_BALANCED_SHARES)
    else:
        weights = class_weights(labels[tr])
    t_start = time.perf_counter() - progress["seconds"]
    budget = 60 * cfg.minutes if cfg.minutes else math.inf
    steps_per_epoch = math.ceil(len(tr) / cfg.batch)
    bar = tqdm(total=cfg.epochs, initial=progress["epoch"], desc="train discriminator", unit="epoch")
    while progress["epoch"] < cfg.epochs and time.perf_counter() - t_start < budget:
        e = progress["epoch"]
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + e)
        perm = tr[torch.randperm(len(tr), generator=gen)]
        model.train()
        losses = []
        for s in range(steps_per_epoch):
            idx = perm[s * cfg.batch:(s + 1) * cfg.batch]
            if len(idx) < 2:
                continue
            t = torch.randint(0, T, (len(idx),), generator=gen)
            eps = torch.randn(lat[idx].shape, generator=gen)
            zt = noisy(lat[idx], eps, ab[t]).to(dev, dt)
            logits = model(zt, t.to(dev), emb[emb_idx[idx]].to(dev, dt))
            w = weights[torch.searchsorted(tr, idx)].to(dev)
            loss = discrimination_loss(logits, labels[idx].to(dev), w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                ema_update(ema, model.trainable_state(), cfg.ema, progress["step"])
            progress["step"] += 1
            losses.append(float(loss.detach()))
        entry = {"epoch": e + 1, "loss": float(np.mean(losses)), "minutes": (time.perf_counter() - t_start) / 60}
        with weights_swapped(disc, ema):  # with --ema, the average is what is validated and saved
            if len(ho) and ((e + 1) % 10 == 0 or e == 0):
                quick = evaluate_buckets(model, lat[ho], emb, emb_idx[ho], labels[ho], ab, (0, 500, T), 1, cfg.seed,
                                         dev, dt)
                entry["heldout_auc_0_500"] = quick["0-500"]["auc"]
                entry["heldout_auc_500_1000"] = quick[f"500-{T}"]["auc"]
            new_best = False
            if len(va) and (e + 1) % cfg.eval_every == 0:
                # 2 noise draws per example on t < 500, the range the bar is set on and the critic scores in
                v = evaluate_buckets(model, lat[va], emb, emb_idx[va], labels[va], ab, (0, 500), 2, cfg.seed + 1,
                                     dev, dt)["0-500"]["auc"]
                entry["val_auc_0_500"] = v
                new_best = progress["best_val_auc"] is None or v > progress["best_val_auc"]
                if new_best:
                    progress["best_val_auc"], progress["best_epoch"] = v, e + 1
            if new_best:
                save_best(ckpt, disc)
        progress["history"].append(entry)
        progress["epoch"] = e + 1
        progress["seconds"] = time.perf_counter() - t_start
        save_checkpoint(ckpt, disc, opt, progress, ema)
        bar.update(1)
        bar.set_postfix(loss=f"{entry['loss']:.3f}", **({"auc<500": f"{entry['heldout_auc_0_500']:.3f}"}
                                                         if "heldout_auc_0_500" in entry else {}))
    bar.close()
    stopped = "budget" if progress["epoch"] < cfg.epochs else "epochs"
    if ema is not None:
        model.load_state_dict(ema, strict=False)
    if progress["best_epoch"] is not None:
        load_best(ckpt, disc)
        log(f"kept epoch {progress['best_epoch']} of {progress['epoch']} "
            f"(validation ROC-AUC t<500 {progress['best_val_auc']:.3f})")

    buckets = tuple(b for b in cfg.buckets if b < T) + (T,)
    heldout = evaluate_buckets(model, lat[ho], emb, emb_idx[ho], labels[ho], ab, buckets, cfg.eval_draws,
                               cfg.seed, dev, dt) if len(ho) else {}
    log(f"held-out ({len(ho)} examples x {cfg.eval_draws} noise draws per bucket):\n" + format_buckets(heldout))
    disc.config.notes = {"trained_on": str(cfg.data), "epochs": progress["epoch"], "holdout": cfg.holdout,
                         "good_edits": cfg.good_edits, "roundtrip": cfg.roundtrip,
                         "corruptions": cfg.corruptions, "flip": cfg.flip, "val": cfg.val, "ema": cfg.ema,
                         "init": str(cfg.init) if cfg.init else None,
                         "best_epoch": progress["best_epoch"],
                         "heldout_auc": {k: round(v["auc"], 4) for k, v in heldout.items()}}
    save_discriminator(disc, cfg.out)
    record = {"config": json.loads(cfg.model_dump_json()), "base": components.name, "data": {
        "folder": str(cfg.data), "items": len(records), "examples": counts, "train": int(len(tr)),
        "heldout": int(len(ho)), "meta": meta.model_dump() if meta else None},
        "epochs_done": progress["epoch"], "kept_epoch": progress["best_epoch"] or progress["epoch"],
        "best_val_auc_0_500": progress["best_val_auc"], "validation": int(len(va)), "stopped_by": stopped, "train_minutes": progress["seconds"] / 60,
        "steps_per_epoch": steps_per_epoch, "history": progress["history"], "heldout": heldout,
        "torch_threads": torch.get_num_threads(), "device": str(dev)}
    (cfg.out / "training_record.json").write_text(json.dumps(record, indent=1))
    plot_record(record, cfg.out / "roc.png")
    log(f"saved {cfg.out / 'discriminator.safetensors'} ({progress['epoch']} epochs, "
        f"{progress['seconds'] / 60:.1f} min; stopped by {stopped})")
    return record

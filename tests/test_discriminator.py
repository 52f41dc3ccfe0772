"""Fidelity discriminator: model shapes, frozen parts, training, quality-gradient sign, base versioning, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from luciddrag.engine.discriminator import (QualityTerm, build_discriminator, discrimination_loss,
                                  encode_prompts, load_discriminator, quality_energy, read_config,
                                  save_discriminator, score_image)
from luciddrag.engine.metrics import roc_auc
from luciddrag.engine.training.train import class_weights, is_heldout, mirror_caption, split_of
from luciddrag.engine.errors import BaseMismatchError, LucidDragError, ModelLoadError
from luciddrag.engine.guidance import GuidanceContext


@pytest.fixture(scope="module")
def comps(tiny_model_dir):
    from luciddrag.engine.loading import load_components

    return load_components(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    from luciddrag.engine.loading import load_components
    from luciddrag.engine.tiny import build_tiny_model

    return load_components(str(build_tiny_model(tmp_path_factory.mktemp("tiny-sd-1"), seed=1)), device="cpu")


def _batch(comps, n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 4, 8, 8, generator=g)
    emb = encode_prompts(comps, ["a red circle"] * n)
    return z, emb


def test_output_shapes_and_conditioning(comps):
    disc = build_discriminator(comps)
    z, emb = _batch(comps)
    out = disc.model(z, 10, emb[:1])
    assert out.shape == (4,) and out.dtype == torch.float32
    assert disc.model(z, torch.tensor([1, 200, 500, 999]), emb).shape == (4,)
    # the output depends on t and on the text (the UNet's own conditioning paths feed the mid block)
    other = encode_prompts(comps, ["a big blue square"] * 4)
    with torch.no_grad():
        a, b, c = disc.model(z, 10, emb), disc.model(z, 900, emb), disc.model(z, 10, other)
    assert not torch.allclose(a, b) and not torch.allclose(a, c)
    # only the mid block and the head are trainable, and they are a copy, not the base's mid block
    names = {n.split(".")[0] for n, p in disc.model.named_parameters() if p.requires_grad}
    assert names == {"mid_block", "head_norm", "head"}
    assert disc.model.mid_block is not comps.unet.mid_block
    assert disc.model.down_blocks is comps.unet.down_blocks  # shared, not copied


def test_frozen_parts_stay_frozen_through_a_training_step(comps):
    disc = build_discriminator(comps)
    frozen = {n: p.detach().clone() for n, p in comps.unet.named_parameters()}
    mid = {n: p.detach().clone() for n, p in disc.model.mid_block.named_parameters()}
    head = disc.model.head.weight.detach().clone()
    opt = torch.optim.Adam(disc.model.trainable_parameters(), lr=1e-3)
    z, emb = _batch(comps)
    disc.model.train()
    loss = discrimination_loss(disc.model(z, torch.tensor([5, 50, 500, 900]), emb), torch.tensor([1.0, 0, 1, 0]))
    loss.backward()
    opt.step()
    for n, p in comps.unet.named_parameters():  # the whole base UNet, its mid block included, is untouched
        assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, mid[n]) for n, p in disc.model.mid_block.named_parameters())
    assert not torch.equal(disc.model.head.weight, head)
    assert not comps.unet.down_blocks.training  # train() leaves the shared base modules in eval mode


def test_a_few_training_steps_lower_the_loss(comps):
    torch.manual_seed(0)
    disc = build_discriminator(comps, seed=0)
    g = torch.Generator().manual_seed(1)
    real = torch.randn(8, 4, 8, 8, generator=g) * 0.3 + 1.0  # two separable latent populations
    fake = torch.randn(8, 4, 8, 8, generator=g) * 0.3 - 1.0
    z = torch.cat([real, fake])
    y = torch.cat([torch.ones(8), torch.zeros(8)])
    emb = encode_prompts(comps, ["a red circle"])
    t = torch.full((16,), 50)
    opt = torch.optim.Adam(disc.model.trainable_parameters(), lr=3e-3)

    def loss_now() -> float:
        with torch.no_grad():
            return float(discrimination_loss(disc.model(z, t, emb), y))

    before = loss_now()
    disc.model.train()
    for _ in range(15):
        loss = discrimination_loss(disc.model(z, t, emb), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = loss_now()
    assert after < 0.7 * before, (before, after)


def test_quality_gradient_raises_d(comps):
    disc = build_discriminator(comps, seed=3)
    z, emb = _batch(comps, n=2, seed=5)
    z = z.requires_grad_(True)
    term = QualityTerm(disc, weight=1.0, steps=5)
    ctx = GuidanceContext(step=0, num_steps=10, timestep=300, alpha_bar=0.5, latents=z, features={}, ref_features={},
                          text_embeddings=emb, geometry=None)
    e = term.energy(ctx)
    assert e.shape == (2,) and bool((e > 0).all())
    grad, = torch.autograd.grad(e.sum(), z)
    with torch.no_grad():
        d0 = torch.sigmoid(disc.model(z, 300, emb))
        d1 = torch.sigmoid(disc.model(z - 0.5 * grad / grad.norm(), 300, emb))  # a step along -grad E
    assert bool((d1 > d0).all()), (d0, d1)
    # energy is -log D exactly
    with torch.no_grad():
        assert torch.allclose(e, -torch.log(d0), atol=1e-5)
    assert term.active(4, 10) and not term.active(5, 10)
    assert torch.allclose(quality_energy(torch.tensor([0.0])), torch.tensor([np.log(2.0)], dtype=torch.float32))


def test_quality_term_plugs_into_the_sampler(tiny_editor, tmp_path):
    from luciddrag.engine.request import EditRequest

    disc = build_discriminator(tiny_editor.c, seed=0)
    img = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    req = EditRequest.create(image=img, points=[(10, 10), (20, 12)], steps=4, guidance={"edit_steps": 0})
    res = tiny_editor.edit(req, extra_terms=[QualityTerm(disc, weight=1.0, steps=2)])
    steps_with_q = [d["step"] for d in res.diagnostics if "quality" in d]
    assert steps_with_q == [0, 1]  # quality alone (editing guidance off) is applied on exactly the first n2 steps
    assert res.stats["unet_backward"] == 2


def test_save_load_roundtrip_and_score(comps, tmp_path):
    disc = build_discriminator(comps, seed=2)
    save_discriminator(disc, tmp_path / "d")
    assert (tmp_path / "d" / "discriminator.safetensors").stat().st_size < 2_000_000
    loaded = load_discriminator(tmp_path / "d", comps, use_cache=False)
    z, emb = _batch(comps)
    with torch.no_grad():
        assert torch.allclose(loaded.model(z, 100, emb), disc.model(z, 100, emb))
    p = score_image(loaded, comps, Image.new("RGB", (32, 32), (200, 30, 30)), "a red circle")
    assert 0.0 < p < 1.0
    assert read_config(tmp_path / "d").base.name == comps.name


def test_mean_max_pooling_sees_a_local_spike_and_round_trips(comps, tmp_path):
    """'mean_max' feeds the head the map's max too, so a change confined to one location moves the logit through
    the max features; the choice is stored in the config and restored on load (old configs default to 'mean')."""
    disc = build_discriminator(comps, seed=3, pooling="mean_max")
    assert disc.config.pooling == "mean_max" and disc.model.head.in_features == 2 * disc.model.head_norm.num_channels
    captured = {}
    disc.model.head.register_forward_hook(lambda m, i, o: captured.update(x=i[0].detach()))
    z, emb = _batch(comps, n=1)
    with torch.no_grad():
        disc.model(z, 100, emb)
    c = disc.model.head_norm.num_channels
    mean_part, max_part = captured["x"][:, :c], captured["x"][:, c:]
    assert (max_part >= mean_part - 1e-6).all() and not torch.allclose(max_part, mean_part)
    save_discriminator(disc, tmp_path / "mm")
    cfg_path = tmp_path / "mm" / "discriminator.json"
    assert json.loads(cfg_path.read_text())["pooling"] == "mean_max"
    loaded = load_discriminator(tmp_path / "mm", comps, use_cache=False)
    with torch.no_grad():
        assert torch.allclose(loaded.model(z, 100, emb), disc.model(z, 100, emb))
    legacy = json.loads(cfg_path.read_text())
    del legacy["pooling"]
    assert read_config_from(legacy).pooling == "mean"
    with pytest.raises(ValueError, match="pooling"):
        build_discriminator(comps, pooling="median")


def test_multiscale_head_sees_every_down_level_and_trains_only_its_own_norms(comps, tmp_path):
    """'multiscale' adds the average and max of each down block's last full-resolution map: the finest map (8x8
    on the tiny base) is there, its norms train, the shared down blocks stay frozen; saved and restored."""
    disc = build_discriminator(comps, seed=4, pooling="multiscale")
    levels = [int(c) for c in comps.unet.config.block_out_channels]
    c = disc.model.head_norm.num_channels
    assert disc.model.head.in_features == c + 2 * sum(levels)
    trainable = {n.split(".")[0] for n, p in disc.model.named_parameters() if p.requires_grad}
    assert trainable == {"mid_block", "head_norm", "head", "skip_norms"}
    seen = []
    disc.model.skip_norms[0].register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[-2:])))
    z, emb = _batch(comps, n=2)
    out = disc.model(z, 50, emb)
    assert seen == [(8, 8)]  # the latent's own resolution, before any downsampling
    out.sum().backward()
    assert disc.model.skip_norms[0].weight.grad is not None
    assert all(p.grad is None for p in comps.unet.down_blocks.parameters())
    save_discriminator(disc, tmp_path / "ms")
    loaded = load_discriminator(tmp_path / "ms", comps, use_cache=False)
    with torch.no_grad():
        assert torch.allclose(loaded.model(z, 50, emb), disc.model(z, 50, emb))


def test_multiscale_conv_head_starts_as_multiscale_and_trains_its_convs(comps, tmp_path):
    """'multiscale_conv' puts a trainable 3x3 conv on each down level, initialised to the identity: before training
    it scores exactly as 'multiscale' with the same weights; its convs get gradients; saved and restored."""
    disc = build_discriminator(comps, seed=4, pooling="multiscale_conv")
    plain = build_discriminator(comps, seed=4, pooling="multiscale")
    plain.model.load_state_dict({k: v for k, v in disc.model.state_dict().items() if "skip_convs" not in k})
    z, emb = _batch(comps, n=2)
    with torch.no_grad():
        assert torch.allclose(disc.model(z, 50, emb), plain.model(z, 50, emb), atol=1e-5)
    trainable = {n.split(".")[0] for n, p in disc.model.named_parameters() if p.requires_grad}
    assert trainable == {"mid_block", "head_norm", "head", "skip_norms", "skip_convs"}
    disc.model(z, 50, emb).sum().backward()
    assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in disc.model.skip_convs)
    assert all(p.grad is None for p in comps.unet.down_blocks.parameters())
    with torch.no_grad():
        disc.model.skip_convs[0].weight.add_(0.05)
    save_discriminator(disc, tmp_path / "msc")
    loaded = load_discriminator(tmp_path / "msc", comps, use_cache=False)
    with torch.no_grad():
        assert torch.allclose(loaded.model(z, 50, emb), disc.model(z, 50, emb))
        assert not torch.allclose(loaded.model(z, 50, emb), plain.model(z, 50, emb))


def read_config_from(data: dict):
    from luciddrag.engine.discriminator import DiscriminatorConfig

    return DiscriminatorConfig.model_validate(data)


def test_loading_against_a_different_base_fails_clearly(comps, other_base, tmp_path):
    disc = build_discriminator(comps)
    save_discriminator(disc, tmp_path / "d")
    with pytest.raises(BaseMismatchError, match="trained for base .* different weights in the frozen down blocks"):
        load_discriminator(tmp_path / "d", other_base, use_cache=False)
    assert issubclass(BaseMismatchError, ModelLoadError) and issubclass(BaseMismatchError, LucidDragError)
    # another architecture
    cfg = json.loads((tmp_path / "d" / "discriminator.json").read_text())
    cfg["base"]["architecture"] = "0" * 16
    (tmp_path / "d" / "discriminator.json").write_text(json.dumps(cfg))
    with pytest.raises(BaseMismatchError, match="different UNet architecture"):
        load_discriminator(tmp_path / "d", comps, use_cache=False)
    with pytest.raises(ModelLoadError, match="discriminator not found"):
        load_discriminator(tmp_path / "nothing", comps)


def test_small_math():
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert roc_auc(np.array([1.0, 1.0]), np.array([0, 1])) == pytest.approx(0.5)  # ties count half
    w = class_weights(torch.tensor([1.0, 0, 0, 0]))
    assert float(w[0]) == pytest.approx(3 * float(w[1]))  # both classes carry equal total weight
    keys = [f"k{i}" for i in range(2000)]
    frac = np.mean([is_heldout(k, 0.2) for k in keys])
    assert 0.15 < frac < 0.25 and is_heldout("k1", 0.2) == is_heldout("k1", 0.2)


def test_mirror_caption_and_validation_split():
    assert mirror_caption("a red square on the left") == "a red square on the right"
    assert mirror_caption("Right: a circle at the top left, not leftover") == "Left: a circle at the top right, not leftover"
    assert mirror_caption("a circle in the middle") == "a circle in the middle"
    keys = [f"k{i}" for i in range(3000)]
    splits = [split_of(k, 0.15, 0.1) for k in keys]
    # adding a validation split never moves an item into or out of the reported held-out split
    assert [s == "heldout" for s in splits] == [is_heldout(k, 0.15) for k in keys]
    assert 0.07 < splits.count("val") / len(keys) < 0.13
    assert all(split_of(k, 0.15) != "val" for k in keys)


def _toy_data(folder, n: int = 40):
    """Real images: a clean square; their 'low-fidelity edits': the same square under heavy noise."""
    from luciddrag.engine.training.data import SynthRecord

    (folder / "real").mkdir(parents=True)
    (folder / "edits").mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        im = np.full((32, 32, 3), 230, np.uint8)
        x, y = rng.integers(2, 20, 2)
        im[y:y + 10, x:x + 10] = (200, 30, 30)
        Image.fromarray(im).save(folder / "real" / f"k{i}.png")
        noisy_im = np.clip(im + rng.normal(0, 60, im.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy_im).save(folder / "edits" / f"k{i}.png")
        lines.append(SynthRecord(key=f"k{i}", caption="a red square on the left", real=f"real/k{i}.png",
                                 edit=f"edits/k{i}.png", drags=[[8, 8, 20, 8]], score=0.0, label="low"))
    (folder / "manifest.jsonl").write_text("".join(r.model_dump_json() + "\n" for r in lines))


def test_training_keeps_the_best_validation_epoch_and_mirrors_only_training_examples(comps, tmp_path):
    from safetensors.torch import load_file

    from luciddrag.engine.checkpoint import load_checkpoint
    from luciddrag.engine.training.train import TrainConfig, examples_from, train
    from luciddrag.engine.training.data import read_manifest

    _toy_data(tmp_path / "data")
    exs = examples_from(read_manifest(tmp_path / "data"), good_edits=False, flip=True)
    assert len(exs) == 160 and sum(e.flipped for e in exs) == 80
    assert {e.caption for e in exs if e.flipped} == {"a red square on the right"}
    cfg = TrainConfig(data=tmp_path / "data", out=tmp_path / "run", epochs=4, batch=16, lr=1e-3, holdout=0.25,
                      val=0.3, eval_every=1, flip=True, eval_draws=1)
    rec = train(cfg, log=lambda _: None, components=comps)
    vals = [h["val_auc_0_500"] for h in rec["history"]]
    assert len(vals) == 4 and rec["kept_epoch"] == 1 + int(np.argmax(vals))
    assert rec["best_val_auc_0_500"] == pytest.approx(max(vals))
    assert rec["data"]["examples"]["flipped"] > 0 and rec["validation"] > 0
    # the saved discriminator holds the kept epoch's weights, not the last epoch's
    best = load_checkpoint(tmp_path / "run" / "checkpoint" / "best.safetensors")["model"]
    saved = load_file(str(tmp_path / "run" / "discriminator.safetensors"))
    assert set(saved) == set(best) and all(torch.equal(saved[k], best[k]) for k in saved)


def test_ema_update_is_a_warmed_up_moving_average():
    from luciddrag.engine.training.train import ema_update

    ema, cur = {"w": torch.zeros(3)}, {"w": torch.ones(3)}
    ema_update(ema, cur, 0.99, step=0)  # warm-up: decay min(0.99, 1/10) = 0.1
    assert torch.allclose(ema["w"], torch.full((3,), 0.9))
    ema = {"w": torch.zeros(3)}
    ema_update(ema, cur, 0.5, step=10_000)  # long after warm-up the decay is the one asked for
    assert torch.allclose(ema["w"], torch.full((3,), 0.5))
    assert torch.equal(cur["w"], torch.ones(3))  # the live weights are only read


def test_training_with_ema_saves_the_average_and_resumes_it(comps, tmp_path):
    from safetensors.torch import load_file

    from luciddrag.engine.checkpoint import load_checkpoint
    from luciddrag.engine.training.train import TrainConfig, train

    _toy_data(tmp_path / "data")
    cfg = TrainConfig(data=tmp_path / "data", out=tmp_path / "run", epochs=2, batch=16, lr=1e-3, holdout=0.25,
                      ema=0.9, eval_draws=1)
    train(cfg, log=lambda _: None, components=comps)
    state = load_checkpoint(tmp_path / "run" / "checkpoint" / "state.safetensors")
    saved = load_file(str(tmp_path / "run" / "discriminator.safetensors"))
    assert set(saved) == set(state["ema"])
    assert all(torch.allclose(saved[k], state["ema"][k]) for k in saved)  # the average is what is saved...
    assert any(not torch.allclose(state["ema"][k], state["model"][k]) for k in saved)  # ...and it is not the last
    assert state["progress"]["step"] > 0
    # resuming continues the same average rather than restarting it from the live weights
    train(cfg.model_copy(update={"epochs": 3}), resume=True, log=lambda _: None, components=comps)
    after = load_checkpoint(tmp_path / "run" / "checkpoint" / "state.safetensors")
    assert after["progress"]["epoch"] == 3 and after["progress"]["step"] > state["progress"]["step"]
    assert any(not torch.allclose(after["ema"][k], after["model"][k]) for k in saved)


def test_init_starts_from_another_discriminator_and_checks_its_pooling(comps, tmp_path):
    from luciddrag.engine.training.train import TrainConfig, init_from, train

    src = build_discriminator(comps, seed=5)
    with torch.no_grad():
        src.model.head.weight.fill_(0.25)
    save_discriminator(src, tmp_path / "src")
    disc = build_discriminator(comps, seed=0)
    init_from(disc, tmp_path / "src", comps, "mean")
    theirs, ours = src.model.trainable_state(), disc.model.trainable_state()
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)
    with pytest.raises(LucidDragError, match="pooling 'mean'.*--pooling mean"):
        init_from(build_discriminator(comps, pooling="mean_max"), tmp_path / "src", comps, "mean_max")
    # through train(): the record says where it started
    _toy_data(tmp_path / "data")
    rec = train(TrainConfig(data=tmp_path / "data", out=tmp_path / "run", epochs=1, batch=16, lr=1e-3,
                            holdout=0.25, init=tmp_path / "src", eval_draws=1), log=lambda _: None, components=comps)
    assert read_config(tmp_path / "run").notes["init"] == str(tmp_path / "src") and rec["epochs_done"] == 1


def test_local_corruptions_damage_only_near_the_drag():
    from PIL import Image

    from luciddrag.engine.training.data import LOCAL_CORRUPTIONS, corrupt_locally

    yy, xx = np.mgrid[0:64, 0:64]
    arr = np.full((64, 64, 3), 200, np.uint8)
    arr[(xx - 40) ** 2 + (yy - 20) ** 2 <= 36] = (30, 160, 60)  # a green disc at the drag's target
    im = Image.fromarray(arr)
    drag = [12.0, 20.0, 40.0, 20.0]
    far = (xx < 8) & (yy > 50)  # a corner no corruption may reach
    for k in LOCAL_CORRUPTIONS:
        out, kind = corrupt_locally(im, drag, np.random.default_rng(3), k)
        diff = np.abs(np.asarray(out, float) - arr).sum(-1)
        assert kind == k and diff.sum() > 0, k
        assert diff[far].max() == 0, k
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt_locally(im, drag, np.random.default_rng(0), "melt")


def test_corruption_examples_and_their_weights():
    from luciddrag.engine.training.data import SynthRecord
    from luciddrag.engine.training.train import class_kind_weights, examples_from

    recs = [SynthRecord(key=f"k{i}", caption="c", real=f"real/k{i}.png", edit=f"edits/k{i}.png",
                        drags=[[1, 2, 3, 4]], score=0, label="low" if i % 2 else "high") for i in range(4)]
    exs = examples_from(recs, good_edits=True, corruptions=2)
    kinds = [e.kind for e in exs]
    # 2 corrupted reals per item + 2 corrupted good edits per high item; all negatives with a seed and the drag
    assert kinds.count("corrupt") == 4 * 2 + 2 * 2
    assert all(e.label == 0 and e.corrupt_seed is not None and e.drag == [1, 2, 3, 4]
               for e in exs if e.kind == "corrupt")
    assert len({e.corrupt_seed for e in exs if e.kind == "corrupt"}) == 12
    assert examples_from(recs, good_edits=True, corruptions=0) == [e for e in exs if e.kind != "corrupt"]
    w = class_kind_weights(kinds, [e.label for e in exs], {"low": 0.5, "corrupt": 0.5, "high": 0.5, "real": 0.5})
    lab = torch.tensor([e.label for e in exs])
    assert float(w[lab == 1].sum()) == pytest.approx(float(w[lab == 0].sum()))
    low, cor = torch.tensor([k == "low" for k in kinds]), torch.tensor([k == "corrupt" for k in kinds])
    assert float(w[low].sum()) == pytest.approx(float(w[cor].sum()))


def test_cli_synthesize_train_info_eval(tmp_path, tiny_model_dir):
    """End to end through the CLI on the ShapesWorld model: 6 items at 2 steps, 2 epochs."""
    import typer
    from typer.testing import CliRunner

    from luciddrag.agent.cli import discriminator as discriminator_cli

    # mounted exactly as agent/cli/main.py mounts them (a fresh app keeps this test independent of other commands)
    app = typer.Typer()
    app.add_typer(discriminator_cli.app, name="discriminator")
    app.command("train-discriminator")(discriminator_cli.train_command)
    runner = CliRunner()
    data, out = tmp_path / "data", tmp_path / "disc"
    r = runner.invoke(app, ["discriminator", "synthesize", "--out", str(data), "--world", "shapesworld", "--n", "6",
                            "--steps", "2"])
    assert r.exit_code == 0, r.output
    lines = (data / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all((data / json.loads(x)["edit"]).is_file() for x in lines)
    # resumable: a second run edits nothing new
    r = runner.invoke(app, ["discriminator", "synthesize", "--out", str(data), "--world", "shapesworld", "--n", "6",
                            "--steps", "2"])
    assert r.exit_code == 0 and "'edited': 0" in r.output and "'skipped': 6" in r.output
    # force both classes so the tiny set is trainable whatever the 2-step edits scored
    recs = [json.loads(x) for x in lines]
    for i, rec in enumerate(recs):
        rec["label"] = "low" if i % 2 else "high"
    (data / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs))
    r = runner.invoke(app, ["train-discriminator", "--data", str(data), "--out", str(out), "--epochs", "2",
                            "--batch", "4", "--holdout", "0.3", "--good-edits", "--corruptions", "1"])
    assert r.exit_code == 0, r.output
    assert "ROC-AUC" in r.output and "'corrupt': 9" in r.output  # 6 corrupted reals + 3 corrupted good edits
    rec = json.loads((out / "training_record.json").read_text())
    assert rec["epochs_done"] == 2 and (out / "roc.png").is_file() and (out / "discriminator.safetensors").is_file()
    r = runner.invoke(app, ["train-discriminator", "--data", str(data), "--out", str(out), "--epochs", "3",
                            "--batch", "4", "--holdout", "0.3", "--good-edits", "--corruptions", "1", "--resume"])
    assert r.exit_code == 0 and "resumed at epoch 2" in r.output
    # fine-tune that discriminator with a moving average; a missing --init folder is one clear line
    r = runner.invoke(app, ["train-discriminator", "--data", str(data), "--out", str(tmp_path / "ft"), "--epochs",
                            "1", "--batch", "4", "--holdout", "0.3", "--init", str(out), "--ema", "0.9"])
    assert r.exit_code == 0 and f"starting from {out}" in r.output, r.output
    assert read_config(tmp_path / "ft").notes["ema"] == 0.9
    r = runner.invoke(app, ["train-discriminator", "--data", str(data), "--out", str(tmp_path / "ft2"), "--init",
                            str(tmp_path / "nowhere")])
    assert r.exit_code != 0 and "Traceback" not in r.output and "nowhere" in r.output, r.output
    r = runner.invoke(app, ["discriminator", "info", str(out)])
    assert r.exit_code == 0 and "threshold" in r.output
    # eval: on the examples it was trained with, or (--paper-split) on real / round-trip vs low-fidelity only
    n_scored = lambda output: int(next(x for x in output.splitlines() if x.startswith("| 0-250")).split("|")[2])
    r = runner.invoke(app, ["discriminator", "eval", str(out), "--data", str(data), "--draws", "1"])
    r2 = runner.invoke(app, ["discriminator", "eval", str(out), "--data", str(data), "--draws", "1", "--paper-split"])
    assert r.exit_code == 0 and r2.exit_code == 0, r.output + r2.output
    assert 0 < n_scored(r2.output) < n_scored(r.output)  # no good edits and no corruptions in the paper's split
    # recommended quality guidance for moves only; a typo is one clear line and changes nothing
    r = runner.invoke(app, ["discriminator", "set", str(out), "--w-quality", "10", "--quality-motions", "translate"])
    assert r.exit_code == 0, r.output
    cfg = read_config(out)
    assert cfg.w_quality == 10 and cfg.quality_motions == ["translate"]
    r = runner.invoke(app, ["discriminator", "set", str(out), "--quality-motions", "translate,sclae"])
    assert r.exit_code == 2 and "sclae" in r.output and "Traceback" not in r.output
    assert read_config(out).quality_motions == ["translate"]
    # against the wrong base: exit code 2 and one clear line, no traceback
    r = runner.invoke(app, ["discriminator", "eval", str(out), "--data", str(data), "--base", str(tiny_model_dir)])
    assert r.exit_code == 2 and "trained for base" in r.output and "Traceback" not in r.output


def test_agent_critic_uses_the_stored_threshold_and_sampler_gets_the_quality_term(tiny_model_dir, tmp_path,
                                                                                   monkeypatch):
    import luciddrag.agent.nodes as nodes
    from luciddrag.agent.context import AgentContext
    from luciddrag.agent.graph import build_graph
    from luciddrag.agent.tools import get_editor, quality_terms_for
    from luciddrag.evals.shapesworld.world import render_scene

    sc = render_scene(5, n_shapes=1)
    cx, cy = sc.shapes[0].centroid
    pts = [(cx, cy), (min(cx + 12, 60), cy)]
    monkeypatch.setattr(nodes, "score_drag", lambda ctx, o, e, d, prompt="": {
        "tracked": [p.target for p in d.pairs], "md_px": 1.0, "md_fraction": 0.05})  # the drag always arrives
    ctx = AgentContext(model=str(tiny_model_dir), device="cpu", steps=3, max_attempts=1, locator="offline",
                       reasoner="offline", artifacts_dir=str(tmp_path / "art"), discriminator=str(tmp_path / "d"),
                       w_quality=2.0, quality_steps=1)
    disc = build_discriminator(get_editor(ctx).c)
    disc.config.threshold = 1.0  # P(real) < 1 always: every result is rejected for fidelity
    save_discriminator(disc, tmp_path / "d")
    out = build_graph().invoke({"image": sc.image, "points": pts}, context=ctx)
    att = out["attempts"][0]
    assert out["accepted"] is False and "fidelity" in att.reason and 0 < att.quality < 1
    assert "handle" not in att.reason  # a rejection names only the check that failed
    ctx.min_quality = 0.0  # an explicit minimum overrides the stored threshold
    out = build_graph().invoke({"image": sc.image, "points": pts}, context=ctx)
    assert out["accepted"] is True
    # an acceptance says what both checks measured
    assert out["chosen"].reason == (f"handle landed 1.0 px from target (5% of the drag <= "
                                    f"{ctx.accept_md_fraction:.0%}); fidelity {out['chosen'].quality:.2f} >= 0.00")
    assert read_config(tmp_path / "d").threshold == 1.0
    terms = quality_terms_for(ctx, get_editor(ctx))
    assert len(terms) == 1 and terms[0].weight == 2.0 and terms[0].steps == 1
    # per kind of drag: the discriminator's recommendation, unless the context names the kinds
    disc.config.quality_motions = ["translate"]
    save_discriminator(disc, tmp_path / "d")
    assert len(quality_terms_for(ctx, get_editor(ctx), "translate")) == 1
    from luciddrag.engine.discriminator import _cache  # the rewritten files replaced the cached copy, not added to it
    assert len([k for k in _cache if k[0] == str((tmp_path / "d").resolve())]) == 1
    assert quality_terms_for(ctx, get_editor(ctx), "scale") == []
    assert quality_terms_for(ctx, get_editor(ctx), "patch") == []
    ctx.quality_motions = ("scale",)
    assert quality_terms_for(ctx, get_editor(ctx), "translate") == []
    assert len(quality_terms_for(ctx, get_editor(ctx), "scale")) == 1
    ctx.w_quality = 0.0
    assert quality_terms_for(ctx, get_editor(ctx)) == []


def test_aesthetic_scorer_loads_laion_layout(tmp_path):
    """The LAION predictor's loader on a tiny random CLIP and random MLP weights in LAION's key layout."""
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from luciddrag.engine.training.data import AestheticScorer, SourceItem

    with pytest.raises(ModelLoadError, match="aesthetic MLP weights not found"):
        AestheticScorer(tmp_path / "missing.safetensors", clip=str(tmp_path))
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=768)
    CLIPVisionModelWithProjection(cfg).save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "clip")
    dims = [(1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)]
    state = {}
    for idx, (o, i) in zip((0, 2, 4, 6, 7), dims):
        state[f"layers.{idx}.weight"], state[f"layers.{idx}.bias"] = torch.randn(o, i) * 0.05, torch.randn(o) * 0.05
    save_file(state, str(tmp_path / "mlp.safetensors"))
    sc = AestheticScorer(tmp_path / "mlp.safetensors", clip=str(tmp_path / "clip"))
    im = Image.new("RGB", (40, 40), (10, 200, 30))
    s, _ = sc.score(SourceItem(key="a", image=im, caption=""), im)
    # by hand: normalised projection through the five linear layers (dropout off in eval)
    with torch.no_grad():
        px = sc.processor(images=im, return_tensors="pt").pixel_values
        x = sc.clip(pixel_values=px).image_embeds
        x = x / x.norm(dim=-1, keepdim=True)
        for idx in (0, 2, 4, 6, 7):
            x = x @ state[f"layers.{idx}.weight"].T + state[f"layers.{idx}.bias"]
    assert s == pytest.approx(float(x[0, 0]), abs=1e-5) and sc.threshold == 5.0


def test_broken_edits_of_a_given_result_damage_it_near_the_edit_only():
    """The critic set's 'engine' mode breaks the engine's own result: every kind changes that image, only in the
    edited neighbourhood, the same way for the same seed."""
    from luciddrag.evals.shapesworld import world
    from luciddrag.evals.shapesworld.discriminator_data import BREAKS, broken_edit, good_edit
    from luciddrag.evals.shapesworld.tasks import generate_tasks

    task = generate_tasks("move", 1, 123_456)[0]
    # stand-in for an engine result: the ideal edit with a slightly different background
    base_arr = np.clip(np.asarray(good_edit(task), np.int16) + 3, 0, 255).astype(np.uint8)
    base = Image.fromarray(base_arr)
    near = world.dilate(task.source_mask() | task.target_mask(), 14)
    for kind in BREAKS:
        out = np.asarray(broken_edit(task, kind, np.random.default_rng(5), base=base), np.int16)
        diff = np.abs(out - base_arr).sum(-1)
        assert diff.sum() > 0, kind
        assert diff[~near].max() == 0, kind
        again = np.asarray(broken_edit(task, kind, np.random.default_rng(5), base=base), np.int16)
        assert np.array_equal(out, again), kind
    # without a base the ideal render is damaged, as before
    plain = np.asarray(broken_edit(task, "noise", np.random.default_rng(5)), np.int16)
    assert not np.array_equal(plain, np.asarray(broken_edit(task, "noise", np.random.default_rng(5), base=base),
                                                np.int16))


def test_shipped_shapesworld_discriminator_matches_the_shipped_base():
    """The committed discriminator loads against the committed ShapesWorld model (same frozen weights), and its
    config carries the numbers its training record measured."""
    from luciddrag.engine.loading import load_components
    from luciddrag.evals.shapesworld import MODEL_DIR

    folder = MODEL_DIR.parent / "discriminator"
    comps = load_components(str(MODEL_DIR), device="cpu")
    disc = load_discriminator(folder, comps, use_cache=False)
    record = json.loads((folder / "training_record.json").read_text())
    assert disc.config.notes["heldout_auc"] == {k: round(v["auc"], 4) for k, v in record["heldout"].items()}
    assert 0.0 < disc.config.threshold < 1.0 and disc.config.pooling == record["config"]["pooling"]
    z = torch.zeros(1, 4, 16, 16)
    assert torch.isfinite(disc.model(z, 100, encode_prompts(comps, ["a big red circle"]))).all()

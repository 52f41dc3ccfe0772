"""The web app through its API (gradio_client against the app served on 127.0.0.1), plus its pure helpers.

The same handlers serve the page and the API, so these cover what a click does (set_points is the API twin of clicking
on the image) without a browser; tests/test_web_browser.py drives the page itself in chromium.
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from PIL import Image

from luciddrag.agent.web.session import (InputError, WebSettings, display_size, points_from_text, render_canvas, to_display_px,
                               to_image_px)
from luciddrag.evals.shapesworld.world import render_scene
from tests.web_server import running_app


# -- pure helpers -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, shown", [((64, 64), (384, 384)), ((64, 96), (384, 576)), ((512, 512), (512, 512)),
                                         ((2000, 1000), (768, 384))])
def test_display_size(size, shown):
    assert display_size(size) == shown


def test_clicks_map_back_to_the_pixel_under_them():
    for size in [(64, 64), (64, 96), (2000, 1000), (451, 300)]:
        shown = display_size(size)
        for p in [(0, 0), (size[0] - 1, size[1] - 1), (size[0] // 3, size[1] // 2)]:
            dx, dy = to_display_px(p, size, shown)
            assert to_image_px((dx + 0.49, dy + 0.49), size, shown) == p  # a click anywhere on the pixel's centre
    assert to_image_px((-5, 10_000), (64, 64), (384, 384)) == (0, 63)  # clamped to the image


def test_points_text_and_settings_errors():
    assert points_from_text("[[1, 2], [3.4, 4]]") == [(1, 2), (3, 4)]
    assert points_from_text("drag 1,2 to 3,4") == [(1, 2), (3, 4)]
    with pytest.raises(InputError, match="steps"):
        WebSettings.parse(model="m", steps=1)
    assert WebSettings.parse(model="m", steps="7.0", seed="", llm_base_url=" ").steps == 7


def test_settings_start_from_the_models_recommendations(tmp_path):
    from luciddrag.agent.context import model_defaults
    from luciddrag.agent.web.app import default_settings
    from luciddrag.evals.shapesworld import MODEL_DIR

    rec = model_defaults(str(MODEL_DIR))
    s = default_settings()
    if "guidance_scale" in rec:
        assert s.guidance_scale == rec["guidance_scale"]
    if "guidance" in rec:
        assert s.w_edit == rec["guidance"].w_edit
    ctx = s.context(tmp_path)
    assert ctx.reasoner == "offline" and ctx.locator == "offline"  # works with no key and no download
    for key in ("critic_timestep", "accept_md_fraction"):
        if key in rec:
            assert getattr(ctx, key) == rec[key]
    assert default_settings(guidance_scale=7.5).context(tmp_path).guidance_scale == 7.5  # what the panel says wins


def test_canvas_draws_pairs_and_dims_outside_the_mask():
    sc = render_scene(7, n_shapes=1)
    plain = np.asarray(render_canvas(sc.image, []), dtype=float)
    mask = np.zeros((64, 64), bool)
    mask[:, :32] = True
    dimmed = np.asarray(render_canvas(sc.image, [], mask), dtype=float)
    assert np.allclose(dimmed[:, :192], plain[:, :192]) and dimmed[:, 192:].mean() < 0.6 * plain[:, 192:].mean()
    drawn = np.asarray(render_canvas(sc.image, [(10, 10), (40, 10), (20, 50)]), dtype=float)
    assert np.abs(drawn - plain).sum(axis=2)[40:90, 40:270].max() > 100  # pair 1's dot, arrow, ring
    assert np.abs(drawn - plain).sum(axis=2)[290:330, 110:140].max() > 100  # the lone handle of pair 2


def test_cli_mounts_web_command():
    from typer.testing import CliRunner

    from luciddrag.agent.cli import app

    out = CliRunner().invoke(app, ["web", "--help"])
    assert out.exit_code == 0 and "--port" in out.output and "127.0.0.1" in out.output


# -- the served app -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_app(tmp_path_factory.mktemp("web")) as (url, app):
        yield url, app


@pytest.fixture()
def scene_file(tmp_path):
    sc = render_scene(7, n_shapes=1)
    path = tmp_path / "scene.png"
    sc.image.save(path)
    cx, cy = (round(v) for v in sc.shapes[0].centroid)
    return sc, path, [(cx, cy), (cx + 14 if cx < 32 else cx - 14, cy)]


def _client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def _load(client, path):
    from gradio_client import handle_file

    return client.predict(handle_file(str(path)), api_name="/load_image")


def _gallery(value) -> list[dict]:
    return value["value"] if isinstance(value, dict) else value


def _small(path, size=(64, 64)) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB").resize(size, Image.Resampling.NEAREST), dtype=float)


def _texts(chat) -> list[str]:
    out = []
    for m in chat:
        c = m["content"]
        out.append(" ".join(p.get("text", "") for p in c) if isinstance(c, list) else str(c))
    return out


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_points_in_result_out_then_chat_undo(server, scene_file):
    url, app = server
    sc, path, pts = scene_file
    c = _client(url)
    canvas, points, *_ = _load(c, path)
    assert "64×64" in points and Image.open(canvas).size == (384, 384)
    canvas, points, _ = c.predict(json.dumps(pts), api_name="/set_points")
    assert f"({pts[0][0]}, {pts[0][1]}) → ({pts[1][0]}, {pts[1][1]})" in points
    gallery, result, download, status, chat = c.predict("", api_name="/edit")
    items = _gallery(gallery)
    assert items and all(it["caption"].startswith(f"{n}. ") for n, it in enumerate(items, 1))
    assert "px from its target" in status
    assert np.abs(_small(result) - np.asarray(sc.image, dtype=float)).mean() > 1.0  # it edited something
    dl = download["value"] if isinstance(download, dict) else download
    assert Image.open(dl).size == (64, 64)  # the download is at the image's own resolution
    assert any("(image panel)" in t for t in _texts(chat))
    # the chat is bound to the same session: it can undo the edit made with the mouse
    gallery, result, download, status, chat, canvas, points, *_ = c.predict("undo", api_name="/chat")
    assert "Undone" in _texts(chat)[-1]
    assert np.array_equal(_small(canvas), np.asarray(sc.image, dtype=float))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bad_inputs_show_the_error_and_the_app_keeps_serving(server, scene_file):
    from gradio_client.exceptions import AppError

    url, _ = server
    sc, path, pts = scene_file
    c = _client(url)
    with pytest.raises(AppError, match="upload an image or pick an example"):
        c.predict("", api_name="/edit")
    _load(c, path)
    with pytest.raises(AppError, match=r"outside the 64x64 image"):
        c.predict("[[10, 10], [100, 10]]", api_name="/set_points")
    c.predict(json.dumps(pts[:1]), api_name="/set_points")
    with pytest.raises(AppError, match="has a handle but no target"):
        c.predict("", api_name="/edit")
    c.predict(json.dumps(pts), api_name="/set_points")
    with pytest.raises(AppError, match="nonexistent"):
        c.predict("", model="/nonexistent/model", api_name="/edit")  # a ModelLoadError from the engine
    with pytest.raises(AppError, match="minimum value 2"):
        c.predict("", steps=1, api_name="/edit")  # the form's own bounds
    # the same session still works (Reason: the whole agent up to its choice, without the sampler's cost)
    intent, status = c.predict("", api_name="/reason")
    assert len(intent["choices"]) == 3 and "Intentions" in status


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_reason_then_pick_an_intention(server, scene_file):
    url, _ = server
    _, path, pts = scene_file
    c = _client(url)
    _load(c, path)
    c.predict(json.dumps(pts), api_name="/set_points")
    intent, status = c.predict("", api_name="/reason")
    choices = intent["choices"]
    assert choices[0][1] == "auto" and len(choices) == 3  # Auto + K=2 intentions, with confidences
    assert "%" in choices[1][0] and "Intentions" in status
    label, value = choices[2]
    gallery, *_ = c.predict("", value, api_name="/edit")
    wanted = label.split(". ", 1)[1].rsplit(" — ", 1)[0]
    assert wanted in _gallery(gallery)[0]["caption"]
    # Edit again with the same drag and pick: the reasoned intention is used directly, not re-drawn
    gallery, _, _, status, _ = c.predict("", value, api_name="/edit")
    assert wanted in _gallery(gallery)[0]["caption"] and "reasoned again" not in status


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_chat_offline_grammar_options_then_choice(server, scene_file):
    url, _ = server
    sc, path, pts = scene_file
    c = _client(url)
    _load(c, path)
    (hx, hy), (tx, ty) = pts
    out = c.predict(f"show me the options for {hx},{hy} to {tx},{ty}", api_name="/chat")
    chat = _texts(out[4])
    assert "Which one did you mean?" in chat[-1] and "2)" in chat[-1]
    option2 = chat[-1].split("2) ", 1)[1].rsplit(" (", 1)[0]
    gallery, result, download, status, chat, canvas, points, *_ = c.predict("2", api_name="/chat")
    assert option2 in _gallery(gallery)[0]["caption"]
    texts = _texts(chat)
    assert "Which one did you mean?" in texts[-3] and texts[-2] == "2"  # question, answer, reply: in order
    assert f"({hx}, {hy}) → ({tx}, {ty})" in points  # the panel shows the chat's drag
    assert Image.open(result).size == (384, 384)


@pytest.mark.timeout(60)
def test_sessions_are_isolated(server, scene_file):
    from gradio_client.exceptions import AppError

    url, _ = server
    _, path, _ = scene_file
    a, b = _client(url), _client(url)
    _load(a, path)
    out = b.predict("undo", api_name="/chat")
    texts = _texts(out[4])
    assert texts[-1] == "Nothing to undo." and not any("uploaded" in t for t in texts)
    with pytest.raises(AppError, match="load an image first"):
        b.predict("[[1, 1], [5, 5]]", api_name="/set_points")


@pytest.mark.timeout(60)
def test_api_key_is_never_sent_to_the_page(tmp_path):
    secret = "sk-test-DO-NOT-ECHO-123"
    with running_app(tmp_path / "web", llm_api_key=secret, llm_base_url="http://127.0.0.1:9/v1") as (url, _):
        page = httpx.get(url, timeout=30).text
        config = httpx.get(url + "config", timeout=30).text
        assert "LucidDrag" in config and "http://127.0.0.1:9/v1" in config  # the endpoint is shown, the key is not
        assert secret not in page and secret not in config
        assert json.loads(config)["analytics_enabled"] is False  # no usage reports to third parties


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_edit_reports_every_step_and_streams_attempts(server, scene_file):
    """The Edit handler itself: per-step progress (inversion and sampling) and the gallery updated while it runs."""
    from luciddrag.agent.web.session import Session

    _, app = server
    sc, _, pts = scene_file
    sess = Session.new(app.root)
    app._load(sess, sc.image, None, "test image")
    sess.points = list(pts)
    calls = []

    def progress(value, desc=None, unit=None, **_):
        calls.append((value, desc))

    settings = tuple(app.defaults.model_dump().get(k) for k in app_settings_fields())
    updates = list(app.on_edit(sess, "", "auto", *settings, progress=progress))
    steps = [v for v, _ in calls if isinstance(v, tuple)]
    total = app.defaults.steps
    assert [s for s in steps if s[1] == total][:total] == [(k, total) for k in range(1, total + 1)]  # inversion
    assert len(steps) >= 2 * total and any("sampling" in (d or "") for _, d in calls)
    galleries = [u[app.c["gallery"]] for u in updates if app.c["gallery"] in u]
    assert len(galleries) >= 3  # cleared, then each attempt as it is sampled and judged, then the final labels
    final = updates[-1]
    assert app.c["result"] in final and sess.result_path.exists()
    app.drop_session(sess)  # what a closed tab triggers
    assert not sess.dir.exists() and not app._chat_values(sess)


def app_settings_fields():
    from luciddrag.agent.web.app import SETTINGS_FIELDS

    return SETTINGS_FIELDS

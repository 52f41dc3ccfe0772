"""A real browser on the web app: Debian's chromium driven by Playwright, on the shipped ShapesWorld model.

Pick an example, click a handle and a target on the image, press Edit, and check that a result appears and differs from
the input. A screenshot is kept as a test artifact (and, with LUCIDDRAG_UPDATE_DOCS=1, copied to docs/web-app.png).
There is no skip: CI installs chromium (.ci/run); if it is missing this test fails and says how to install it.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.web_server import running_app

CHROMIUM = os.environ.get("LUCIDDRAG_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic", "--disable-dev-shm-usage"]
DOCS_SHOT = Path(__file__).resolve().parents[1] / "docs" / "web-app.png"
DOCS = os.environ.get("LUCIDDRAG_UPDATE_DOCS") == "1"  # regenerate the README screenshot at the app's real defaults
ARTIFACTS = Path(os.environ.get("LUCIDDRAG_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


def _click_pixel(page, selector: str, px: tuple[int, int], image_size: tuple[int, int]) -> None:
    """Click the centre of image pixel `px` of the <img> under `selector`, wherever and however big it is drawn."""
    box = page.eval_on_selector(selector, """img => { const r = img.getBoundingClientRect();
        return {x: r.x, y: r.y, w: r.width, h: r.height, nw: img.naturalWidth, nh: img.naturalHeight}; }""")
    scale = min(box["w"] / box["nw"], box["h"] / box["nh"])  # object-fit: contain
    ox = box["x"] + (box["w"] - box["nw"] * scale) / 2
    oy = box["y"] + (box["h"] - box["nh"] * scale) / 2
    f = box["nw"] / image_size[0]  # display pixels per image pixel
    page.mouse.click(ox + (px[0] + 0.5) * f * scale, oy + (px[1] + 0.5) * f * scale)


@pytest.mark.slow
@pytest.mark.timeout(900 if DOCS else 240)
def test_click_to_drag_in_chromium(tmp_path):
    assert Path(CHROMIUM).exists(), (
        f"{CHROMIUM} not found: the browser test needs Debian's chromium (apt-get install -y chromium; .ci/run does "
        "this) or LUCIDDRAG_CHROMIUM pointing at a Chromium binary")
    from playwright.sync_api import expect, sync_playwright

    from luciddrag.agent.web.examples import SHAPES_SCENES
    from luciddrag.evals.shapesworld.world import render_scene

    seed, n = SHAPES_SCENES[0]
    scene = render_scene(seed, n_shapes=n)
    cx, cy = (round(v) for v in scene.shapes[0].centroid)
    target = (cx + 14 if cx < 32 else cx - 14, cy)

    settings = dict(steps=50, k=3, max_attempts=2, critic_ensemble=4) if DOCS else {}
    with running_app(tmp_path / "web", **settings) as (url, _app), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1250})
            page.goto(url)
            page.locator("#ld-examples button.thumbnail-item").first.click()
            canvas = "#ld-canvas img"
            page.wait_for_selector(canvas)
            points = page.locator("#ld-points")
            expect(points).to_contain_text("handle of drag 1", timeout=20_000)

            # an error is shown in the page, and the session carries on
            page.locator("#ld-edit").click()
            expect(page.get_by_text("no drag yet").first).to_be_visible(timeout=20_000)

            # editable region: paint the lower half of the picture (the shape and its target are there)
            page.get_by_text("Editable region (optional)").click()
            page.locator("#ld-mask canvas").first.wait_for(state="visible")
            page.wait_for_timeout(1000)  # the editor lays out its image after it becomes visible
            box = page.locator("#ld-mask canvas").first.bounding_box()
            mid_x, mid_y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
            # few, short mouse moves: every one re-renders the editor in software GL (slow in headless chromium)
            for row in range(4):  # strokes must start on the picture (it is centred, ~300 px wide)
                y = mid_y + 10 + row * 27  # overlapping bands from the middle down past the circle
                page.mouse.move(mid_x - 110, y)
                page.mouse.down()
                page.mouse.move(mid_x + 110, y, steps=3)
                page.mouse.up()
            page.wait_for_timeout(800)  # the strokes reach the component's value asynchronously
            page.get_by_role("button", name="Use region").click()
            expect(points).to_contain_text("editable region set", timeout=20_000)
            page.get_by_text("Editable region (optional)").click()  # fold it away again

            _click_pixel(page, canvas, (cx, cy), scene.image.size)
            expect(points).to_contain_text("target of drag 1", timeout=20_000)
            _click_pixel(page, canvas, target, scene.image.size)
            expect(points).to_contain_text(f"({cx}, {cy}) → ({target[0]}, {target[1]})", timeout=20_000)
            shown_input = Image.open(io.BytesIO(page.request.get(page.get_attribute(canvas, "src")).body()))

            # Reason: the intentions appear as choices; pick the first one
            page.locator("#ld-reason").click()
            options = page.locator("#ld-intent label")
            expect(options).to_have_count(1 + settings.get("k", 2), timeout=60_000)
            options.nth(1).click()
            page.locator("#ld-edit").click()
            result = page.locator("#ld-result img")
            expect(result).to_be_visible(timeout=180_000)
            expect(page.locator("#ld-attempts button.thumbnail-item").first).to_be_visible(timeout=30_000)
            expect(page.locator("#ld-status")).to_contain_text("px from its target", timeout=30_000)
            body = page.request.get(result.get_attribute("src")).body()
            shot = tmp_path / "web-app.png"
            page.screenshot(path=str(shot), full_page=True)

            # the chat is the same session: it knows about the edit just made
            page.locator("#ld-chat-in textarea").fill("undo")
            page.locator("#ld-chat-in textarea").press("Enter")
            expect(page.locator("#ld-chat")).to_contain_text("Undone", timeout=30_000)
        finally:
            browser.close()

    # outside the painted region the input is shown dimmed
    shown_input = np.asarray(shown_input.convert("RGB"), dtype=float)
    assert shown_input[:150].mean() < 0.7 * shown_input[-100:].mean() or shown_input[:150].mean() < 120
    shown = Image.open(io.BytesIO(body)).convert("RGB")
    assert shown.size[0] >= scene.image.size[0] * 4  # enlarged for display
    edited = shown.resize(scene.image.size, Image.Resampling.NEAREST)
    diff = np.abs(np.asarray(edited, dtype=float) - np.asarray(scene.image, dtype=float)).mean()
    assert diff > 1.0, f"result looks identical to the input (mean abs diff {diff:.2f})"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "web-app.png")
    if DOCS:
        shutil.copy(shot, DOCS_SHOT)

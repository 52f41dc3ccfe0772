"""The locator: offline (ShapesWorld exact, generic elsewhere), Florence-2's pure parts, the Osprey HTTP client
against a local server implementing docs/osprey-server.md, drawing, and the factory's choices."""

from __future__ import annotations

import base64
import io
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from luciddrag.engine.errors import InputError, ModelLoadError
from luciddrag.evals.shapesworld.world import render_scene
from tests.openai_server import Answer, RecordedRequest, ScriptedHTTPServer
from luciddrag.tools.drawing import PALETTE, crop_window, draw_drags, pair_colour, zoomed_crop
from luciddrag.tools.locator import (
    Florence2Locator,
    LocatorConfig,
    OfflineLocator,
    OpenAIVisionLocator,
    OspreyError,
    OspreyHttpLocator,
    SamLocator,
    backoff_delay,
    box_around,
    clean_description,
    describe_image,
    florence_region_prompt,
    locate,
    make_locator,
    parse_florence_output,
    parse_numbered_lines,
    quantize_box,
)
from luciddrag.tools.schemas import DragPoints, mask_box, mask_to_rle, rle_to_mask


@pytest.fixture(autouse=True)
def _no_llm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_API_BASE", "LUCIDDRAG_OSPREY_URL"):
        monkeypatch.delenv(var, raising=False)


def photo_like(width: int = 128, height: int = 96, seed: int = 0) -> Image.Image:
    """A textured, many-coloured picture that is not a ShapesWorld scene (no local photos ship with the deps)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 2.0, yy * 2.5, (xx + yy) * 1.2], axis=-1) % 255
    noise = rng.normal(0, 25, size=(height, width, 3))
    arr = np.clip(base + noise, 0, 255).astype(np.uint8)
    arr[30:70, 40:100] = (90, 140, 60)  # a flat green block to grow into
    return Image.fromarray(arr)


# ------------------------------------------------------------------------------------------------ offline


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 7])
def test_offline_names_every_shapesworld_shape_exactly(seed: int) -> None:
    scene = render_scene(seed)
    drags = DragPoints.from_pairs([(s.centroid, (s.centroid[0], max(0.0, s.centroid[1] - 5))) for s in scene.shapes])
    result = OfflineLocator().locate(scene.image, drags)
    assert result.backend == "offline:shapesworld"
    for shape, desc in zip(scene.shapes, result.descriptions):
        assert desc.description == "the " + shape.description().removeprefix("a ")
        assert desc.attributes["shape"] == shape.shape and desc.attributes["colour"] == shape.colour
        assert desc.attributes["size"] == shape.size_word and desc.attributes["position"] == shape.position
        assert desc.region is not None and desc.region.source == "segmentation"
        assert desc.region.box == mask_box(shape.mask)
        assert np.array_equal(rle_to_mask(desc.region.mask_rle, 64, 64), shape.mask)
    # The rebuilt caption holds the same shape descriptions as the scene's own caption.
    assert sorted(result.caption.split(" and ")) == sorted(scene.caption.split(" and "))


def test_offline_handle_just_outside_an_edge_still_names_the_shape() -> None:
    scene = render_scene(1)
    shape = scene.shapes[0]
    ys, xs = np.nonzero(shape.mask)
    right = int(xs.max())
    row = int(round(shape.centroid[1]))
    edge_x = int(xs[ys == row].max())
    assert edge_x == right or edge_x <= right
    result = OfflineLocator().locate(scene.image, DragPoints.from_flat([[edge_x + 1, row], [edge_x + 6, row]]))
    assert result.descriptions[0].attributes.get("shape") == shape.shape


def test_offline_background_and_generic_images() -> None:
    scene = render_scene(1)
    occupied = np.any([s.mask for s in scene.shapes], axis=0)
    ys, xs = np.nonzero(~occupied)
    far = max(zip(xs, ys), key=lambda p: min(np.hypot(*(np.array(p) - np.array(s.centroid))) for s in scene.shapes))
    bg = OfflineLocator().locate(scene.image, DragPoints.from_flat([list(far), list(far)]))
    assert bg.descriptions[0].description.startswith("the empty background ")
    assert bg.descriptions[0].region is None

    photo = photo_like()
    result = OfflineLocator().locate(photo, DragPoints.from_flat([[60, 50], [100, 20]]))
    assert result.backend == "offline" and result.caption is None
    desc = result.descriptions[0]
    assert desc.description == "the region around (60, 50)"
    # No world recognises it and there is no segmenter: no object region (not even over the flat green block the
    # handle sits on), so the agent can only make a patch drag there.
    assert desc.region is None and desc.attributes == {}


def test_points_outside_the_image_and_bad_masks_are_input_errors() -> None:
    img = Image.new("RGB", (64, 48), "white")
    with pytest.raises(InputError, match="outside the 64x48 image"):
        locate(img, DragPoints.from_flat([[70, 10], [20, 20]]))
    with pytest.raises(InputError, match="outside"):
        locate(img, DragPoints.from_flat([[10, 10], [20, 48.6]]))
    with pytest.raises(InputError, match="mask is 10x10"):
        locate(img, DragPoints.from_flat([[10, 10], [20, 20]]), mask=np.ones((10, 10), bool))
    with pytest.raises(InputError, match="cannot read mask"):
        locate(img, DragPoints.from_flat([[10, 10], [20, 20]]), mask="/nonexistent/mask.png")
    with pytest.raises(InputError, match="alternate"):
        DragPoints.from_flat([[1, 2], [3, 4], [5, 6]])


def test_mask_from_a_file_is_accepted(tmp_path: Any) -> None:
    mask = np.zeros((48, 64), np.uint8)
    mask[:, :32] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    result = locate(photo_like(64, 48), DragPoints.from_flat([[10, 10], [20, 20]]), mask=tmp_path / "mask.png",
                    config=LocatorConfig(backend="offline"))
    assert result.descriptions[0].description == "the region around (10, 10)"


def test_auto_without_key_is_offline_with_a_one_line_notice() -> None:
    scene = render_scene(2)
    result = locate(scene.image, DragPoints.from_flat([list(scene.shapes[0].centroid), [1, 1]]))
    assert result.backend == "offline:shapesworld"
    assert len(result.warnings) == 1 and "OPENAI_API_KEY" in result.warnings[0] and "\n" not in result.warnings[0]


def test_factory_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(make_locator(LocatorConfig(backend="offline"))[0], OfflineLocator)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    loc, notices = make_locator(LocatorConfig())
    assert isinstance(loc, OpenAIVisionLocator) and notices == []
    with pytest.raises(InputError, match="LUCIDDRAG_OSPREY_URL"):
        make_locator(LocatorConfig(backend="osprey"))
    monkeypatch.setenv("LUCIDDRAG_OSPREY_URL", "http://127.0.0.1:9")
    assert isinstance(make_locator(LocatorConfig(backend="osprey"))[0], OspreyHttpLocator)
    monkeypatch.delenv("OPENAI_BASE_URL")
    with pytest.raises(InputError, match="OPENAI_API_KEY"):
        make_locator(LocatorConfig(backend="openai"))
    # Heavy backends are built once per configuration (weights load lazily, on first use).
    florence = make_locator(LocatorConfig(backend="florence2", use_sam=True))[0]
    assert isinstance(florence, Florence2Locator) and florence.sam is not None and florence._model is None
    assert make_locator(LocatorConfig(backend="florence2", use_sam=True))[0] is florence
    assert make_locator(LocatorConfig(backend="florence2"))[0] is not florence


def test_describe_image_order_of_sources() -> None:
    scene = render_scene(3)
    assert describe_image(scene.image, "my caption") == ("my caption", "user")
    text, source = describe_image(scene.image, None, config=LocatorConfig(backend="offline"))
    assert source.startswith("offline") and sorted(text.split(" and ")) == sorted(scene.caption.split(" and "))
    assert describe_image(photo_like(), None, config=LocatorConfig(backend="offline")) == ("an image", "default")


# ------------------------------------------------------------------------------------------------ text parsing


@pytest.mark.parametrize("raw, expected", [
    ("The nose of a woman.", "the nose of a woman"),
    ("  \"human face\" ", "the human face"),
    ("a red circle", "a red circle"),
    ("It is a dog's ear.", "a dog's ear"),
    ("TV screen", "the TV screen"),
    ("</s><s>car wheel<loc_1><loc_2></s>", "the car wheel"),
    ("   .  ", ""),
])
def test_clean_description(raw: str, expected: str) -> None:
    assert clean_description(raw) == expected


def test_parse_numbered_lines() -> None:
    text = "Here you go:\n1: The nose of a woman.\n2) left ear\n- 3. the sky\n4: out of range\n1: repeated"
    assert parse_numbered_lines(text, 3) == {1: "the nose of a woman", 2: "the left ear", 3: "the sky"}
    assert parse_numbered_lines("Handle 2: a wheel", 2) == {2: "a wheel"}
    assert parse_numbered_lines("the cat's tail", 1) == {1: "the cat's tail"}
    assert parse_numbered_lines("the cat's tail", 2) == {}


# ------------------------------------------------------------------------------------------------ Florence-2


@pytest.mark.parametrize("box, size", [((0, 0, 64, 64), (64, 64)), ((10.3, 20.7, 30.2, 41.9), (64, 48)),
                                       ((100, 50, 412, 300), (512, 384)), ((-5, -5, 700, 700), (640, 480)),
                                       ((8, 4, 40, 30), (80, 40))])
def test_quantize_box_matches_transformers_florence_quantizer(box: tuple, size: tuple) -> None:
    from transformers.models.florence2.processing_florence2 import Florence2PostProcessor

    reference = Florence2PostProcessor.quantize(SimpleNamespace(quantize_bins=(1000, 1000)),
                                                torch.tensor([list(box)], dtype=torch.float64), size)
    assert quantize_box(box, *size) == tuple(int(v) for v in reference[0])


def test_florence_prompt_and_output_parsing() -> None:
    assert florence_region_prompt((0, 0, 32, 16), 64, 32) == "<REGION_TO_DESCRIPTION><loc_0><loc_0><loc_500><loc_500>"
    assert florence_region_prompt((8, 4, 40, 30), 80, 40) == "<REGION_TO_DESCRIPTION><loc_100><loc_100><loc_500><loc_750>"
    assert parse_florence_output("</s><s>human face<loc_120><loc_33><loc_500><loc_600></s><pad><pad>") == "human face"
    assert parse_florence_output("<s>A cat sitting on a mat.</s>") == "A cat sitting on a mat."
    assert box_around((2, 2), 0.25, 64, 64) == (0, 0, 16, 16)  # shifted inside, not shrunk
    assert box_around((40, 30), 0.25, 64, 48) == (34, 24, 46, 36)


class _FakeFlorenceProcessor:
    """Records the prompts; 'generates' a canned decoded string the way Florence-2 prints it."""

    def __init__(self, answer: str) -> None:
        self.answer, self.prompts = answer, []

    def __call__(self, text: str, images: Image.Image, return_tensors: str) -> Any:
        self.prompts.append(text)

        class _Batch(dict):
            def to(self, device: str) -> _Batch:
                return self

        return _Batch(input_ids=torch.zeros(1, 3, dtype=torch.long), pixel_values=torch.zeros(1, 3, 8, 8))

    def batch_decode(self, ids: Any, skip_special_tokens: bool = False) -> list[str]:
        return [self.answer]


class _FakeFlorenceModel:
    dtype = torch.float32

    def generate(self, **kwargs: Any) -> torch.Tensor:
        assert kwargs["pixel_values"].dtype == torch.float32
        return torch.zeros(1, 4, dtype=torch.long)


def test_florence_locator_pipeline_with_injected_model() -> None:
    loc = Florence2Locator(box_fraction=0.25)
    loc._processor, loc._model = _FakeFlorenceProcessor("</s><s>human nose<loc_1><loc_2><loc_3><loc_4></s>"), _FakeFlorenceModel()
    img = Image.new("RGB", (64, 64), "white")
    result = loc.locate(img, DragPoints.from_flat([[32, 32], [40, 20]]))
    assert loc._processor.prompts == [florence_region_prompt((24, 24, 40, 40), 64, 64)]
    assert result.descriptions[0].description == "the human nose"
    assert result.descriptions[0].region.box == (24, 24, 40, 40) and result.descriptions[0].region.source == "window"

    class _Sam:
        def mask(self, image: Image.Image, point: tuple) -> np.ndarray:
            m = np.zeros((64, 64), bool)
            m[10:30, 20:50] = True
            return m

    loc.sam = _Sam()
    loc._processor.prompts.clear()
    result = loc.locate(img, DragPoints.from_flat([[32, 20], [40, 10]]))
    assert loc._processor.prompts == [florence_region_prompt((20, 10, 50, 30), 64, 64)]
    assert result.descriptions[0].region.source == "sam" and result.descriptions[0].region.area == 600


def test_florence_missing_weights_is_a_clear_model_load_error(tmp_path: Any) -> None:
    loc = Florence2Locator(str(tmp_path / "no-such-florence"), local_files_only=True)
    with pytest.raises(ModelLoadError) as err:
        loc.locate(Image.new("RGB", (32, 32)), DragPoints.from_flat([[5, 5], [9, 9]]))
    message = str(err.value)
    assert "no-such-florence" in message and "--locator offline" in message and "hf download" in message


# ------------------------------------------------------------------------------------------------ Osprey over HTTP


class FakeOsprey:
    """Implements docs/osprey-server.md: a 'model' that names the colour under each point, with a box 'mask'."""

    def __init__(self, failures: list[Answer] | None = None, box_override: list | None = None) -> None:
        self.failures = list(failures or [])
        self.box_override = box_override

    def __call__(self, request: RecordedRequest) -> Answer:
        if request.method == "GET" and request.path == "/v1/health":
            return Answer({"status": "ok", "model": "fake-osprey"})
        if request.path != "/v1/describe":
            return Answer({"error": "not found"}, 404)
        if self.failures:
            return self.failures.pop(0)
        body = request.body
        image = Image.open(io.BytesIO(base64.b64decode(body["image"]))).convert("RGB")
        if image.size != (body["width"], body["height"]):
            return Answer({"error": "width/height do not match the image"}, 400)
        arr = np.asarray(image)
        regions = []
        for region in body["regions"]:
            x, y = (int(round(v)) for v in region["point"])
            r, g, b = arr[y, x]
            colour = "red" if r > 150 and g < 100 else "white" if min(r, g, b) > 200 else "dark"
            mask = np.zeros(arr.shape[:2], bool)
            mask[max(0, y - 3):y + 4, max(0, x - 3):x + 4] = True
            answer: dict[str, Any] = {"id": region["id"], "description": f"A {colour} patch."}
            if self.box_override is not None:
                answer["box"] = self.box_override
            else:
                answer["mask"] = {"size": [arr.shape[0], arr.shape[1]], "counts": mask_to_rle(mask)}
            regions.append(answer)
        return Answer({"model": "fake-osprey", "regions": regions})


@pytest.fixture
def osprey_server() -> Any:
    servers: list[ScriptedHTTPServer] = []

    def start(handler: FakeOsprey) -> ScriptedHTTPServer:
        server = ScriptedHTTPServer(handler).start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


def _red_image() -> Image.Image:
    arr = np.full((48, 64, 3), 255, np.uint8)
    arr[10:30, 10:30] = (220, 30, 30)
    return Image.fromarray(arr)


def test_osprey_client_follows_the_contract(osprey_server: Any) -> None:
    server = osprey_server(FakeOsprey())
    client = OspreyHttpLocator(server.base, sleep=lambda s: None)
    assert client.health() == {"status": "ok", "model": "fake-osprey"}
    result = client.locate(_red_image(), DragPoints.from_flat([[20, 20], [40, 20], [50, 40], [60, 44]]))
    sent = [r for r in server.requests if r.path == "/v1/describe"][0].body
    assert sent["width"] == 64 and sent["height"] == 48 and sent["detail"] == "short"
    assert [r["point"] for r in sent["regions"]] == [[20.0, 20.0], [50.0, 40.0]]
    assert [d.description for d in result.descriptions] == ["a red patch", "a white patch"]
    assert result.descriptions[0].region.box == (17, 17, 24, 24) and result.descriptions[0].region.source == "server"
    assert result.descriptions[1].region.box == (47, 37, 54, 44)
    assert "fake-osprey" in result.backend and result.warnings == []


class SquareSegmenter:
    """A segmenter double with a known answer: the 20x20 red square for a handle on it, nothing elsewhere (the real
    SAM path is tested in tests/test_segmenter.py; this one checks what the locator does with the masks)."""

    name = "sam:square"

    def masks(self, image: Image.Image, handles: list[tuple[float, float]]) -> list[np.ndarray | None]:
        square = np.zeros((image.height, image.width), bool)
        square[10:30, 10:30] = True
        return [square if square[int(y), int(x)] else None for x, y in handles]


def test_osprey_under_sam_describes_the_sam_masks(osprey_server: Any) -> None:
    server = osprey_server(FakeOsprey())
    osprey = OspreyHttpLocator(server.base, sleep=lambda s: None)
    result = SamLocator(SquareSegmenter(), namer=osprey).locate(  # type: ignore[arg-type]
        _red_image(), DragPoints.from_flat([[20, 20], [40, 20], [50, 40], [60, 44]]))
    sent = [r for r in server.requests if r.path == "/v1/describe"][0].body["regions"]
    # The SAM mask travels in the request (Osprey describes a mask, as in the paper); no mask, no box: the point.
    assert sent[0]["box"] == [10, 10, 30, 30] and sent[0]["mask"]["size"] == [48, 64]
    assert rle_to_mask(sent[0]["mask"]["counts"], 48, 64)[10:30, 10:30].all()
    assert sent[1]["mask"] is None and sent[1]["box"] is None
    first, second = result.descriptions
    assert first.description == "a red patch" and first.region.source == "sam" and first.region.box == (10, 10, 30, 30)
    assert second.description == "a white patch" and second.region is None  # SAM found nothing: no server window
    assert result.backend.startswith("osprey:") and result.backend.endswith("+sam:square")


def test_osprey_retries_429_then_succeeds(osprey_server: Any) -> None:
    server = osprey_server(FakeOsprey(failures=[Answer({"error": "busy"}, 429, {"retry-after": "0"}),
                                                Answer({"error": "loading"}, 503)]))
    waits: list[float] = []
    client = OspreyHttpLocator(server.base, max_retries=3, sleep=waits.append)
    result = client.locate(_red_image(), DragPoints.from_flat([[20, 20], [40, 20]]))
    assert result.descriptions[0].description == "a red patch"
    assert len([r for r in server.requests if r.path == "/v1/describe"]) == 3
    assert waits == [0.0, 1.0]  # Retry-After honoured, then exponential backoff (0.5 * 2**1)


def test_osprey_failures_fall_back_to_offline_with_a_warning(osprey_server: Any) -> None:
    server = osprey_server(FakeOsprey(failures=[Answer({"error": "image too large"}, 400)]))
    client = OspreyHttpLocator(server.base, sleep=lambda s: None)
    with pytest.raises(OspreyError, match="image too large"):
        client.locate(_red_image(), DragPoints.from_flat([[20, 20], [40, 20]]))
    server.handler.failures = [Answer({"error": "down"}, 503)] * 3
    result = locate(_red_image(), DragPoints.from_flat([[20, 20], [40, 20]]),
                    locator=OspreyHttpLocator(server.base, max_retries=2, sleep=lambda s: None))
    assert result.backend.startswith("offline")
    assert "failed after 3 attempt(s)" in result.warnings[0] and "HTTP 503" in result.warnings[0]


def test_osprey_boxes_outside_the_image_are_clipped_or_dropped(osprey_server: Any) -> None:
    server = osprey_server(FakeOsprey(box_override=[-20, 30, 500, 90]))
    result = OspreyHttpLocator(server.base).locate(_red_image(), DragPoints.from_flat([[20, 20], [40, 20]]))
    assert result.descriptions[0].region.box == (0, 30, 64, 48)
    server.handler.box_override = [100, 100, 200, 200]
    result = OspreyHttpLocator(server.base).locate(_red_image(), DragPoints.from_flat([[20, 20], [40, 20]]))
    assert result.descriptions[0].region is None
    assert any("outside the image" in w for w in result.warnings)


def test_backoff_delay_is_bounded() -> None:
    assert [backoff_delay(i, None) for i in range(6)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert backoff_delay(0, "3") == 3.0
    assert backoff_delay(0, "3600") == 30.0
    assert backoff_delay(2, "Wed, 21 Oct 2015 07:28:00 GMT") == 2.0


# ------------------------------------------------------------------------------------------------ drawing


def _close(a: Any, b: Any, tol: int = 40) -> bool:
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b))


def test_draw_drags_marks_points_in_distinct_colours() -> None:
    img = Image.new("RGB", (256, 192), (128, 128, 128))
    drags = DragPoints.from_flat([[40, 40], [200, 60], [60, 150], [120, 100]])
    out = np.asarray(draw_drags(img, drags, numbers=False))
    assert out.shape == (192, 256, 3)
    # Handle dots are filled with their pair's colour; the corners stay untouched.
    assert _close(out[40, 40 + 3], pair_colour(0)) and _close(out[150, 60 + 3], pair_colour(1))
    assert tuple(out[0, 0]) == (128, 128, 128) and tuple(out[191, 255]) == (128, 128, 128)
    # The arrow of pair 1 crosses the midpoint of its drag.
    assert _close(out[50, 120], pair_colour(0), tol=60)
    assert len(set(PALETTE)) == len(PALETTE)
    # Marks scale with the image: more marked pixels on a bigger image, in proportion.
    small = np.asarray(draw_drags(img, drags)) != 128
    big_img = draw_drags(img.resize((512, 384)), DragPoints.from_flat([[80, 80], [400, 120], [120, 300], [240, 200]]))
    big = np.asarray(big_img) != 128
    assert 2.5 < big.any(-1).sum() / small.any(-1).sum() < 6


def test_draw_drags_enlarges_small_images_and_tints_the_mask() -> None:
    img = Image.new("RGB", (64, 64), (200, 200, 200))
    mask = np.zeros((64, 64), bool)
    mask[:, :10] = True
    out = draw_drags(img, DragPoints.from_flat([[32, 32], [50, 32]]), mask=mask, min_side=512)
    assert out.size == (512, 512)
    arr = np.asarray(out)
    assert _close(arr[32 * 8 + 3, 32 * 8 + 3 + 6], pair_colour(0))  # the dot at the scaled handle
    assert arr[5, 5, 2] > arr[5, 5, 0]  # blue tint inside the mask
    assert tuple(arr[5, 300]) == (200, 200, 200)


def test_crop_window_and_zoomed_crop_stay_inside() -> None:
    assert crop_window((2, 2), 8, 64, 48) == (0, 0, 16, 16)
    assert crop_window((63, 47), 8, 64, 48) == (48, 32, 64, 48)
    assert crop_window((10, 10), 100, 64, 48) == (0, 0, 48, 48)
    crop, box = zoomed_crop(Image.new("RGB", (64, 48)), (60, 40), 1, fraction=0.5, out_side=200)
    assert box == (40, 24, 64, 48) and crop.size == (200, 200)

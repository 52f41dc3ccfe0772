"""The SAM segmenter (tools/segmenter.py) and the ``sam`` locator backend, on a tiny random SAM built in code and
saved as a transformers folder (so ``from_pretrained(path)`` runs exactly as for facebook/sam-vit-base), with
scikit-image's photos for the plumbing. Random weights: the tests check shapes, dtypes, prompts and the mask choice,
not mask quality."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image
from skimage import data

from luciddrag.engine.errors import ModelLoadError
from luciddrag.evals.shapesworld.world import render_scene
from luciddrag.tools.llm import LLMSettings
from luciddrag.tools.locator import LocatorConfig, OpenAIVisionLocator, SamLocator, locate, make_locator
from luciddrag.tools.reasoner import ReasonRequest, offline_reason
from luciddrag.tools.schemas import DragPoints, rle_to_mask
from luciddrag.tools.segmenter import SamSegmenter, choose_mask
from tests.fakes import ScriptedChatModel

SIDE = 256  # the tiny SAM's input side (facebook/sam-vit-* use 1024)


@pytest.fixture(scope="module")
def tiny_sam_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised miniature SAM (real SamModel / SamProcessor classes), saved with save_pretrained."""
    from transformers import SamConfig, SamModel, SamProcessor
    from transformers.models.sam.configuration_sam import (
        SamMaskDecoderConfig,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    vision = SamVisionConfig(hidden_size=32, output_channels=32, num_hidden_layers=1, num_attention_heads=1,
                             mlp_dim=64, global_attn_indexes=[0], window_size=4, image_size=SIDE, patch_size=16,
                             num_pos_feats=16)
    prompt = SamPromptEncoderConfig(hidden_size=32, image_size=SIDE, patch_size=16, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=32, mlp_dim=64, num_hidden_layers=1, num_attention_heads=1,
                                   iou_head_hidden_dim=32)
    torch.manual_seed(0)
    model = SamModel(SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(),
                               mask_decoder_config=decoder.to_dict())).eval()
    processor = SamProcessor(image_processor=SamImageProcessorPil(size={"longest_edge": SIDE},
                                                                  pad_size={"height": SIDE, "width": SIDE}))
    folder = tmp_path_factory.mktemp("tiny-sam")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(data.astronaut()).resize((192, 160), Image.Resampling.LANCZOS)  # not square on purpose


@pytest.fixture(scope="module")
def handles(tiny_sam_dir: Path, astronaut: Image.Image) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """Grid points on the photo where the tiny SAM finds an object-sized mask, and where it does not."""
    width, height = astronaut.size
    grid = [(float(x), float(y)) for y in range(12, height, 24) for x in range(12, width, 24)]
    chosen = SamSegmenter(str(tiny_sam_dir)).masks(astronaut, grid)
    return [h for h, m in zip(grid, chosen) if m is not None], [h for h, m in zip(grid, chosen) if m is None]


# ------------------------------------------------------------------------------------------------ mask choice


def test_choose_mask_picks_the_best_predicted_iou_among_object_sized_masks_under_the_handle() -> None:
    h, w = 20, 30
    part, whole, everything, elsewhere = (np.zeros((h, w), bool) for _ in range(4))
    part[8:12, 8:12] = True
    whole[4:16, 4:20] = True
    everything[:] = True
    elsewhere[0:3, 25:30] = True
    masks = np.stack([part, whole, everything, elsewhere])
    handle = (10.0, 10.0)
    assert choose_mask(masks, np.array([0.5, 0.9, 0.99, 0.999]), handle) == 1  # "everything" is background
    assert choose_mask(masks, np.array([0.95, 0.9, 0.99, 0.999]), handle) == 0
    assert choose_mask(masks, np.array([0.9, 0.9, 0.0, 0.0]), handle) == 0  # a tie: the first
    assert choose_mask(masks, np.array([0.5, 0.9, 0.99, 0.0]), handle, max_fraction=1.0) == 2
    assert choose_mask(masks, np.array([0.5, 0.9, 0.99, 0.999]), (27.0, 1.0)) == 3
    assert choose_mask(masks[:2], np.array([0.5, 0.9]), (1.0, 19.0)) is None  # nothing under the handle
    assert choose_mask(masks[:2], np.array([0.5, 0.9]), (400.0, -3.0)) is None  # clamped to a corner: empty


# ------------------------------------------------------------------------------------------------ the segmenter


def test_tiny_sam_from_a_folder_gives_three_masks_per_handle_at_the_image_size(tiny_sam_dir: Path,
                                                                               astronaut: Image.Image) -> None:
    seg = SamSegmenter(str(tiny_sam_dir))
    handles = [(40.0, 30.0), (100.0, 80.0), (180.0, 150.0)]
    masks, scores = seg.predict(astronaut, handles)
    assert masks.shape == (3, 3, 160, 192) and masks.dtype == bool
    assert scores.shape == (3, 3) and scores.dtype == np.float32 and np.isfinite(scores).all()
    assert next(seg._model.parameters()).dtype == torch.float32  # CPU: float32
    # masks() is choose_mask over exactly these candidates, one answer per handle.
    chosen = seg.masks(astronaut, handles)
    assert len(chosen) == 3
    for i, (handle, got) in enumerate(zip(handles, chosen)):
        k = choose_mask(masks[i], scores[i], handle)
        assert (got is None) if k is None else np.array_equal(got, masks[i, k])


def test_point_prompts_reach_the_model_in_its_coordinates(tiny_sam_dir: Path, astronaut: Image.Image,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    seg = SamSegmenter(str(tiny_sam_dir))
    seg.load()
    seen: dict[str, Any] = {}
    forward = seg._model.forward

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        return forward(*args, **kwargs)

    monkeypatch.setattr(seg._model, "forward", spy)
    handles = [(40.0, 30.0), (191.0, 159.0)]
    seg.predict(astronaut, handles)
    scale = SIDE / 192  # the long side is resized to the model's input side, the points with it
    points = seen["input_points"]
    assert tuple(points.shape) == (1, 2, 1, 2)  # image, one prompt per handle, one point each, (x, y)
    assert torch.allclose(points[0, :, 0], torch.tensor(handles) * scale, atol=0.5)
    assert seen["input_labels"].tolist() == [[[1], [1]]]  # foreground points
    assert seen["multimask_output"] is True
    assert tuple(seen["pixel_values"].shape) == (1, 3, SIDE, SIDE)


def test_dtype_is_honoured_and_masks_come_back_as_bool(tiny_sam_dir: Path, astronaut: Image.Image) -> None:
    seg = SamSegmenter(str(tiny_sam_dir), dtype=torch.bfloat16)
    masks, scores = seg.predict(astronaut, [(60.0, 60.0)])
    assert next(seg._model.parameters()).dtype == torch.bfloat16
    assert masks.dtype == bool and masks.shape == (1, 3, 160, 192) and scores.dtype == np.float32


def test_missing_weights_are_a_clear_model_load_error(tmp_path: Path) -> None:
    seg = SamSegmenter(str(tmp_path / "no-such-sam"), local_files_only=True)
    with pytest.raises(ModelLoadError, match="hf download") as err:
        seg.mask(Image.new("RGB", (32, 32)), (5, 5))
    assert "no-such-sam" in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------ sam locator


def test_photo_offline_has_no_object_region_but_the_sam_backend_returns_image_sized_masks(
        tiny_sam_dir: Path, astronaut: Image.Image, handles: tuple[list, list]) -> None:
    width, height = astronaut.size
    seg = SamSegmenter(str(tiny_sam_dir))
    with_mask, without = handles
    assert with_mask and without  # random weights: some handles get an object-sized mask, some do not
    handle, bare = with_mask[0], without[0]
    drags = DragPoints.from_pairs([(handle, (min(handle[0] + 20, width - 1), handle[1])),
                                   (bare, (bare[0], max(bare[1] - 15, 0)))])

    offline = locate(astronaut, drags, config=LocatorConfig(backend="offline"))
    assert offline.backend == "offline" and all(d.region is None for d in offline.descriptions)
    reasoned = offline_reason(ReasonRequest(drags=drags, located=offline, caption="a photo of an astronaut"))
    assert reasoned.intentions and all(i.source_prompt == i.target_prompt for i in reasoned.intentions)

    locator, notices = make_locator(LocatorConfig(backend="sam", sam_model=str(tiny_sam_dir)))
    assert isinstance(locator, SamLocator) and notices == []
    result = locate(astronaut, drags, locator=locator)
    first, second = result.descriptions
    assert result.backend == f"sam:{tiny_sam_dir}"
    assert first.description == f"the region around ({round(handle[0])}, {round(handle[1])})"
    assert first.region is not None and first.region.source == "sam"
    mask = rle_to_mask(first.region.mask_rle, height, width)
    assert mask.shape == (height, width) and mask[int(handle[1]), int(handle[0])]
    assert np.array_equal(mask, seg.mask(astronaut, handle)) and first.region.area == int(mask.sum())
    assert second.region is None and any("handle 2" in w and "patch drag" in w for w in result.warnings)
    # The same locator instance is reused per configuration (SAM loads once).
    assert make_locator(LocatorConfig(backend="sam", sam_model=str(tiny_sam_dir)))[0].segmenter is locator.segmenter


def test_sam_backend_on_shapesworld_takes_the_name_from_the_world(tiny_sam_dir: Path) -> None:
    scene = render_scene(3, n_shapes=1)
    shape = scene.shapes[0]
    result = SamLocator(SamSegmenter(str(tiny_sam_dir))).locate(
        scene.image, DragPoints.from_pairs([(shape.centroid, (shape.centroid[0], 2.0))]))
    desc = result.descriptions[0]
    assert desc.description == "the " + shape.description().removeprefix("a ")
    assert desc.attributes["world"] == "shapesworld" and desc.attributes["shape"] == shape.shape
    assert desc.region is None or desc.region.source == "sam"  # the region is SAM's, never the world's own


def test_sam_masks_under_a_vision_llm_namer(tiny_sam_dir: Path, astronaut: Image.Image,
                                           handles: tuple[list, list]) -> None:
    width, height = astronaut.size
    seg = SamSegmenter(str(tiny_sam_dir))
    handle = handles[0][0]
    drags = DragPoints.from_pairs([(handle, (handle[0], max(handle[1] - 20, 0)))])
    settings = LLMSettings(api_key="sk-test", model="gpt-4o-mini")
    vlm = OpenAIVisionLocator(settings, chat_model=ScriptedChatModel(script=["1: the helmet of an astronaut"]))
    result = SamLocator(seg, namer=vlm).locate(astronaut, drags)
    desc = result.descriptions[0]
    assert desc.description == "the helmet of an astronaut"  # the name from the VLM ...
    assert desc.region is not None and desc.region.source == "sam"  # ... the mask from SAM, not the VLM's window
    assert np.array_equal(rle_to_mask(desc.region.mask_rle, height, width), seg.mask(astronaut, handle))
    assert result.backend == f"{vlm.name}+sam:{tiny_sam_dir}"

    error = openai.APIConnectionError(request=httpx.Request("POST", "http://x"))
    failing = OpenAIVisionLocator(settings, chat_model=ScriptedChatModel(script=[error]))
    fallback = SamLocator(seg, namer=failing).locate(astronaut, drags)
    assert fallback.descriptions[0].description.startswith("the region around")
    assert fallback.descriptions[0].region is not None and fallback.descriptions[0].region.source == "sam"
    assert "kept SAM's masks" in fallback.warnings[0]

    # The factory puts SAM under a namer with use_sam.
    locator, _ = make_locator(LocatorConfig(backend="openai", llm=settings, use_sam=True, sam_model=str(tiny_sam_dir)))
    assert isinstance(locator, SamLocator) and isinstance(locator.namer, OpenAIVisionLocator)

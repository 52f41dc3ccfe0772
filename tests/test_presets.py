"""Settings per model family as data: SD 1.x / 2.x presets, a model folder's own settings on top, user on top."""

from __future__ import annotations

import json

import pytest

from luciddrag.agent.context import AgentContext, model_defaults
from luciddrag.engine.loading import DEFAULT_MODEL, SD15_MODEL
from luciddrag.engine.presets import family_settings, model_family, recommended_settings
from luciddrag.engine.request import GuidanceConfig
from luciddrag.evals.shapesworld import MODEL_DIR


def _fake_checkpoint(tmp_path, cross_attention_dim: int, own: dict | None = None):
    (tmp_path / "unet").mkdir(parents=True)
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": cross_attention_dim}))
    if own is not None:
        (tmp_path / "luciddrag.json").write_text(json.dumps(own))
    return tmp_path


def test_family_from_the_unet_config_of_a_folder(tmp_path):
    assert model_family(_fake_checkpoint(tmp_path / "a", 768)) == "sd1"
    assert model_family(_fake_checkpoint(tmp_path / "b", 1024)) == "sd2"
    assert model_family(_fake_checkpoint(tmp_path / "c", 64)) is None
    assert model_family(MODEL_DIR) is None  # ShapesWorld is not an SD family: only its own settings apply


def test_family_of_default_hub_ids_without_their_config(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert model_family(DEFAULT_MODEL) == "sd2"
    assert model_family(SD15_MODEL) == "sd1"
    assert model_family("someone/some-other-model") is None


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_presets_are_valid_and_paper_faithful(family):
    raw = family_settings(family)
    g = GuidanceConfig(**raw["guidance"])  # every key is a real GuidanceConfig field
    assert raw["steps"] == 50 and raw["guidance_scale"] == 5.0  # the paper: T = 50, CFG 5
    assert g.edit_steps == 30 and g.kv_start_step == 5 and g.kv_mode == "concat"  # DragonDiffusion's schedule
    assert g.blend_outside is False and g.w_content > 0  # the content energy (Eq. 10) is what keeps the rest


def test_hub_default_gets_the_sd2_preset(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rec = model_defaults(DEFAULT_MODEL)
    assert rec["guidance_scale"] == 5.0 and rec["guidance"].w_edit == 320.0 and not rec["guidance"].blend_outside
    ctx = AgentContext(**rec)
    assert ctx.guidance.w_content == 480.0


def test_folder_settings_override_the_family_key_by_key(tmp_path):
    model = _fake_checkpoint(tmp_path, 768, {"guidance_scale": 3.0, "guidance": {"w_edit": 99.0}})
    rec = recommended_settings(model)
    assert rec["family"] == "sd1" and rec["guidance_scale"] == 3.0
    assert rec["guidance"]["w_edit"] == 99.0 and rec["guidance"]["w_content"] == 480.0  # the rest from the preset


def test_shapesworld_settings_are_exactly_its_own_file():
    own = json.loads((MODEL_DIR / "luciddrag.json").read_text())
    rec = model_defaults(MODEL_DIR)
    assert rec["guidance"] == GuidanceConfig(**own["guidance"])
    assert rec["guidance_scale"] == own["guidance_scale"] and rec["accept_md_fraction"] == own["accept_md_fraction"]
    assert rec["size_change"] == own["size_change"] and rec["guidance"].resize_feature_blocks == (2,)
    assert rec["guidance"].blend_outside is GuidanceConfig().blend_outside  # untouched by any SD preset


def test_a_broken_settings_file_is_one_clear_error(tmp_path):
    from luciddrag.engine.errors import InputError

    (tmp_path / "luciddrag.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        recommended_settings(tmp_path)

"""Prompt templates: every one renders with exactly the variables the code gives it; the CLI shows what an LLM gets."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from luciddrag.agent.chat import chat_prompt_variables
from PIL import Image
from typer.testing import CliRunner

from luciddrag.prompts import PromptError, list_templates, load_template, parse_label, parse_template, template_fields
from luciddrag.agent.cli.prompts import app
from luciddrag.tools.locator import caption_variables, locator_variables
from luciddrag.tools.reasoner import ReasonRequest, reasoner_variables, repair_variables
from luciddrag.evals.dragbench.gscore import gscore_variables
from luciddrag.tools.judge import judge_variables
from luciddrag.tools.schemas import DragPoints, HandleDescription, LocatorResult

PAPER_INSTRUCTION_START = ("You are a helpful assistant. Given the original description and human-select drag "
                           "information (including the description of the start point and the drag direction),")


def _request() -> ReasonRequest:
    drags = DragPoints.from_flat([[297, 270], [347, 248]])
    located = LocatorResult(descriptions=[HandleDescription(index=0, handle=(297, 270),
                                                            description="the nose of a raccoon")],
                            backend="test", image_size=(512, 512))
    return ReasonRequest(drags=drags, located=located, caption="a photo of a raccoon.")


# How the code builds each template's variables (the same functions the tools call), with sample inputs. A module
# that adds a template family adds its builder here.
CODE_VARIABLES: dict[str, Callable[[Any], dict[str, Any]]] = {
    "reason_intentions": lambda t: reasoner_variables(_request(), t.examples()),
    "locate_region": lambda t: locator_variables((64, 64), (512, 512), DragPoints.from_flat([[10, 20], [30, 5]])),
    "caption_image": lambda t: caption_variables((64, 48)),
    "repair_answer": lambda t: repair_variables("1 validation error", "{not json"),
    "chat_system": lambda t: chat_prompt_variables({"messages": []}),
    "gscore_rate": lambda t: gscore_variables(3),
    "judge_edit": lambda t: judge_variables((64, 64), DragPoints.from_flat([[10, 20], [30, 5]]), "move it"),
}
INTENTION_REASONER_TEMPLATES = {"reason_intentions", "locate_region", "caption_image", "repair_answer"}


@pytest.mark.parametrize("template", list_templates(), ids=lambda t: t.label)
def test_every_template_renders_with_exactly_the_code_variables(template: Any) -> None:
    if template.name not in CODE_VARIABLES:
        assert template.name not in INTENTION_REASONER_TEMPLATES
        pytest.skip(f"{template.label} belongs to another module, which has not registered its variable builder "
                    "in tests/test_prompts.py:CODE_VARIABLES yet")
    variables = CODE_VARIABLES[template.name](template)
    assert template.variables == set(variables)
    rendered = template.render(**variables)
    assert rendered.messages, "a template must produce at least one message"
    for message in rendered.messages:
        assert message.content.strip()
        assert not re.search(r"\{[a-z_]+\}", message.content), "a placeholder was left unrendered"


def test_the_builtin_templates_are_there() -> None:
    names = {t.name for t in list_templates()}
    assert {"reason_intentions", "locate_region", "caption_image", "repair_answer"} <= names


def test_reasoner_template_carries_the_papers_instruction_and_examples() -> None:
    t = load_template("reason_intentions", 1)
    rendered = t.render(**reasoner_variables(_request(), t.examples()))
    system = rendered.messages[0]
    assert system.role == "system"
    assert system.content.startswith(PAPER_INSTRUCTION_START)
    # The paper's two examples, in its layout.
    assert "Original description: a red motorcycle." in system.content
    assert "Direction is [[292, 276], [345, 275]]." in system.content
    assert "Target prompt: a long red motorcycle." in system.content
    assert "Source prompt: a photo of a raccoon looking forward." in system.content
    assert "Give 3 different possible intentions" in system.content
    user = rendered.messages[-1]
    assert user.role == "user"
    assert "Original description: a photo of a raccoon." in user.content
    assert "The start point is the nose of a raccoon." in user.content
    assert "Direction is [[297, 270], [347, 248]]." in user.content
    assert user.content.rstrip().endswith("OUTPUT:")


def test_missing_and_unused_variables_fail_loudly() -> None:
    t = load_template("repair_answer")
    with pytest.raises(PromptError, match="missing variable\\(s\\) previous_answer"):
        t.render(error="x")
    with pytest.raises(PromptError, match="unused variable\\(s\\) extra"):
        t.render(error="x", previous_answer="y", extra="z")


def test_literal_braces_survive_and_values_are_not_reinterpreted(tmp_path: Path) -> None:
    path = tmp_path / "demo.v1.md"
    path.write_text("<!-- message: user -->\nJSON like {{\"a\": 1}} for {who}\n", encoding="utf-8")
    t = parse_template(path)
    out = t.render(who="{not a placeholder}")
    assert out.messages[0].content == 'JSON like {"a": 1} for {not a placeholder}'


@pytest.mark.parametrize("bad", ["{a.b}", "{a[0]}", "{a:>10}", "{a!r}", "{0}", "{", "}"])
def test_only_plain_named_placeholders_are_allowed(bad: str) -> None:
    with pytest.raises(PromptError):
        template_fields(f"text {bad} text")


def test_malformed_template_files_are_rejected(tmp_path: Path) -> None:
    no_marker = tmp_path / "x.v1.md"
    no_marker.write_text("just text\n", encoding="utf-8")
    with pytest.raises(PromptError, match="marker"):
        parse_template(no_marker)
    stray = tmp_path / "y.v1.md"
    stray.write_text("stray\n<!-- message: user -->\nhi\n", encoding="utf-8")
    with pytest.raises(PromptError, match="before the first"):
        parse_template(stray)
    with pytest.raises(PromptError, match="named"):
        parse_template(tmp_path / "NoVersion.md")


def test_versions_latest_by_default_and_user_dir_shadows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builtin = load_template("reason_intentions", 1)
    v2 = tmp_path / "reason_intentions.v2.md"
    v2.write_text(builtin.source().replace("Give {k} different", "Propose {k} distinct"), encoding="utf-8")
    (tmp_path / "reason_intentions.v2.examples.yaml").write_text(builtin.examples_path.read_text(), encoding="utf-8")
    monkeypatch.setenv("LUCIDDRAG_PROMPTS_DIR", str(tmp_path))
    assert load_template("reason_intentions").version == 2
    assert load_template("reason_intentions", 1).path == builtin.path
    labels = [t.label for t in list_templates()]
    assert "reason_intentions.v1" in labels and "reason_intentions.v2" in labels
    rendered = load_template("reason_intentions").render(**reasoner_variables(_request(), builtin.examples()))
    assert "Propose 3 distinct" in rendered.messages[0].content
    with pytest.raises(PromptError, match="no version 7"):
        load_template("reason_intentions", 7)
    with pytest.raises(PromptError, match="no prompt template named"):
        load_template("nope")


def test_parse_label() -> None:
    assert parse_label("reason_intentions.v12") == ("reason_intentions", 12)
    assert parse_label("caption_image") == ("caption_image", None)
    with pytest.raises(PromptError):
        parse_label("Bad Name")


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture
def shapes_png(tmp_path: Path) -> tuple[Path, Any]:
    from luciddrag.evals.shapesworld.world import render_scene

    scene = render_scene(1)
    path = tmp_path / "scene.png"
    scene.image.save(path)
    return path, scene


def test_cli_list_and_show() -> None:
    runner = CliRunner()
    out = runner.invoke(app, ["list"])
    assert out.exit_code == 0, out.output
    assert "reason_intentions.v1" in out.output and "locate_region.v1" in out.output
    assert "original_description" in out.output
    shown = runner.invoke(app, ["show", "reason_intentions.v1", "--examples"])
    assert shown.exit_code == 0
    assert shown.output.startswith(load_template("reason_intentions", 1).source()[:200])
    assert "a red motorcycle." in shown.output  # the examples file


def test_cli_render_reasoner_shows_what_the_llm_receives(shapes_png: tuple[Path, Any]) -> None:
    path, scene = shapes_png
    shape = scene.shapes[0]
    cx, cy = shape.centroid
    result = CliRunner().invoke(app, ["render", "reason_intentions", "--image", str(path),
                                      "--drag", f"{cx:.0f},{cy:.0f}:{min(63, cx + 15):.0f},{cy:.0f}", "--k", "4"])
    assert result.exit_code == 0, result.output
    assert "===== system =====" in result.output and "===== user =====" in result.output
    assert "Give 4 different possible intentions" in result.output
    # The start point comes from the offline locator, the description from ShapesWorld segmentation.
    assert f"The start point is the {shape.description().removeprefix('a ')}." in result.output
    assert "Original description: a " in result.output
    assert "The drag goes right" in result.output


def test_cli_render_with_user_start_and_caption(shapes_png: tuple[Path, Any]) -> None:
    path, _ = shapes_png
    result = CliRunner().invoke(app, ["render", "reason_intentions", "--image", str(path), "--drag", "5,5:20,5",
                                      "--start", "the tip of the nose", "--caption", "a portrait"])
    assert result.exit_code == 0, result.output
    assert "The start point is the tip of the nose." in result.output
    assert "Original description: a portrait" in result.output


def test_cli_render_locator_saves_the_pictures(shapes_png: tuple[Path, Any], tmp_path: Path) -> None:
    path, _ = shapes_png
    out_dir = tmp_path / "pics"
    result = CliRunner().invoke(app, ["render", "locate_region", "--image", str(path), "--drag", "10,10:30,20",
                                      "--drag", "40,40:50,30", "--save-images", str(out_dir)])
    assert result.exit_code == 0, result.output
    assert "Handle 1: at (10, 10), dragged to (30, 20)." in result.output
    assert "Handle 2: at (40, 40), dragged to (50, 30)." in result.output
    saved = sorted(out_dir.glob("*.png"))
    assert len(saved) == 3  # the annotated image and one close-up per handle
    assert Image.open(saved[0]).size == (512, 512)  # the 64 px scene enlarged for the VLM


def test_cli_render_errors_exit_2() -> None:
    runner = CliRunner()
    missing = runner.invoke(app, ["render", "repair_answer", "--var", "error=x"])
    assert missing.exit_code == 2
    assert "missing variable(s) previous_answer" in missing.output
    ok = runner.invoke(app, ["render", "repair_answer", "--var", "error=bad", "--var", "previous_answer={x"])
    assert ok.exit_code == 0 and "{x" in ok.output
    unknown = runner.invoke(app, ["render", "nope"])
    assert unknown.exit_code == 2 and "no prompt template named" in unknown.output

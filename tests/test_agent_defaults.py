"""The headline API with no context at all: `graph.invoke({"image": ..., "points": [...]})`."""

from __future__ import annotations

import pytest
from PIL import Image

from luciddrag.agent.artifacts import ImageRef
from luciddrag.agent.context import AgentContext, default_context, resolve_context
from luciddrag.engine.errors import InputError
from luciddrag.evals.shapesworld import MODEL_DIR
from luciddrag.evals.shapesworld.world import render_scene


@pytest.fixture()
def env(monkeypatch, tmp_path):
    """A user's environment: the ShapesWorld model by LUCIDDRAG_MODEL, no LLM key (offline backends), few steps."""
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "LUCIDDRAG_DISCRIMINATOR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LUCIDDRAG_MODEL", str(MODEL_DIR))
    monkeypatch.setenv("LUCIDDRAG_DEVICE", "cpu")
    monkeypatch.setenv("LUCIDDRAG_STEPS", "4")
    monkeypatch.setenv("LUCIDDRAG_HOME", str(tmp_path / "home"))
    return tmp_path


def test_default_context_reads_the_environment_and_the_model_folder(env):
    ctx = default_context()
    assert ctx.model == str(MODEL_DIR) and ctx.device == "cpu" and ctx.steps == 4
    # the model folder's luciddrag.json (CFG 1, w_edit 1000), not the dataclass defaults (CFG 5)
    assert ctx.guidance_scale == 1.0 and ctx.guidance.w_edit == 1000.0
    assert resolve_context(None) == ctx
    assert resolve_context(AgentContext()) == ctx  # an empty context (a server's {}) is no choice either
    given = AgentContext(steps=7)
    assert resolve_context(given) is given
    assert resolve_context({"steps": 9}).steps == 9 and resolve_context({"steps": 9}).guidance_scale == 1.0


def test_bad_steps_in_the_environment_is_a_clear_error(env, monkeypatch):
    monkeypatch.setenv("LUCIDDRAG_STEPS", "many")
    with pytest.raises(InputError, match="LUCIDDRAG_STEPS"):
        default_context()


@pytest.mark.slow
def test_invoke_with_no_context_argument(env):
    """Exactly the README's words, with literally no `context=`: nodes fall back to the environment's defaults."""
    from luciddrag.agent.graph import graph

    sc = render_scene(5, n_shapes=1)
    cx, cy = sc.shapes[0].centroid
    out = graph.invoke({"image": sc.image, "points": [(cx, cy), (min(cx + 12, 60), cy)]})
    assert isinstance(out["result"], ImageRef) and out["chosen"] is not None
    assert Image.open(out["result"].path).size == sc.image.size
    assert out["result"].path.startswith(str(env / "home"))  # the artifact store under LUCIDDRAG_HOME
    assert any("offline" in w for w in out["warnings"])


def test_each_default_in_one_place():
    """CFG and the guidance weights are written once (engine/request.py); the agent and the web app read them."""
    from luciddrag.agent.web.session import WebSettings
    from luciddrag.engine.request import DEFAULT_GUIDANCE_SCALE, EditRequest, GuidanceConfig

    assert AgentContext().guidance_scale == DEFAULT_GUIDANCE_SCALE == EditRequest.model_fields["guidance_scale"].default
    web = WebSettings(model="m")
    assert web.guidance_scale == DEFAULT_GUIDANCE_SCALE
    assert (web.w_edit, web.w_content, web.w_inpaint) == (GuidanceConfig().w_edit, GuidanceConfig().w_content,
                                                          GuidanceConfig().w_inpaint)


def test_one_mean_distance():
    """The critic's score, DragBench's MD and tracking share one distance function."""
    from luciddrag.engine.tracking import mean_distance, point_distances
    from luciddrag.evals.dragbench import metrics

    assert metrics.point_distances is point_distances
    assert point_distances([(0, 0), (1, 1)], [(3, 4), (1, 1)]) == [5.0, 0.0]
    assert mean_distance([(0, 0), (1, 1)], [(3, 4), (1, 1)]) == 2.5
    with pytest.raises(ValueError):
        point_distances([(0, 0)], [])


def test_score_drag_uses_the_one_distance(monkeypatch):
    from types import SimpleNamespace

    import luciddrag.agent.tools as tools
    from luciddrag.tools.schemas import DragPoints

    monkeypatch.setattr(tools, "get_editor", lambda ctx: SimpleNamespace(c=None))
    monkeypatch.setattr(tools, "track_points", lambda *a, **kw: [(13.0, 14.0)])
    monkeypatch.setattr(tools, "get_sampler", lambda ctx: None)
    out = tools.score_drag(AgentContext(critic_search=None), Image.new("RGB", (32, 32)), Image.new("RGB", (32, 32)),
                           DragPoints.from_flat([(0, 0), (10, 10)]))
    assert out["md_px"] == 5.0 and out["md_fraction"] == pytest.approx(5.0 / (10 * 2 ** 0.5))

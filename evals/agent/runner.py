"""Run the agent-eval cases through the reasoner and the agent graph, against a cassette server.

For each case:

1. reasoner: ``tools.reasoner.reason`` with the case's drags, located object (the case's descriptions, else the
   offline locator) and description, through the real ChatOpenAI client pointed at the cassette server;
2. trajectory: the agent graph (agent/graph.py) on the case's image with the same LLM, argmax selection and a
   scripted critic: sampling returns the input image (no diffusion model needed) and the critic accepts an attempt
   whose target prompt contains one of ``expect.critic_accepts``. The graph's routing, retry and budget logic run
   unchanged; only the two GPU tools are replaced (``unittest.mock.patch`` on ``agent.nodes``), and the reasoner
   node is pointed at the evaluated prompt version the same way.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any
from unittest import mock

from pydantic import BaseModel, Field

import luciddrag.agent.nodes as nodes
from luciddrag.agent.context import AgentContext
from luciddrag.agent.graph import build_graph
from luciddrag.evals.agent.cases import AgentCase
from luciddrag.evals.agent.cassette import CASSETTE_DIR, CassetteServer, load_cassette
from luciddrag.evals.agent.metrics import case_constraints, diversity, has_any, trajectory_checks
from luciddrag.prompts import load_template, parse_label
from luciddrag.tools.llm import LLMSettings
from luciddrag.tools.locator import LocatorConfig, locate
from luciddrag.tools.reasoner import ReasonerConfig, ReasonRequest, reason
from luciddrag.tools.schemas import DragPoints, HandleDescription, Intention, LocatorResult

PROMPT_NAME = "reason_intentions"


class CaseResult(BaseModel):
    case: str
    backend: str = ""
    schema_valid: bool = False
    cassette: str = "hit"
    """hit | miss | recorded"""
    intentions: list[Intention] = Field(default_factory=list)
    constraints: dict[str, Any] = Field(default_factory=dict)
    diversity: float | None = None
    trajectory: dict[str, bool] = Field(default_factory=dict)
    nodes: list[str] = Field(default_factory=list)
    tried: list[str] = Field(default_factory=list)
    accepted: bool | None = None
    warnings: list[str] = Field(default_factory=list)

    @property
    def passed(self) -> bool:
        c = self.constraints
        return (self.cassette != "miss" and self.schema_valid and bool(c) and c["family_any"] and c["mentions_object"]
                and c["minimal_edit"] and c["k_distinct"] and all(self.trajectory.values()))


class AgentEvalReport(BaseModel):
    prompt: str
    template_sha256: str
    mode: str
    model: str | None = None
    synthetic: bool | None = None
    cases: list[CaseResult]
    summary: dict[str, float | int]


def template_label(version: int | None) -> tuple[str, str]:
    """(label, sha256 of the template file and its examples) for the evaluated reasoner template."""
    t = load_template(PROMPT_NAME, version)
    digest = hashlib.sha256(t.source().encode())
    if t.examples_path.exists():
        digest.update(t.examples_path.read_bytes())
    return t.label, digest.hexdigest()


def _located(case: AgentCase, drags: DragPoints) -> LocatorResult:
    from PIL import Image

    with Image.open(case.image_path) as im:
        size = im.size
    if case.handle_descriptions:
        descs = [HandleDescription(index=i, handle=p.handle, description=d)
                 for i, (p, d) in enumerate(zip(drags.pairs, case.handle_descriptions))]
        return LocatorResult(descriptions=descs, backend="case", image_size=size)
    return locate(str(case.image_path), drags, None, LocatorConfig(backend="offline"))


def _schema_valid(backend: str, warnings: Sequence[str]) -> bool:
    bad = ("failed the schema", "could not be used", "no usable intentions", "offline reasoner instead")
    return backend.startswith("llm") and not any(b in w for w in warnings for b in bad)


def reason_case(case: AgentCase, settings: LLMSettings, label: str) -> CaseResult:
    drags = DragPoints.from_flat([list(p) for p in case.points])
    request = ReasonRequest(drags=drags, located=_located(case, drags), caption=case.caption, k=case.expect.k)
    res = reason(request, ReasonerConfig(backend="llm", llm=settings, prompt=label))
    e = case.expect
    return CaseResult(case=case.id, backend=res.backend, schema_valid=_schema_valid(res.backend, res.warnings),
                      intentions=res.intentions, warnings=res.warnings,
                      constraints=case_constraints(res.intentions, e.families, e.mentions, e.k, e.max_changed_words),
                      diversity=diversity(res.intentions))


def trajectory_case(case: AgentCase, settings: LLMSettings, label: str, max_attempts: int = 3) -> dict[str, Any]:
    """Run the agent graph with a scripted critic; returns nodes, attempts, intentions and checks."""
    accepts = case.expect.critic_accepts

    def fake_sample(ctx, image, drags, mask, intentions, progress=None, **sampler_options):
        return SimpleNamespace(images=[image.convert("RGB") for _ in intentions])

    def fake_score(ctx, original, edited, drags, prompt=""):
        ok = has_any(prompt, accepts)
        return {"tracked": [p.target for p in drags.pairs], "md_px": 1.0 if ok else 30.0,
                "md_fraction": 0.1 if ok else 0.9}

    def reasoner_config(**kw):
        return ReasonerConfig(prompt=label, **kw)

    with tempfile.TemporaryDirectory() as tmp:
        ctx = AgentContext(model="(not loaded)", device="cpu", k=case.expect.k, selection="argmax",
                           max_attempts=max_attempts, locator="offline", reasoner="llm", llm=settings,
                           discriminator=None, artifacts_dir=tmp)
        inp = {"image": str(case.image_path), "points": [list(p) for p in case.points], "prompt": case.caption}
        seen: list[str] = []
        state: dict[str, Any] = {}
        with mock.patch.object(nodes, "sample_intentions", fake_sample), \
                mock.patch.object(nodes, "score_drag", fake_score), \
                mock.patch.object(nodes, "ReasonerConfig", reasoner_config):
            for mode, chunk in build_graph().stream(inp, context=ctx, stream_mode=["updates", "values"]):
                if mode == "updates":
                    seen += list(chunk)
                else:
                    state = chunk
    attempts = state.get("attempts") or []
    intentions = state.get("intentions") or []
    checks = trajectory_checks(seen, attempts, intentions, accepts, max_attempts, bool(state.get("accepted")))
    return {"nodes": seen, "tried": [a.intention for a in attempts], "accepted": bool(state.get("accepted")),
            "checks": checks}


def summarise(results: Sequence[CaseResult]) -> dict[str, float | int]:
    n = len(results) or 1

    def rate(f) -> float:
        return round(sum(1 for r in results if f(r)) / n, 3)

    divs = [r.diversity for r in results if r.diversity is not None]
    return {
        "cases": len(results),
        "passed": sum(r.passed for r in results),
        "cassette_misses": sum(r.cassette == "miss" for r in results),
        "schema_valid": rate(lambda r: r.schema_valid),
        "family_any": rate(lambda r: r.constraints.get("family_any")),
        "family_top": rate(lambda r: r.constraints.get("family_top")),
        "mentions_object": rate(lambda r: r.constraints.get("mentions_object")),
        "minimal_edit": rate(lambda r: r.constraints.get("minimal_edit")),
        "k_distinct": rate(lambda r: r.constraints.get("k_distinct")),
        "diversity": round(sum(divs) / len(divs), 3) if divs else 0.0,
        "trajectory_ok": rate(lambda r: bool(r.trajectory) and all(r.trajectory.values())),
    }


def run_agent_eval(cases: Sequence[AgentCase], *, version: int | None = None, mode: str = "replay",
                   cassette_root=None, model: str | None = None, upstream: str | None = None,
                   api_key: str | None = None, structured_output: str | None = None,
                   trajectories: bool = True, synthetic: bool = False, note: str = "",
                   forward: Any = None) -> AgentEvalReport:
    label, sha = template_label(version)
    root = cassette_root or CASSETTE_DIR
    name, _ = parse_label(label)
    meta = {"synthetic": synthetic, "note": note}
    results: list[CaseResult] = []
    with CassetteServer(root, label, mode, upstream=upstream, api_key=api_key, meta_defaults=meta,  # type: ignore[arg-type]
                        template_sha256=sha, forward=forward) as server:
        settings = LLMSettings(base_url=server.url, model=model or "gpt-4.1-mini", max_retries=0, timeout_s=120,
                               **({"structured_output": structured_output} if structured_output else {}))
        for case in cases:
            server.case = case.id
            misses = len(server.misses)
            result = reason_case(case, settings, label)
            if trajectories:
                t = trajectory_case(case, settings, label)
                result.nodes, result.tried, result.accepted, result.trajectory = (t["nodes"], t["tried"],
                                                                                  t["accepted"], t["checks"])
            if len(server.misses) > misses:
                result.cassette = "miss"
                result.warnings.insert(0, server.misses[-1].reason)
            elif mode == "record":
                result.cassette = "recorded"
            results.append(result)
    first = next((c for c in (load_cassette(root, label, r.case) for r in results) if c is not None), None)
    return AgentEvalReport(prompt=label, template_sha256=sha, mode=mode,
                           model=first.meta.model if first else model, synthetic=first.meta.synthetic if first else None,
                           cases=results, summary=summarise(results))


def format_table(report: AgentEvalReport) -> str:
    y = lambda b: "yes" if b else "NO"  # noqa: E731
    rows = ["| case | cassette | schema | family (any/top) | object | minimal edit | K distinct | diversity | "
            "trajectory | tried |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report.cases:
        c = r.constraints
        traj = "-" if not r.trajectory else ("ok" if all(r.trajectory.values()) else
                                              "FAIL " + ",".join(k for k, v in r.trajectory.items() if not v))
        rows.append(f"| {r.case} | {r.cassette} | {y(r.schema_valid)} | {y(c.get('family_any'))}/"
                    f"{y(c.get('family_top'))} | {y(c.get('mentions_object'))} | {y(c.get('minimal_edit'))} | "
                    f"{y(c.get('k_distinct'))} | {'-' if r.diversity is None else f'{r.diversity:.2f}'} | {traj} | "
                    f"{len(r.tried)}{' (accepted)' if r.accepted else ''} |")
    s = report.summary
    head = (f"prompt {report.prompt} (template sha256 {report.template_sha256[:12]}), {report.mode}, model "
            f"{report.model}{' [SYNTHETIC cassettes: scripted answers, not an LLM]' if report.synthetic else ''}")
    return head + "\n\n" + "\n".join(rows) + "\n\n" + ", ".join(f"{k} {v}" for k, v in s.items())


def compare_table(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Two reports' summaries side by side (e.g. two prompt versions)."""
    keys = [k for k in a["summary"] if k in b["summary"]]
    rows = [f"| metric | {a['prompt']} | {b['prompt']} |", "|---|---|---|"]
    rows += [f"| {k} | {a['summary'][k]} | {b['summary'][k]} |" for k in keys]
    return "\n".join(rows)

"""`luciddrag`: the command line.

Every user-caused failure (bad points, unreadable file, missing weights, out of memory) prints one line starting with
"error:" and exits with code 2; nothing from deep inside torch reaches the terminal.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from luciddrag.agent.cli import agent_eval, discriminator, dragbench, prompts, train
from luciddrag.agent.serving import cli as serving_cli
from luciddrag.agent.cli.common import DRAG_HELP, fail as _fail, parse_drag, quiet_libraries as _quiet_libraries
from luciddrag.agent.web import web_command
from luciddrag.engine.bench import SWITCHES
from luciddrag.engine.errors import LucidDragError

app = typer.Typer(
    help=(
        "LucidDrag: semantic-aware drag editing.\n\n"
        "Drag a handle point to a target point; LucidDrag works out what you mean (move it? make it bigger? turn it?),"
        " edits the image with a guided diffusion model, checks the result and tries another reading when it fails.\n\n"
        "Start with `luciddrag demo` (offline, CPU, under a minute). Then `luciddrag edit photo.png --drag 120,80:160,60"
        " --model stable-diffusion-v1-5/stable-diffusion-v1-5` on a GPU."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
bench_app = typer.Typer(help="Benchmarks that print numbers (speed, memory).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
eval_app = typer.Typer(help="Evaluations: the ShapesWorld drag benchmark (exact scores).", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


def _context(model, device, steps, seed, k, attempts, locator, reasoner, **kw):
    from luciddrag.agent.context import AgentContext, model_defaults

    # the model folder's own recommendations (luciddrag.json) first; what the user typed wins
    kw = {**model_defaults(model or AgentContext().model), **kw,
          **dict(steps=steps, seed=seed, k=k, max_attempts=attempts, locator=locator, reasoner=reasoner,
                 show_progress=True)}
    ctx = AgentContext(**kw)
    if model:
        ctx.model = model
    if device:
        ctx.device = device
    return ctx


def _run_agent(image, points, mask, prompt, intention, ctx, out: Path) -> dict:
    """Run the drag-edit graph, printing its progress, and write the result, sheet and report.

    Everything a user can get wrong is checked first (the output path, the image, points and mask, the model), so a
    bad request fails in one line before any locating, reasoning or sampling."""
    from luciddrag.agent.graph import build_graph
    from luciddrag.agent.nodes import check_request
    from luciddrag.agent.report import check_output_path, write_outputs
    from luciddrag.agent.tools import get_editor
    from luciddrag.tools.llm import LLMSettings

    check_output_path(out)
    inp = {"image": image, "points": points}
    if mask is not None:
        inp["mask"] = mask
    if prompt:
        inp["prompt"] = prompt
    if intention is not None:
        inp["intention"] = intention
    req = check_request(inp, ctx)
    get_editor(ctx)  # load the model before locate and reason: a missing model is found first
    llm = ctx.llm or LLMSettings.from_env()
    if llm.configured and "offline" not in (ctx.locator, ctx.reasoner):
        typer.echo(f"  note: asking the LLM {llm.label()} (up to {llm.timeout_s:g} s per try, "
                   f"{llm.max_retries + 1} tries; LUCIDDRAG_LLM_TIMEOUT) -- offline fallback if it does not answer")
    state: dict = {}
    for mode, chunk in build_graph().stream(inp, context=ctx, stream_mode=["updates", "custom", "values"]):
        if mode == "custom" and "message" in chunk:
            typer.echo(f"  [{chunk.get('node')}] {chunk['message']}")
        elif mode == "values":
            state = chunk
    for w in state.get("warnings") or []:
        typer.secho(f"  note: {w}", fg=typer.colors.YELLOW)
    flat = [p for pair in req.drags.pairs for p in (pair.handle, pair.target)]
    paths = write_outputs(out, req.image, flat, state)
    verdict = "accepted" if state.get("accepted") else "NOT accepted (best attempt returned)"
    typer.echo(f"{verdict}: {state['chosen'].intention}")
    typer.echo(f"wrote {paths['result']}, {paths['sheet']}, {paths['report']}")
    return state


@app.command()
def edit(
    image: Path = typer.Argument(..., help="Image to edit (PNG/JPEG/WebP/..., any size, any mode)."),
    drag: List[str] = typer.Option(..., "--drag", "-d", help=DRAG_HELP),
    mask: Optional[Path] = typer.Option(None, help="Editable region (white = may change), same size as the image."),
    prompt: Optional[str] = typer.Option(None, help="What the image shows (else: captioned by the locator)."),
    intention: Optional[str] = typer.Option(None, help="What you mean ('make the neck longer'); else reasoned."),
    source_prompt: Optional[str] = typer.Option(None, help="Fix the intention: the image as it is ..."),
    target_prompt: Optional[str] = typer.Option(None, help="... and as it should become (skips reasoning)."),
    model: Optional[str] = typer.Option(None, envvar="LUCIDDRAG_MODEL", help="Hub id or local diffusers folder."),
    device: Optional[str] = typer.Option(None, envvar="LUCIDDRAG_DEVICE", help="cpu, cuda, cuda:1 ... (default: auto)."),
    steps: int = typer.Option(50, min=2, envvar="LUCIDDRAG_STEPS", help="DDIM steps (the paper uses 50)."),
    seed: int = typer.Option(0, help="Random seed (sampling and intention choice)."),
    k: int = typer.Option(3, min=1, max=8, help="How many intentions to reason."),
    attempts: int = typer.Option(3, min=1, max=8, help="Attempt budget: intentions tried before giving up."),
    locator: str = typer.Option("auto", help="auto | offline | sam | openai | florence2 | osprey (sam: object masks "
                                             "from SAM; the others name what is under the handle)."),
    sam: bool = typer.Option(False, "--sam", envvar="LUCIDDRAG_USE_SAM",
                             help="SAM's object masks under the openai / osprey / florence2 locators."),
    sam_model: Optional[str] = typer.Option(None, envvar="LUCIDDRAG_SAM_MODEL",
                                            help="SAM checkpoint, hub id or folder (default facebook/sam-vit-base)."),
    reasoner: str = typer.Option("auto", help="auto | llm | offline (auto: LLM when OPENAI_API_KEY/BASE_URL set)."),
    fast: bool = typer.Option(False, "--fast", help="Fast mode: 25 steps, the guidance schedule scaled to them."),
    out: Path = typer.Option(Path("edited.png"), "--out", "-o", help="Result path; .sheet.png and .report.md beside."),
) -> None:
    """Drag-edit IMAGE: locate what is dragged, reason what you mean, edit, check, retry with another reading.

    Example: luciddrag edit horse.png --drag 210,120:260,90 --model stable-diffusion-v1-5/stable-diffusion-v1-5
    """
    _quiet_libraries()
    points = [p for d in drag for p in parse_drag(d)]
    given = intention
    if source_prompt is not None or target_prompt is not None:
        if not (source_prompt and target_prompt):
            _fail("give both --source-prompt and --target-prompt (or neither, to let the agent reason them)")
        given = {"intention": intention or "edit with the given prompts", "source_prompt": source_prompt,
                 "target_prompt": target_prompt}
    try:
        ctx = _context(model, device, steps, seed, k, attempts, locator, reasoner, use_sam=sam, sam_model=sam_model,
                       fast=fast)
        _run_agent(image, points, mask, prompt, given, ctx, out)
    except LucidDragError as exc:
        _fail(str(exc))


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("demo-out"), "--out", help="Folder for the input, result, sheet and report."),
    scene: int = typer.Option(7, help="Which bundled ShapesWorld scene (seed)."),
    steps: int = typer.Option(50, min=2, help="DDIM steps."),
) -> None:
    """Offline demo of the full agent loop on ShapesWorld: CPU, no key, no downloads, well under a minute.

    Drags the first shape of a ShapesWorld scene sideways; the offline locator names it, the offline reasoner proposes
    intentions (move / resize) with prompts the shipped model understands, the engine edits, the critic checks where
    the shape landed and retries another intention if it missed.
    """
    _quiet_libraries()
    from luciddrag.evals.shapesworld import MODEL_DIR
    from luciddrag.evals.shapesworld.world import render_scene

    sc = render_scene(scene, n_shapes=1)
    sh = sc.shapes[0]
    cx, cy = sh.centroid
    dx = 16 if cx < 32 else -16
    points = [(round(cx), round(cy)), (round(cx) + dx, round(cy))]
    out_dir.mkdir(parents=True, exist_ok=True)
    src = out_dir / "input.png"
    sc.image.save(src)
    typer.echo(f"scene: {sc.caption!r}; dragging {points[0]} -> {points[1]}")
    try:
        # most likely intention first (the paper samples by confidence, as `luciddrag edit` does)
        ctx = _context(str(MODEL_DIR), "cpu", steps, 0, 3, 3, "offline", "offline", selection="argmax")
        _run_agent(src, points, None, sc.caption, None, ctx, out_dir / "result.png")
    except LucidDragError as exc:
        _fail(str(exc))


@app.command()
def chat(
    image: Optional[Path] = typer.Option(None, help="Image to start the conversation with."),
    thread: str = typer.Option("default", help="Conversation thread id (kept across runs)."),
    db: Optional[str] = typer.Option(None, envvar="LUCIDDRAG_DB", help="sqlite path or postgresql:// URL."),
    model: Optional[str] = typer.Option(None, envvar="LUCIDDRAG_MODEL", help="Hub id or local diffusers folder."),
    device: Optional[str] = typer.Option(None, envvar="LUCIDDRAG_DEVICE", help="cpu / cuda (default: auto)."),
    steps: int = typer.Option(50, min=2, help="DDIM steps."),
) -> None:
    """Talk to the editor: 'drag 120,80 to 160,60', 'show me the options first', 'try your second idea', 'undo'.

    Without an LLM (no OPENAI_API_KEY / OPENAI_BASE_URL) a small command grammar keeps it usable offline.
    Results are written to files and their paths printed; the thread is saved and resumes next time.
    """
    _quiet_libraries()
    from langgraph.types import Command

    from luciddrag.agent.chat import build_chat_graph
    from luciddrag.agent.persistence import make_checkpointer
    from luciddrag.tools.llm import LLMSettings

    try:
        ctx = _context(model, device, steps, 0, 3, 3, "auto", "auto")
        if image is not None:  # a bad image fails here, before the thread is touched
            from luciddrag.agent.context import check_image_kind, check_model_path
            from luciddrag.engine.preprocess import open_image

            check_model_path(ctx.model)
            check_image_kind(ctx.model, open_image(image).size)
        g = build_chat_graph(checkpointer=make_checkpointer(db))
    except LucidDragError as exc:
        _fail(str(exc))
    cfg = {"configurable": {"thread_id": thread}}
    if not LLMSettings.from_env().configured:
        typer.secho("offline: no LLM configured; using the command grammar (type 'help').", fg=typer.colors.YELLOW)
    first = {"image": str(image)} if image else {}
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if text in ("quit", "exit"):
            break
        if not text:
            continue
        try:
            out = g.invoke({"messages": [("user", text)], **first}, cfg, context=ctx)
            first = {}
            while out.get("__interrupt__"):
                opts = out["__interrupt__"][0].value["intentions"]
                for o in opts:
                    typer.echo(f"  {o['index']}) {o['intention']}  ({o['confidence']:.2f})")
                choice = input("pick a number (or describe what you meant)> ").strip() or "1"
                out = g.invoke(Command(resume=choice), cfg, context=ctx)
            typer.echo(f"luciddrag> {out['messages'][-1].content}")
        except LucidDragError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)


@bench_app.command("engine")
def bench_engine(
    model: str = typer.Option("tiny", help="tiny | sd21-base | sd15 (random weights, no download) | hub id | folder."),
    resolution: Optional[int] = typer.Option(None, help="Square working resolution (default: the model's native)."),
    steps: int = typer.Option(50, min=2, help="DDIM steps."),
    intentions: int = typer.Option(3, min=1, max=4, help="K intentions for the batched run."),
    device: Optional[str] = typer.Option(None, help="cpu / cuda (default: auto)."),
    dtype: Optional[str] = typer.Option(None, help="fp16 / bf16 / fp32 (default: fp16 on CUDA, fp32 on CPU)."),
    repeats: int = typer.Option(1, min=1, help="Take the best of N timings."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the numbers as JSON here."),
    switches: str = typer.Option(",".join(SWITCHES), help="Comma-separated rows after the reference ones: "
                                 + ", ".join(SWITCHES) + " ('' for none)."),
    compile_unet: bool = typer.Option(False, "--compile", help="Also a torch.compile row (slow to build)."),
    threads: Optional[int] = typer.Option(None, min=1, help="torch threads (1 gives steadier CPU timings)."),
    floor: bool = typer.Option(True, help="Also time single UNet passes and print the ratio an exact gradient cannot "
                               "go under (--no-floor where a pass takes minutes: SD on CPU)."),
) -> None:
    """Time a guided edit against an unguided inversion+sampling in the same process; print passes and peak memory.

    Rows: unguided, guided, the guided edit taken apart (guidance only, K/V injection only), K intentions batched and
    sequential, then the switches. Ratios are to the unguided row of the same run; `exact_gradient_floor` is what
    the guided/unguided ratio would be if energies and K/V cost nothing (the UNet backwards alone).

    GPU target run (one command, no downloads): `luciddrag bench engine --model sd21-base --device cuda --repeats 3`.
    """
    _quiet_libraries()
    from luciddrag.engine.bench import format_report, run_bench

    try:
        chosen = [s.strip() for s in switches.split(",") if s.strip()]
        unknown = [s for s in chosen if s not in SWITCHES]
        if unknown:
            _fail(f"unknown switch {unknown[0]!r}: one of {', '.join(SWITCHES)}")
        report = run_bench(model, resolution, steps, intentions, device, dtype, repeats, switches=chosen,
                           compile=compile_unet, threads=threads, floor=floor)
    except LucidDragError as exc:
        _fail(str(exc))
    text = format_report(report)
    typer.echo(text)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=1))


@eval_app.command("shapes")
def eval_shapes(
    tasks: int = typer.Option(100, min=1, help="Tasks per family (move, resize); the default suite has 100 each."),
    seed: Optional[int] = typer.Option(None, help="Seed base of the suite (default: the fixed held-out seed)."),
    configs: str = typer.Option("reconstruct,editing,editing+semantic", help="Comma-separated ablation rows: "
                                "reconstruct, editing, editing+semantic, editing+quality, all; quality rows take "
                                "overrides, e.g. editing+quality@w=10,n=10 (d=FOLDER: another discriminator)."),
    families: str = typer.Option("move,resize", help="Task families to run."),
    steps: int = typer.Option(50, min=2, help="DDIM steps."),
    mask: bool = typer.Option(True, help="Give the engine the task's editable mask (else: automatic mask)."),
    model: Optional[str] = typer.Option(None, help="Model folder (default: the shipped ShapesWorld model)."),
    w_edit: Optional[float] = typer.Option(None, help="Override the drag-energy weight."),
    w_content: Optional[float] = typer.Option(None, help="Override the content-energy weight."),
    w_inpaint: Optional[float] = typer.Option(None, help="Override the inpaint-energy weight."),
    edit_steps: Optional[int] = typer.Option(None, help="Override n1, the number of guided steps."),
    init_copy: Optional[bool] = typer.Option(None, help="Override the z_T handle-patch copy."),
    kv: Optional[bool] = typer.Option(None, help="Override K/V injection."),
    cfg_scale: Optional[float] = typer.Option(None, "--cfg", help="CFG scale (default: the model's luciddrag.json, else 5)."),
    regions: bool = typer.Option(True, help="Moves drag the whole shape region (as the agent does), else a patch."),
    out: Optional[Path] = typer.Option(None, "--json", help="Folder for shapes_eval.json/.md and a contact sheet."),
) -> None:
    """Run the engine over the ShapesWorld drag suite and print exact scores per family and configuration."""
    _quiet_libraries()
    from luciddrag.engine.pipeline import DragEditor
    from luciddrag.engine.request import DEFAULT_GUIDANCE_SCALE, GuidanceConfig
    from luciddrag.evals.shapesworld import MODEL_DIR
    from luciddrag.evals.shapesworld.drag_eval import evaluate, split_configs

    from luciddrag.agent.context import model_defaults

    model_dir = model or str(MODEL_DIR)
    recommended = model_defaults(model_dir)
    base = recommended["guidance"].model_dump() if "guidance" in recommended else {}
    over = {**base, **{k: v for k, v in dict(w_edit=w_edit, w_content=w_content, w_inpaint=w_inpaint,
                                             edit_steps=edit_steps, init_copy=init_copy, kv_injection=kv).items()
                       if v is not None}}
    scale = cfg_scale if cfg_scale is not None else recommended.get("guidance_scale", DEFAULT_GUIDANCE_SCALE)
    try:
        editor = DragEditor.from_pretrained(model_dir, device="cpu", show_progress=False)
        evaluate(editor, tasks, seed, split_configs(configs), steps,
                 GuidanceConfig(**over), mask, out, families=[f.strip() for f in families.split(",")],
                 log=typer.echo, guidance_scale=scale, regions=regions)
    except LucidDragError as exc:
        _fail(str(exc))


# Commands owned by the sibling modules of this package, mounted so `luciddrag --help` lists them all.
app.add_typer(train.app, name="train")                        # ShapesWorld model training
app.add_typer(prompts.app, name="prompts")                    # prompt templates: list, show, render
app.add_typer(discriminator.app, name="discriminator")        # quality discriminator: synthesize, eval, calibrate
app.command("train-discriminator")(discriminator.train_command)
app.add_typer(serving_cli.app, name="serve")                  # the sampler as a Ray Serve deployment
app.command("web")(web_command)                               # the click-to-drag web app
eval_app.command("dragbench")(dragbench.app)                  # DragBench / Drag100 protocol
eval_app.command("agent")(agent_eval.app)                     # offline agent evals with cassettes
from luciddrag.agent.cli import agent_shapes  # noqa: E402 (kept with its mount: one hunk in a shared file)
eval_app.command("agent-shapes")(agent_shapes.app)           # hidden-intent agent suite (docs/agent-eval.md)


def main() -> None:
    """The console entry: Ctrl-C anywhere prints one line ("interrupted") and exits 130 (click would print
    "Aborted!" or a traceback, depending on where it lands)."""
    try:
        rc = app(standalone_mode=False)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        if type(exc).__name__ == "Abort":  # click's Ctrl-C at a prompt
            typer.echo("interrupted", err=True)
            sys.exit(130)
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):  # click's usage errors: its message, exit code 2
            exc.show()
            sys.exit(exc.exit_code)
        raise
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()

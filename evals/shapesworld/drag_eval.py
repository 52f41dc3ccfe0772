"""The ShapesWorld drag benchmark: run the engine over the task suite, score exactly, tabulate, ablate.

Configurations (rows of the ablation table):
- reconstruct: plain DDIM inversion + resampling with the source caption, no guidance, no memory bank -- the
  preservation ceiling a drag edit is compared against ("within 1 dB of a plain inversion + reconstruction");
- editing: editing guidance only (drag/inpaint/content energies, K/V memory bank, z_T patch copy), source prompt
  used for both inversion and sampling -- DragonDiffusion's configuration;
- editing+semantic: the same plus the task's source -> target prompts (LucidDrag's semantic guidance);
- editing+quality: editing guidance + quality guidance (the shipped fidelity discriminator, its recommended w_q, n2);
- all: editing + semantic + quality guidance (LucidDrag's collaborative guidance).
Quality rows take overrides after "@": "editing+quality@w=3,n=10" (w_q, n2), "...@region=edit", "...@d=FOLDER"
(another discriminator than the shipped one).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from luciddrag.engine.discriminator import load_discriminator, quality_terms
from luciddrag.engine.pipeline import DragEditor
from luciddrag.engine.request import DEFAULT_GUIDANCE_SCALE, EditRequest, GuidanceConfig
from luciddrag.evals.shapesworld import DISCRIMINATOR_DIR
from luciddrag.evals.shapesworld.scoring import TaskScore, aggregate, format_table, score_task
from luciddrag.evals.shapesworld.tasks import DragTask, TaskSuite, default_suite
from luciddrag.tools.drawing import draw_drags
from luciddrag.tools.sheet import contact_sheet

OFF = dict(w_edit=0.0, w_content=0.0, w_inpaint=0.0, kv_injection=False, init_copy=False)


def split_configs(text: str) -> list[str]:
    """"reconstruct,editing+quality@w=10,n=10,all" -> ["reconstruct", "editing+quality@w=10,n=10", "all"]: a
    comma-separated "key=value" belongs to the row before it."""
    out: list[str] = []
    for tok in (t.strip() for t in text.split(",")):
        if not tok:
            continue
        if out and "@" in out[-1] and re.fullmatch(r"\w+=[^,@+]*", tok):
            out[-1] += "," + tok
        else:
            out.append(tok)
    return out


def extra_terms_for(config: str, editor: DragEditor) -> list:
    """Guidance terms beyond editing guidance for a configuration: quality guidance for "+quality" and "all"."""
    name, _, opts = config.partition("@")
    if "+quality" not in name and name != "all":
        return []
    kv = dict(o.split("=", 1) for o in opts.split(",") if "=" in o)
    disc = load_discriminator(kv.get("d", DISCRIMINATOR_DIR), editor.c)  # d=FOLDER: try another discriminator
    return quality_terms(disc, float(kv["w"]) if "w" in kv else None, int(kv["n"]) if "n" in kv else None,
                         region=kv.get("region", "all"))


def config_request(task: DragTask, config: str, steps: int, guidance: GuidanceConfig, use_mask: bool,
                   seed: int = 0, guidance_scale: float = DEFAULT_GUIDANCE_SCALE, regions: bool = True) -> EditRequest:
    """The engine request for one task under one ablation configuration.

    `regions`: the drag carries the whole shape (its mask, as the offline locator segments it), as the agent does:
    translated for a move, scaled about its centre for a resize."""
    semantic = "+semantic" in config or config.startswith("all")
    g = guidance if config != "reconstruct" else GuidanceConfig(**{**guidance.model_dump(), **OFF})
    moving = regions and config != "reconstruct"
    return EditRequest.create(
        image=task.scene().image, points=task.points, mask=task.editable_mask() if use_mask else None,
        handle_masks=[task.source_mask()] * len(task.drags) if moving else None,
        region_motion="scale" if task.family == "resize" else "translate",
        source_prompt=task.source_prompt, target_prompt=task.target_prompt if semantic else task.source_prompt,
        steps=steps, seed=seed, guidance_scale=guidance_scale, guidance=g,
    )


def run_config(editor: DragEditor, tasks: Sequence[DragTask], config: str, steps: int = 50,
               guidance: GuidanceConfig | None = None, use_mask: bool = True, guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
               keep_images: int = 0, progress: bool = True, regions: bool = True) -> tuple[list[TaskScore], list[Image.Image], float]:
    """Edit and score every task; returns scores, the first `keep_images` results, and seconds per task."""
    guidance = guidance or GuidanceConfig()
    scores, kept = [], []
    t0 = time.perf_counter()
    for task in tqdm(tasks, desc=config, disable=not progress, leave=False):
        req = config_request(task, config, steps, guidance, use_mask, guidance_scale=guidance_scale, regions=regions)
        res = editor.edit(req, extra_terms=extra_terms_for(config, editor))
        arr = np.asarray(res.image.convert("RGB"))
        scores.append(score_task(task, arr))
        if len(kept) < keep_images:
            kept.append(res.image)
    return scores, kept, (time.perf_counter() - t0) / max(len(tasks), 1)


def contact_sheet_for(tasks: Sequence[DragTask], results: dict[str, list[Image.Image]],
                      scores: dict[str, list[TaskScore]]) -> Image.Image:
    """Rows: tasks; columns: input with arrows, then each configuration's result with its score."""
    n = min(len(v) for v in results.values())
    tiles: list[tuple[str, Image.Image]] = []
    for i in range(n):
        t = tasks[i]
        pairs = [(d.handle, d.target) for d in t.drags]
        tiles.append((f"{t.task_id}: {t.changed_words[0]} -> {t.changed_words[1]}".strip(),
                      draw_drags(t.scene().image, pairs, min_side=256)))
        for name, ims in results.items():
            s = scores[name][i]
            md = f"MD {s.md_px:.1f}px" if s.md_px is not None else "shape lost"
            tiles.append((f"{name}: {md}, {'ok' if s.success else 'fail'}", ims[i]))
    return contact_sheet(tiles, tile_height=192, columns=1 + len(results))


def evaluate(editor: DragEditor, n_tasks: int = 100, seed_base: int | None = None, configs: Sequence[str] = (
        "reconstruct", "editing", "editing+semantic"), steps: int = 50, guidance: GuidanceConfig | None = None,
        use_mask: bool = True, out_dir: Path | None = None, sheet_tasks: int = 4,
        families: Sequence[str] = ("move", "resize"), log: Callable[[str], None] = print,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE, regions: bool = True) -> dict[str, Any]:
    """Run the suite under each configuration; print and optionally write tables, JSON and a contact sheet."""
    suite = default_suite(n_tasks) if seed_base is None else default_suite(n_tasks, seed_base)
    tasks = [t for t in suite.tasks if t.family in families]
    report: dict[str, Any] = {"suite": suite.name, "n_tasks": len(tasks), "steps": steps, "use_mask": use_mask,
                              "guidance_scale": guidance_scale, "regions": regions,
                              "guidance": (guidance or GuidanceConfig()).model_dump(), "configs": {}}
    sheets_img: dict[str, list[Image.Image]] = {}
    sheets_scores: dict[str, list[TaskScore]] = {}
    sheet_pick = [t for fam in families for t in tasks if t.family == fam][:0]
    for fam in families:
        sheet_pick += [t for t in tasks if t.family == fam][: max(1, sheet_tasks // len(families))]
    for cfg in configs:
        scores, _, sec = run_config(editor, tasks, cfg, steps, guidance, use_mask, guidance_scale, regions=regions)
        table = aggregate(scores)
        report["configs"][cfg] = {"table": table, "seconds_per_task": sec, "scores": [s.model_dump() for s in scores]}
        log(f"\n### {cfg}  ({sec:.2f} s/task)\n{format_table(table)}")
        if out_dir is not None and sheet_pick:
            s2, ims, _ = run_config(editor, sheet_pick, cfg, steps, guidance, use_mask, guidance_scale,
                                    keep_images=len(sheet_pick), progress=False, regions=regions)
            sheets_img[cfg], sheets_scores[cfg] = ims, s2
    log("\n" + format_ablation(report))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "shapes_eval.json").write_text(json.dumps(report, indent=1))
        (out_dir / "shapes_eval.md").write_text(format_ablation(report) + "\n" + "\n".join(
            f"\n### {c}\n{format_table(v['table'])}" for c, v in report["configs"].items()))
        if sheets_img:
            contact_sheet_for(sheet_pick, sheets_img, sheets_scores).save(out_dir / "shapes_eval_sheet.png")
    return report


def format_ablation(report: dict[str, Any]) -> str:
    """One row per configuration and family: the numbers the issue's targets are stated in."""
    rows = ["| config | family | success | MD mean px | MD / drag | size err px | preservation dB | ghost rate | identity |",
            "|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, p="{:.3g}": "-" if v is None else p.format(v)  # noqa: E731
    for cfg, v in report["configs"].items():
        for fam, r in v["table"].items():
            rows.append(f"| {cfg} | {fam} | {f(r['success_rate'], '{:.0%}')} | {f(r['md_mean_px'])} | "
                        f"{f(r['md_mean_frac'], '{:.0%}')} | {f(r['size_abs_error_mean_px'])} | "
                        f"{f(r['preservation_psnr_mean'], '{:.1f}')} | {f(r['ghost_rate'], '{:.0%}')} | "
                        f"{f(r['identity_rate'], '{:.0%}')} |")
    return "\n".join(rows)

"""Tables in the paper's layout and a visual report.

Tables (the paper's Appendix Tab. 4 for Mean Distance and Tab. 5 for GScore; the same layout for the other metrics):
one row per method, one column per category (DragBench's ten, titled as in the paper: Artworks, Landscape, City,
Countryside, Animals, Head, Upper body, Full body, Interior, Other; other datasets' categories by name), then Average.

Aggregation: Mean Distance pools *points* (DragDiffusion's script appends every point's distance to one list and
takes its mean), so a category's MD is the mean over its points and Average is the mean over all points. The other
metrics are per image, so they are means over images, and Average is the mean over all images.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from luciddrag.evals.dragbench.data import CATEGORY_TITLES, DRAGBENCH_CATEGORIES
from luciddrag.evals.dragbench.metrics import DAI_GAMMAS
from luciddrag.evals.dragbench.runner import SampleRecord
from luciddrag.tools.drawing import draw_drags
from luciddrag.tools.sheet import contact_sheet

TABLES: dict[str, str] = {
    "md": "Mean Distance (px, lower is better) -- paper Tab. 4",
    "gscore": "GScore (1-10, higher is better) -- paper Tab. 5",
    "lpips_fidelity": "Image fidelity 1 - LPIPS (higher is better)",
    "clip": "CLIP image similarity (higher is better)",
    **{f"dai_{g}": f"DAI, gamma = {g} (lower is better)" for g in DAI_GAMMAS},
}


def categories_of(records: Sequence[SampleRecord]) -> list[str]:
    present = {r.category for r in records}
    ordered = [c for c in DRAGBENCH_CATEGORIES if c in present]
    return ordered + sorted(present - set(ordered))


def _aggregate(records: Sequence[SampleRecord], metric: str) -> float | None:
    if metric == "md":  # pooled over points
        pts = [d for r in records for d in r.metrics.get("md_points") or []]
        return float(np.mean(pts)) if pts else None
    vals = [r.metrics[metric] for r in records if r.metrics.get(metric) is not None]
    return float(np.mean(vals)) if vals else None


def build_tables(runs: dict[str, Sequence[SampleRecord]]) -> dict[str, Any]:
    """{metric: {"title", "columns", "rows": {method: {category: value, "Average": value}}, "counts"}}."""
    cats = categories_of([r for recs in runs.values() for r in recs])
    out: dict[str, Any] = {}
    for metric, title in TABLES.items():
        rows: dict[str, dict[str, float | None]] = {}
        for method, recs in runs.items():
            row = {c: _aggregate([r for r in recs if r.category == c], metric) for c in cats}
            row["Average"] = _aggregate(recs, metric)
            rows[method] = row
        if all(v is None for row in rows.values() for v in row.values()):
            continue  # metric not computed in any run
        out[metric] = {"title": title, "columns": cats + ["Average"],
                       "column_titles": [CATEGORY_TITLES.get(c, c) for c in cats] + ["Average"], "rows": rows,
                       "samples": {c: sum(1 for recs in runs.values() for r in recs if r.category == c) for c in cats}}
    return out


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}" if abs(v) >= 0.1 or v == 0 else f"{v:.4f}"


def tables_markdown(tables: dict[str, Any]) -> str:
    parts = []
    for metric, t in tables.items():
        head = "| | " + " | ".join(t["column_titles"]) + " |"
        sep = "|---|" + "---|" * len(t["columns"])
        lines = [f"### {t['title']}", "", head, sep]
        for method, row in t["rows"].items():
            lines.append(f"| {method} | " + " | ".join(_fmt(row[c]) for c in t["columns"]) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _tile(image: Image.Image, side: int = 256) -> Image.Image:
    scale = side / max(image.size)
    method = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), method)


def write_visuals(out: Path, records: Sequence[SampleRecord], data_images: dict[str, Path],
                  sheet_samples: int = 12) -> dict[str, Path]:
    """Per sample: input with drags, result with drags (and the tracked handles when MD ran); an HTML page with
    every sample and a PNG contact sheet with the first ``sheet_samples``."""
    rows_html, tiles = [], []
    for rec in records:
        folder = out / "samples" / rec.category / rec.name
        folder.mkdir(parents=True, exist_ok=True)
        pairs = [(rec.points[i], rec.points[i + 1]) for i in range(0, len(rec.points), 2)]
        with Image.open(data_images[rec.sample_id]) as im:
            src = im.convert("RGB")
        inp = draw_drags(src, pairs, min_side=256)
        inp.save(folder / "input_drags.png")
        cells = [f'<td><img src="samples/{rec.category}/{rec.name}/input_drags.png" width="256"></td>']
        res_tile = None
        if rec.result and (out / rec.result).is_file():
            with Image.open(out / rec.result) as im:
                res = im.convert("RGB")
            if res.size != src.size:
                res = res.resize(src.size, Image.Resampling.BILINEAR)
            shown = [(t, t) for t in rec.tracked] if rec.tracked else []
            # result with the drags' targets, and where DIFT found each handle (a dot on its target = arrived)
            res_tile = draw_drags(res, pairs if not shown else [(f, p[1]) for f, p in zip(rec.tracked, pairs)],
                                  min_side=256)
            res_tile.save(folder / "result_drags.png")
            cells.append(f'<td><img src="samples/{rec.category}/{rec.name}/result_drags.png" width="256"></td>')
        else:
            cells.append("<td>(no result)</td>")
        m = rec.metrics
        facts = [f"MD {m['md']:.2f} px" if "md" in m else None,
                 f"1-LPIPS {m['lpips_fidelity']:.3f}" if "lpips_fidelity" in m else None,
                 f"CLIP {m['clip']:.3f}" if "clip" in m else None,
                 f"GScore {m['gscore']:.2f}" if m.get("gscore") is not None else None,
                 "DAI " + "/".join(f"{m[f'dai_{g}']:.3f}" for g in DAI_GAMMAS) if "dai_1" in m else None]
        facts_s = ", ".join(f for f in facts if f)
        why = f"{rec.intention} ({'accepted' if rec.accepted else 'not accepted'})" if rec.intention else ""
        text = f"<b>{html.escape(rec.sample_id)}</b><br>{html.escape(rec.prompt)}<br>{html.escape(why)}<br>" \
               f"{html.escape(facts_s)}" + ("<br>errors: " + html.escape("; ".join(rec.errors)) if rec.errors else "")
        cells.append(f"<td>{text}</td>")
        rows_html.append("<tr>" + "".join(cells) + "</tr>")
        if len(tiles) < 2 * sheet_samples:
            tiles.append((f"{rec.sample_id}: input", inp))
            tiles.append((f"{rec.method}: {facts_s}" if res_tile is not None else "no result",
                          res_tile if res_tile is not None else Image.new("RGB", inp.size, "white")))
    paths = {}
    page = out / "report.html"
    page.write_text("<!doctype html><meta charset='utf-8'><title>DragBench report</title>"
                    "<style>body{font-family:sans-serif}td{vertical-align:top;padding:4px}"
                    "table.t td,table.t th{border:1px solid #ccc;padding:2px 6px}</style>"
                    f"<h1>DragBench report: {html.escape(out.name)}</h1>"
                    + _tables_html(build_tables({records[0].method if records else "-": records}))
                    + "<h2>Samples</h2><p>Left: input with drags (dot = handle, ring = target). Right: result; when "
                      "Mean Distance ran, the arrows start where DIFT found each handle's content.</p>"
                    + "<table>" + "".join(rows_html) + "</table>")
    paths["html"] = page
    if tiles:
        sheet = out / "report.png"
        contact_sheet(tiles, tile_height=256, columns=2).save(sheet)
        paths["png"] = sheet
    return paths


def _tables_html(tables: dict[str, Any]) -> str:
    parts = []
    for t in tables.values():
        head = "<tr><th></th>" + "".join(f"<th>{html.escape(c)}</th>" for c in t["column_titles"]) + "</tr>"
        body = "".join("<tr><td>" + html.escape(m) + "</td>" + "".join(f"<td>{_fmt(row[c])}</td>"
                                                                         for c in t["columns"]) + "</tr>"
                       for m, row in t["rows"].items())
        parts.append(f"<h3>{html.escape(t['title'])}</h3><table class='t'>{head}{body}</table>")
    return "".join(parts)


def write_tables(out: Path, runs: dict[str, Sequence[SampleRecord]]) -> dict[str, Any]:
    tables = build_tables(runs)
    (out / "tables.json").write_text(json.dumps(tables, indent=1))
    (out / "tables.md").write_text(tables_markdown(tables))
    return tables

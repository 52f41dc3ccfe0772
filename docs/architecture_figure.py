"""Draws docs/architecture.png: the layers, and the path of `image, points` to the edited image.

    python docs/architecture_figure.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

LAYERS = [  # (name, folders, colour), top to bottom: imports only go down
    ("CLI and web (top)", "agent/cli/   agent/web/", "#f4d6d6"),
    ("evals, training (beside)", "evals/  (ShapesWorld world plugin, DragBench, agent evals)   engine/training/", "#f1e4c8"),
    ("agent", "agent/graph.py  nodes.py  state.py  context.py  tools.py  chat.py", "#dbe8d4"),
    ("tools, prompts", "tools/locator.py  reasoner.py  worlds.py  segmenter.py  critic.py   prompts/*.md", "#d6e4f0"),
    ("engine", "engine/pipeline.py  sampling.py  guidance.py  energies.py  memory.py  tracking.py  presets.py",
     "#e2dcef"),
]
PATH = [  # (file, what happens there)
    ("agent/graph.py", "graph.invoke({'image', 'points'})\ningest → locate → reason → choose\n→ sample → critique ⟲"),
    ("agent/nodes.py", "ingest: points → drag pairs, once\nlocate / reason: tools/locator, reasoner\nsample, critique"),
    ("agent/tools.py", "AgentContext → EditRequest\n(one batch of K intentions)\nscore_drag: DIFT tracking"),
    ("engine/pipeline.py", "DragEditor.edit: check → encode\n→ DDIM-invert (memory bank)\n→ plan → sample → decode"),
    ("engine/sampling.py", "collaborative_guidance_sample\n(paper Algorithm 1): CFG, K/V,\nsemantic+editing+quality"),
    ("engine/guidance.py", "guidance terms over\nenergies.py (Eq. 9-11)\nand discriminator.py (Eq. 7)"),
]


def main(out: Path = Path(__file__).with_name("architecture.png")) -> None:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(13, 9.2), gridspec_kw={"height_ratios": [1.05, 1]})
    for ax in (top, bottom):
        ax.set_xlim(0, 13)
        ax.axis("off")
    top.set_ylim(0, len(LAYERS) * 1.1 + 0.4)
    top.set_title("Layers: each imports only the layers below it (tests/test_layers.py)", fontsize=13, loc="left")
    for i, (name, folders, colour) in enumerate(LAYERS):
        y = (len(LAYERS) - 1 - i) * 1.1 + 0.2
        top.add_patch(FancyBboxPatch((0.1, y), 12.8, 0.9, boxstyle="round,pad=0.02", fc=colour, ec="#555"))
        top.text(0.3, y + 0.6, name, fontsize=12, weight="bold", va="center")
        top.text(0.3, y + 0.27, folders, fontsize=10, family="monospace", va="center")
        if i < len(LAYERS) - 1:
            top.annotate("", xy=(12.4, y - 0.15), xytext=(12.4, y + 0.05),
                         arrowprops=dict(arrowstyle="-|>", color="#333", lw=1.5))
    bottom.set_ylim(0, 5.6)
    bottom.set_title("image, points → edited image, through six files", fontsize=13, loc="left")
    w, h, gap = 3.9, 2.1, 0.55
    boxes = []
    for i, (name, what) in enumerate(PATH):
        row, col = divmod(i, 3)
        x, y = 0.1 + col * (w + gap), 3.2 - row * (h + 0.45)
        boxes.append((x, y))
        bottom.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.03", fc="#fbfbf7", ec="#444"))
        bottom.text(x + w / 2, y + h - 0.3, name, ha="center", fontsize=11, weight="bold", family="monospace")
        bottom.text(x + w / 2, y + h / 2 - 0.2, what, ha="center", va="center", fontsize=9.5, linespacing=1.5)
    for (x0, y0), (x1, y1) in zip(boxes, boxes[1:]):
        if y0 == y1:
            start, end = (x0 + w + 0.05, y0 + h / 2), (x1 - 0.05, y1 + h / 2)
        else:  # end of the agent row -> start of the engine row
            start, end = (x0 + w / 2, y0 - 0.05), (x1 + w / 2, y1 + h + 0.05)
        bottom.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=16, color="#333"))
    bottom.text(0.1, 0.12, "The world plugin (evals/shapesworld/plugin.py) registers its offline locator and reasoner "
                "through the entry-point group luciddrag.worlds; tools and agent never name it.", fontsize=9.5)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""The layering rule of docs/architecture.md, checked two ways: no import statement goes up a layer, and each layer
imports and loads with every layer above it made unimportable.

    engine (0) -> tools, prompts (1) -> agent core (2) -> engine.training (3) -> evals (4) -> agent.cli, agent.web (5)
"""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"agent": "luciddrag.agent", "tools": "luciddrag.tools", "engine": "luciddrag.engine",
           "prompts": "luciddrag.prompts", "evals": "luciddrag.evals"}
# Most specific prefix first.
RANKS = [("luciddrag.agent.cli", 5), ("luciddrag.agent.web", 5), ("luciddrag.evals", 4),
         ("luciddrag.engine.training", 3), ("luciddrag.agent", 2), ("luciddrag.tools", 1), ("luciddrag.prompts", 1),
         ("luciddrag.engine", 0)]


def rank(module: str) -> int | None:
    for prefix, r in RANKS:
        if module == prefix or module.startswith(prefix + "."):
            return r
    return None


def our_modules() -> list[tuple[Path, str]]:
    out = []
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            out.append((path, ".".join([package, *rel.parts]).removesuffix(".__init__")))
    return out


def imported_names(path: Path) -> list[tuple[int, str]]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            names += [(node.lineno, a.name) for a in node.names]
    return names


def test_rank_table_knows_every_module():
    assert rank("luciddrag.agent.cli.main") == 5 and rank("luciddrag.agent.nodes") == 2
    assert rank("luciddrag.engine.training.train") == 3 and rank("luciddrag.engine.pipeline") == 0
    assert rank("luciddrag.agentx") is None and rank("engine.pipeline") is None
    assert all(rank(module) is not None for _, module in our_modules())


def test_no_import_goes_up_a_layer():
    bad = []
    for path, module in our_modules():
        for line, name in imported_names(path):
            if (r := rank(name)) is not None and r > rank(module):
                bad.append(f"{path.relative_to(ROOT)}:{line}: {module} imports {name}")
    assert not bad, "imports that go up a layer:\n" + "\n".join(bad)


def test_our_code_is_imported_only_through_the_namespace():
    """`import engine` would pick up whatever `engine` is first on sys.path (PyPI has `tools`, `evals`, ...)."""
    bare = set(FOLDERS)
    bad = []
    for path in [*(p for p, _ in our_modules()), *sorted((ROOT / "tests").glob("*.py"))]:
        for line, name in imported_names(path):
            if name.split(".")[0] in bare:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {name}")
    assert not bad, "bare imports of our packages:\n" + "\n".join(bad)


BLOCKER = textwrap.dedent('''
    import importlib, importlib.abc, pkgutil, sys

    class Block(importlib.abc.MetaPathFinder):
        def __init__(self):
            self.prefixes = []
        def find_spec(self, name, path=None, target=None):
            if any(name == p or name.startswith(p + ".") for p in self.prefixes):
                raise ImportError(f"{name} is above the layer under test")
            return None

    block = Block()
    sys.meta_path.insert(0, block)

    def load(package, skip=()):
        mod = importlib.import_module(package)
        names = [package]
        for info in pkgutil.walk_packages(mod.__path__, package + "."):
            if not any(info.name == s or info.name.startswith(s + ".") for s in skip):
                importlib.import_module(info.name)
                names.append(info.name)
        return names
''')

LAYERS = textwrap.dedent('''
    above = ["luciddrag.tools", "luciddrag.prompts", "luciddrag.agent", "luciddrag.evals", "luciddrag.engine.training"]
    block.prefixes = list(above)
    loaded = load("luciddrag.engine", skip=["luciddrag.engine.training"])
    block.prefixes = ["luciddrag.agent", "luciddrag.evals", "luciddrag.engine.training"]
    loaded += load("luciddrag.tools") + load("luciddrag.prompts")
    block.prefixes = ["luciddrag.evals", "luciddrag.engine.training", "luciddrag.agent.cli", "luciddrag.agent.web"]
    loaded += load("luciddrag.agent", skip=["luciddrag.agent.cli", "luciddrag.agent.web"])
    print(len(loaded), "modules")
''')


@pytest.mark.slow
def test_each_layer_loads_with_the_layers_above_blocked():
    res = subprocess.run([sys.executable, "-c", BLOCKER + LAYERS], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert int(res.stdout.split()[0]) >= 30  # engine, tools, prompts and agent core modules were all imported


def test_the_blocker_blocks():
    """The check above can fail: importing a blocked layer raises."""
    code = BLOCKER + 'block.prefixes = ["luciddrag.engine"]\nimport luciddrag.tools.schemas\n'
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "above the layer under test" in res.stderr

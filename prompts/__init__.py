"""Prompt templates as data files, versioned by file name, rendered with named variables.

A template is ``<name>.v<N>.md``: an optional front matter (``---`` / ``description: ...`` / ``---``) followed by
messages, each introduced by a marker line ``<!-- message: system -->`` (or ``user`` / ``assistant``). Message
text uses ``{variable}`` placeholders (``{{`` and ``}}`` for literal braces). Few-shot examples that go with a
template live beside it as ``<name>.v<N>.examples.yaml``.

Rendering is strict: a variable the template needs but the caller did not give, or one the caller gave but the
template does not use, is an error. That keeps code and templates honest with each other as either changes: a
template edit that drops ``{drag_information}`` fails loudly instead of silently sending the LLM less.

Templates are looked up in ``$LUCIDDRAG_PROMPTS_DIR`` (if set) before this package, so a user can iterate on a copy
(``luciddrag prompts show NAME > my/NAME.v2.md``) without touching the installed files.
"""

from __future__ import annotations

import os
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from luciddrag.engine.errors import InputError

PACKAGE_DIR = Path(__file__).resolve().parent
ENV_DIR = "LUCIDDRAG_PROMPTS_DIR"
Role = Literal["system", "user", "assistant"]

_FILE_RE = re.compile(r"^(?P<name>[a-z][a-z0-9_]*)\.v(?P<version>\d+)\.md$")
_MARKER_RE = re.compile(r"^<!--\s*message:\s*(?P<role>system|user|assistant)\s*-->\s*$", re.MULTILINE)
_FRONT_RE = re.compile(r"\A---\n(?P<front>.*?)\n---\n", re.DOTALL)


class PromptError(InputError):
    """A template is missing, malformed, or was rendered with the wrong variables."""


class PromptMessage(BaseModel):
    role: Role
    content: str


class RenderedPrompt(BaseModel):
    """A template rendered with concrete variables: exactly the text messages an LLM receives."""

    name: str
    version: int
    messages: list[PromptMessage]

    @property
    def label(self) -> str:
        return f"{self.name}.v{self.version}"

    def as_text(self) -> str:
        """Human-readable dump, one block per message (what ``luciddrag prompts render`` prints)."""
        blocks = [f"===== {m.role} =====\n{m.content}" for m in self.messages]
        return "\n\n".join(blocks) + "\n"

    def to_langchain(self) -> list[Any]:
        """The messages as langchain-core message objects."""
        from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

        kinds = {"system": SystemMessage, "user": HumanMessage, "assistant": AIMessage}
        return [kinds[m.role](content=m.content) for m in self.messages]


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    version: int
    path: Path
    description: str
    messages: tuple[tuple[Role, str], ...]

    @property
    def label(self) -> str:
        return f"{self.name}.v{self.version}"

    @property
    def variables(self) -> frozenset[str]:
        """Every ``{variable}`` the messages use."""
        return frozenset(v for _, text in self.messages for v in template_fields(text, where=self.label))

    @property
    def examples_path(self) -> Path:
        return self.path.with_name(f"{self.name}.v{self.version}.examples.yaml")

    def examples(self) -> list[dict[str, Any]]:
        """The few-shot examples stored beside the template ([] if it has none)."""
        if not self.examples_path.exists():
            return []
        data = yaml.safe_load(self.examples_path.read_text(encoding="utf-8"))
        if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
            raise PromptError(f"{self.examples_path}: expected a YAML list of examples (mappings)")
        return data

    def render(self, **variables: Any) -> RenderedPrompt:
        """Fill every message; raise ``PromptError`` on a missing or an unused variable."""
        needed = self.variables
        given = set(variables)
        missing, unused = sorted(needed - given), sorted(given - needed)
        if missing or unused:
            parts = []
            if missing:
                parts.append(f"missing variable(s) {', '.join(missing)}")
            if unused:
                parts.append(f"unused variable(s) {', '.join(unused)}")
            raise PromptError(f"template {self.label} ({self.path}): {'; '.join(parts)}")
        messages = [PromptMessage(role=role, content=text.format(**variables)) for role, text in self.messages]
        return RenderedPrompt(name=self.name, version=self.version, messages=messages)

    def source(self) -> str:
        return self.path.read_text(encoding="utf-8")


def template_fields(text: str, where: str = "template") -> list[str]:
    """The placeholder names in ``text``, in order; only plain ``{name}`` is allowed (no ``{a.b}``, ``{a[0]}``,
    ``{a:fmt}`` or ``{a!r}``: formatting belongs in code, where it is tested)."""
    names = []
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:  # unbalanced braces
        raise PromptError(f"{where}: {exc} (write literal braces as {{{{ and }}}})") from exc
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if not field.isidentifier() or spec or conversion:
            raise PromptError(f"{where}: placeholder {{{field}{'!' + conversion if conversion else ''}"
                              f"{':' + spec if spec else ''}}} must be a plain {{name}}")
        names.append(field)
    return names


def parse_template(path: Path) -> PromptTemplate:
    match = _FILE_RE.match(path.name)
    if not match:
        raise PromptError(f"{path.name}: template files are named <name>.v<N>.md")
    text = path.read_text(encoding="utf-8")
    description = ""
    front = _FRONT_RE.match(text)
    if front:
        meta = yaml.safe_load(front.group("front")) or {}
        if not isinstance(meta, dict):
            raise PromptError(f"{path}: front matter must be a YAML mapping")
        description = str(meta.get("description", "")).strip()
        text = text[front.end():]
    markers = list(_MARKER_RE.finditer(text))
    if not markers:
        raise PromptError(f"{path}: no '<!-- message: system|user|assistant -->' marker")
    if text[: markers[0].start()].strip():
        raise PromptError(f"{path}: text before the first message marker")
    messages: list[tuple[Role, str]] = []
    for i, m in enumerate(markers):
        end = markers[i + 1].start() if i + 1 < len(markers) else len(text)
        body = text[m.end():end].strip("\n")
        messages.append((m.group("role"), body.rstrip()))  # type: ignore[arg-type]
    template = PromptTemplate(match.group("name"), int(match.group("version")), path, description, tuple(messages))
    template.variables  # noqa: B018 - validates placeholders now, not at first render
    return template


def search_dirs() -> list[Path]:
    dirs = []
    if extra := os.environ.get(ENV_DIR):
        dirs.append(Path(extra))
    dirs.append(PACKAGE_DIR)
    return dirs


def list_templates(dirs: list[Path] | None = None) -> list[PromptTemplate]:
    """Every template version found, sorted by name then version; earlier directories shadow later ones."""
    found: dict[tuple[str, int], PromptTemplate] = {}
    for directory in dirs if dirs is not None else search_dirs():
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.v*.md")):
            if _FILE_RE.match(path.name):
                t = parse_template(path)
                found.setdefault((t.name, t.version), t)
    return sorted(found.values(), key=lambda t: (t.name, t.version))


def load_template(name: str, version: int | None = None, dirs: list[Path] | None = None) -> PromptTemplate:
    """A template by name; ``version=None`` takes the highest version available."""
    candidates = [t for t in list_templates(dirs) if t.name == name]
    if not candidates:
        known = sorted({t.name for t in list_templates(dirs)})
        raise PromptError(f"no prompt template named {name!r}; known: {', '.join(known) or 'none'}")
    if version is None:
        return candidates[-1]
    for t in candidates:
        if t.version == version:
            return t
    raise PromptError(f"template {name!r} has no version {version}; "
                      f"available: {', '.join(f'v{t.version}' for t in candidates)}")


def parse_label(label: str) -> tuple[str, int | None]:
    """``"reason_intentions.v2"`` -> (``"reason_intentions"``, 2); a bare name -> (name, None)."""
    m = re.fullmatch(r"(?P<name>[a-z][a-z0-9_]*)(?:\.v(?P<version>\d+))?", label)
    if not m:
        raise PromptError(f"bad template reference {label!r}; expected NAME or NAME.vN")
    return m.group("name"), int(m.group("version")) if m.group("version") else None


__all__ = [
    "PromptError", "PromptMessage", "PromptTemplate", "RenderedPrompt", "list_templates", "load_template",
    "parse_label", "parse_template", "search_dirs", "template_fields",
]

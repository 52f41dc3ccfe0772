"""Agent-eval metrics: small pure functions over the reasoner's answer and the graph's trajectory.

* schema validity: the LLM's first answer parsed into the schema (no repair, no offline fallback);
* constraints per case: the intention family appears among the K intentions (and whether it is the top one), the
  top intention names the dragged object, source and target prompts differ only in the edited words (a word-level
  diff of at most ``max_changed_words``, and not identical -- the paper allows identical prompts when the change is
  hard to describe, counted separately), K distinct intentions;
* diversity: mean pairwise Jaccard distance between the intentions' content words (0 = the same words, 1 = disjoint);
* trajectories: node order, no intention tried twice, tries in descending confidence (argmax selection), a rejection
  followed by the next untried intention, acceptance iff an acceptable intention was reached within the budget.
"""

from __future__ import annotations

import difflib
import itertools
import re
from collections.abc import Sequence
from typing import Any

from luciddrag.tools.schemas import Intention

_STOP = {"a", "an", "the", "of", "to", "and", "it", "its", "in", "on", "at", "with", "make", "making", "is", "be",
         "photo", "image", "picture", "more", "bit", "slightly", "so", "that", "this"}


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def content_words(text: str) -> set[str]:
    return {w for w in words(text) if w not in _STOP}


def has_any(text: str, keywords: Sequence[str]) -> bool:
    """Whole-word (or whole-phrase) match of any keyword; 'long' matches 'long', 'longer' only when listed."""
    t = " " + " ".join(words(text)) + " "
    return any(f" {' '.join(words(k))} " in t or (len(k) > 4 and k.lower() in t) for k in keywords)


def changed_words(source: str, target: str) -> int:
    """Words outside the longest common word alignment (max of the two sides per differing block)."""
    a, b = words(source), words(target)
    sm = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    return sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in sm.get_opcodes() if tag != "equal")


def minimal_edit(i: Intention, max_changed: int) -> bool:
    n = changed_words(i.source_prompt, i.target_prompt)
    return 1 <= n <= max_changed


def diversity(intentions: Sequence[Intention]) -> float | None:
    sets = [content_words(i.intention) for i in intentions]
    pairs = list(itertools.combinations(sets, 2))
    if not pairs:
        return None
    return sum(1 - len(a & b) / max(len(a | b), 1) for a, b in pairs) / len(pairs)


def case_constraints(intentions: Sequence[Intention], families: Sequence[str], mentions: Sequence[str], k: int,
                     max_changed: int) -> dict[str, Any]:
    top = intentions[0] if intentions else None
    return {
        "family_any": any(has_any(i.intention, families) for i in intentions),
        "family_top": bool(top) and has_any(top.intention, families),
        "mentions_object": bool(top) and has_any(" ".join([top.intention, top.source_prompt, top.target_prompt]),
                                                 mentions),
        "minimal_edit": bool(intentions) and all(minimal_edit(i, max_changed) for i in intentions),
        "identical_prompts": sum(changed_words(i.source_prompt, i.target_prompt) == 0 for i in intentions),
        "k_distinct": len(intentions) == k and len({" ".join(words(i.intention)) for i in intentions}) == k,
    }


def trajectory_checks(nodes: Sequence[str], attempts: Sequence[Any], intentions: Sequence[Intention],
                      accepts: Sequence[str], max_attempts: int, accepted: bool) -> dict[str, bool]:
    """Plain-code trajectory evaluators over one graph run (argmax selection, scripted critic)."""
    tried = [a.index for a in attempts]
    order = sorted(range(len(intentions)), key=lambda j: -intentions[j].confidence)
    good = [j for j in order if has_any(intentions[j].target_prompt, accepts)]
    expect_n = min(order.index(good[0]) + 1, max_attempts) if good and order.index(good[0]) < max_attempts \
        else min(max_attempts, len(intentions))
    expected_nodes = ["ingest", "locate", "reason", "choose"] + ["sample", "critique"] * expect_n
    verdicts = [a.verdict for a in attempts]
    return {
        "node_order": list(nodes) == expected_nodes,
        "no_repeats": len(tried) == len(set(tried)),
        "confidence_order": tried == order[: len(tried)],
        "reject_then_next": all(v == "rejected" for v in verdicts[:-1]),
        "accepted_iff_reachable": accepted == bool(good and order.index(good[0]) < max_attempts),
        "within_budget": len(attempts) <= max_attempts,
    }

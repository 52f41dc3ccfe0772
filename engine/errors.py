"""Typed errors the user sees.

Every failure a user can cause (bad input, a missing model, not enough memory) is raised as one of these, with a
one-line message that names the problem and, where possible, what to do. The CLI turns them into exit code 2; nothing
from deep inside torch should reach the user.
"""

from __future__ import annotations


class LucidDragError(Exception):
    """Base class of every error LucidDrag raises on purpose."""


class InputError(LucidDragError, ValueError):
    """The request itself is wrong: points, mask, image file, prompts."""


class ModelLoadError(LucidDragError, OSError):
    """A model id or folder could not be loaded (not an SD checkpoint, weights missing offline, ...)."""


class ResourceError(LucidDragError, RuntimeError):
    """The machine ran out of something (memory); the message says what to lower."""


class BaseMismatchError(ModelLoadError):
    """A trained add-on (the fidelity discriminator) belongs to a different base model than the one loaded."""

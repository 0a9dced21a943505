"""The one exception type of recipe loading, with the recipe file in its message."""

from __future__ import annotations


class RecipeError(ValueError):
    """A recipe, an override or the command line is wrong.

    The message is complete and meant to be printed as is (``train.py`` prints it and exits 2): it starts
    with the recipe file (``recipes/demo.yaml: ...``) when there is one, names the key, and says what
    would be accepted.
    """

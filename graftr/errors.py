"""User-facing errors.

Every failure caused by user input (a bad recipe, a model id that cannot be resolved, an adapter that does not
fit the model) is raised as a :class:`GraftrError`. The CLI prints its message on one line and exits with code 2;
anything else is a bug and keeps its traceback.
"""


class GraftrError(Exception):
    """An error caused by user input; its message is shown to the user as is."""


class RecipeError(GraftrError):
    """A recipe failed to load or validate. The message lists every problem with file, line and field."""


class MatchError(GraftrError):
    """A rule matched no site, or matched a site its adapter kind cannot attach to."""


class MergeError(GraftrError):
    """An adapter cannot be folded into the base weights (the message says why)."""


# why no attention kind merges: said by the early check (graftr merge) and by GraftedModel.merge_ alike
ATTENTION_NOT_MERGEABLE = "attention adapters cannot be merged into weights; they add computation of their own"


class AdapterLoadError(GraftrError):
    """A saved adapter does not fit the model (missing, extra or mis-shaped tensors, different base)."""

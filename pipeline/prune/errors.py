"""The error `distill prune` raises for bad targets or inputs; importing it loads no torch (the CLI catches it)."""


class PruneError(ValueError):
    """A pruning target or input that cannot be used; the message names the flag or file and what was expected."""

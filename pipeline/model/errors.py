"""Errors of the model package, importable without torch so the CLI can catch them cheaply."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as the model it claims to be; the message names file and tensor."""


class ModelLayoutError(ValueError):
    """A model that cannot be split over the requested tensor-parallel size; the message names the setting."""

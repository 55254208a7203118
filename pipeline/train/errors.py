"""Errors of the trainer, importable without torch so the CLI can catch them cheaply."""


class TrainError(ValueError):
    """A run that cannot start or go on: a bad combination of settings and data, a checkpoint of another
    run, too many non-finite steps. The message names the setting, file or step and what was expected."""

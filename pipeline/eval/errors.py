"""The error of the risk measures (bad prompts, mismatched vocabularies); no torch, so the CLI imports it cheaply."""


class RiskError(ValueError):
    """Risks cannot be measured as asked; the message names the file, key or setting."""

"""Errors a user sees. Configuration errors are raised before any work starts."""


class ConfigError(ValueError):
    """A bad option or input specification; the message names the field."""

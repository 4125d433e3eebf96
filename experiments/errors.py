"""Errors of running rows that the command line prints as one `error:` line (with ConfigError)."""


class RunError(RuntimeError):
    """A row cannot start or go on: the message says why and what to do."""


class NotAvailableError(RunError):
    """The row needs a model part that is not built yet (a variant, a backbone)."""

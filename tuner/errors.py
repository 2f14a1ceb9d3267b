"""Errors a user can act on. The CLI prints them as one message, without a traceback."""


class TunerError(Exception):
    """A failure with a message for the user; `exit_code` follows the CLI's contract."""

    exit_code = 1


class SpecError(TunerError):
    """The study file is wrong: the message names the file, the key and the fix."""

    exit_code = 2


class ConfigError(TunerError):
    """A location or option is wrong (unreachable store, bad URL, too few images)."""

    exit_code = 2


class DataError(TunerError):
    """CIFAR-10 is missing or unreadable where we looked."""

    exit_code = 1


class StoreError(TunerError):
    """A store cannot be used: locked, full, read-only, missing, or its server unreachable. The
    message names the store, the cause and what to do."""

    exit_code = 1

"""Errors a user can act on. The CLI prints their message on one line and exits non-zero."""


class Lenet5Error(Exception):
    """Base class: the message names the file or option and what is wrong with it."""


class DataError(Lenet5Error):
    """A data file is missing, corrupt, truncated or not what it claims to be."""


class DownloadError(DataError):
    """No mirror delivered a file that passed verification."""


class ConfigError(Lenet5Error):
    """An impossible or inconsistent option."""


class CheckpointError(Lenet5Error):
    """A checkpoint or run folder that cannot be read or resumed."""

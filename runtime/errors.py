"""Errors a user can act on. The CLI prints them without a traceback and exits with code 2."""


class UserError(Exception):
    """Bad input from the user: config, data, checkpoint or command line."""


class ConfigError(UserError):
    """The configuration is invalid (unknown key, wrong type, missing file...)."""


class DataError(UserError):
    """A dataset is unusable (missing column, empty split, undecodable image...)."""

"""Exceptions shared across ldm_jax."""


class UserError(Exception):
    """Bad input that the user can fix; the message names the problem and the fix."""


class DatasetNotPreparedError(UserError):
    """A dataset (or split) is not on disk in a readable form; the message says how to build it."""

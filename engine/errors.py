"""The errors batchkin reports to a user as one clear line (exit code 2 from the CLI)."""


class BatchkinError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""


class ConfigError(BatchkinError, ValueError):
    """A config key, type or value is wrong; the message names the key."""


class DataError(BatchkinError, ValueError):
    """A dataset is missing, corrupt or unusable; the message names the file or folder."""


class PluginError(BatchkinError):
    """A plugin failed to load, is invalid, or conflicts with another one."""


class RunError(BatchkinError):
    """A run folder cannot be used (exists, locked, missing checkpoint, ...)."""


class NonFiniteError(BatchkinError):
    """Training produced a non-finite loss or gradient and the run is set to stop."""

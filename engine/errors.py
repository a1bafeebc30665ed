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


#: The longest message the command line prints (longer ones keep their start and end).
MAX_MESSAGE_CHARS = 2000


def one_line(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` as one line of at most about ``limit`` characters: line breaks (a multi-line
    exception text, a path with a newline) become ``" | "`` and the middle of a very long
    message is cut, so the hint at its end survives."""
    text = " | ".join(part.strip() for part in str(text).splitlines() if part.strip())
    if len(text) <= limit:
        return text
    head, tail = text[: limit * 3 // 4], text[-(limit // 4):]
    return f"{head} ...({len(text) - len(head) - len(tail)} characters cut)... {tail}"


def describe_exception(exc: BaseException) -> str:
    """``Type: message`` of an unexpected exception, for a one-line error naming where it came from."""
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r})"
    text = one_line(str(exc), 300)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure (host or device), which the trainer reports itself."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc) if isinstance(exc, RuntimeError) else ""
    return "out of memory" in text or "can't allocate memory" in text
